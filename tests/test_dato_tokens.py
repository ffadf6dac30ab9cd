"""Tests of datosd.dato: base/pruned token selection, prune/recover, DiffScore (spec 3-7)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datosd.dato import diff_score, pool_score, select_tokens
from sdgen.runtime import set_threads


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """These tensors are tiny: one thread avoids OpenMP wake-up stalls on a busy machine."""
    threads = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(threads)


# ---------------------------------------------------------------------------
# A slow, obviously-correct reference, written with plain Python loops.
# ---------------------------------------------------------------------------


def ref_bases(score_hw, hw, patch):
    """Base token of each complete patch: the largest score, lowest token index on ties."""
    (h, w), (sy, sx) = hw, patch
    s = score_hw.tolist()
    bases = []
    for py in range(h // sy):
        for px in range(w // sx):
            best_v, best_t = None, None
            for dy in range(sy):  # dy, dx in this order visit the patch's tokens in ascending index
                for dx in range(sx):
                    r, c = py * sy + dy, px * sx + dx
                    if best_v is None or s[r][c] > best_v:
                        best_v, best_t = s[r][c], r * w + c
            bases.append(best_t)
    return sorted(bases)


def ref_cos(a, b):
    dot = sum(p * q for p, q in zip(a, b))
    na = math.sqrt(sum(p * p for p in a))
    nb = math.sqrt(sum(q * q for q in b))
    return dot / (max(na, 1e-12) * max(nb, 1e-12))


def ref_select(x, score, ratio, hw, patch, cfg_halves=False, cfg_reference="cond", recover_from="base"):
    """Per sample: (bases, pruned (most similar first), {pruned: parent}, kept in kept_index order)."""
    bsz, n, _ = x.shape
    h, w = hw
    nb = (h // patch[0]) * (w // patch[1])
    k = min(math.floor(ratio * n), n - nb) if nb > 0 else 0
    out = []
    for b in range(bsz):
        ref = b
        if cfg_halves and bsz % 2 == 0:
            half = bsz // 2
            ref = half + b % half if cfg_reference == "cond" else b % half
        bases = ref_bases(score[ref], hw, patch)
        feats = x[b].double().tolist()
        others = [t for t in range(n) if t not in bases]
        best, parent = {}, {}
        for t in others:
            sims = [ref_cos(feats[t], feats[q]) for q in bases]
            best[t] = max(sims)
            parent[t] = bases[sims.index(best[t])]  # first maximum in ascending base order
        pruned = sorted(others, key=lambda t: (-best[t], t))[:k]
        kept = bases + [t for t in others if t not in pruned]
        if recover_from == "kept":
            for t in pruned:
                sims = [ref_cos(feats[t], feats[q]) for q in kept]
                parent[t] = kept[sims.index(max(sims))]
        out.append((bases, pruned, {t: parent[t] for t in pruned}, kept))
    return out


REF_CASES = [
    # (B, H, W, patch, ratio, cfg_halves, cfg_reference, recover_from, integer_scores)
    (1, 8, 8, (2, 2), 0.5, False, "cond", "base", False),
    (2, 6, 10, (2, 2), 0.3, True, "cond", "base", False),
    (2, 7, 5, (2, 2), 0.6, True, "uncond", "base", True),
    (3, 9, 4, (3, 2), 0.7, True, "cond", "kept", True),  # odd batch: no alignment
    (4, 5, 9, (2, 3), 0.4, True, "cond", "kept", False),
    (2, 4, 4, (2, 2), 0.75, False, "cond", "kept", True),  # K = N - nb: every non-base pruned
    (1, 3, 7, (1, 2), 0.5, False, "cond", "base", True),
]


@pytest.mark.parametrize("case", REF_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels", [6, 1])
def test_matches_reference_loops(case, seed, channels):
    # channels = 1: every cosine is exactly +1 or -1, so similarity ties are everywhere
    # and the tie rules (lowest token index pruned first, first parent) are checked exactly.
    bsz, h, w, patch, ratio, cfg, cfg_ref, rec, int_scores = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, h * w, channels, generator=g, dtype=torch.float64)
    if int_scores:  # many ties: exercises "lowest index wins"
        score = torch.randint(0, 3, (bsz, h, w), generator=g).double()
    else:
        score = torch.rand(bsz, h, w, generator=g, dtype=torch.float64)
    sel = select_tokens(x, score, ratio, (h, w), patch, cfg_halves=cfg, cfg_reference=cfg_ref, recover_from=rec)
    expected = ref_select(x, score, ratio, (h, w), patch, cfg, cfg_ref, rec)
    for b, (bases, pruned, parent, kept) in enumerate(expected):
        assert sel.base_index[b].tolist() == bases
        assert sel.pruned_index[b].tolist() == pruned
        assert sel.parent_index[b].tolist() == [parent[t] for t in pruned]
        assert sel.kept_index[b].tolist() == kept


def test_reference_example_by_hand():
    # A 2 x 4 grid, two 2 x 2 patches; scores put the bases at tokens 5 and 2.
    score = torch.tensor([[[0.0, 1.0, 9.0, 0.0], [0.0, 3.0, 1.0, 1.0]]])
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [1.0, 0.05], [0.0, 2.0], [-1.0, 0.0]]])
    sel = select_tokens(x, score, 0.5, (2, 4))  # K = min(4, 8 - 2) = 4
    assert sel.base_index.tolist() == [[2, 5]]
    # Max cosine: t6 1.0 (base 2), t0 0.99875 (base 5), t1 0.99816 (5), t3 0.99504 (2),
    # t4 0.7415 (5), t7 0.0 (base 2: cos 0 beats -0.99875). The top 4 are pruned.
    assert sel.pruned_index.tolist() == [[6, 0, 1, 3]]
    assert sel.parent_index.tolist() == [[2, 5, 5, 2]]
    assert sel.kept_index.tolist() == [[2, 5, 4, 7]]


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------


def _num_pruned(ratio, n, nb):
    return min(math.floor(ratio * n), n - nb) if nb > 0 and ratio > 0 else 0


def _cosine(x):
    """(B, N, C) -> (B, N, N) cosine similarity in float64 (tests only)."""
    xd = x.double()
    xn = xd / xd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return xn @ xn.transpose(1, 2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bsz=st.integers(1, 5),
    h=st.sampled_from(range(1, 10)),  # sampled_from: uniform, not biased to tiny grids
    w=st.sampled_from(range(1, 10)),
    patch=st.sampled_from([(2, 2), (2, 2), (1, 2), (2, 3), (3, 3), (1, 1)]),
    ratio=st.one_of(st.floats(0.1, 0.75), st.sampled_from([0.0, 0.01, 0.3, 0.5, 0.7, 0.75])),
    cfg=st.booleans(),
    cfg_ref=st.sampled_from(["cond", "uncond"]),
    rec=st.sampled_from(["base", "kept"]),
    score_kind=st.sampled_from(["none", "continuous", "ties"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_selection_properties(bsz, h, w, patch, ratio, cfg, cfg_ref, rec, score_kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n, c = h * w, 5
    x = torch.randn(bsz, n, c, generator=g).to(dtype)
    score = None
    if score_kind == "continuous":
        score = torch.rand(bsz, h, w, generator=g)
    elif score_kind == "ties":
        score = torch.randint(0, 2, (bsz, h, w), generator=g).float()
    gen_seed = seed + 1
    sel = select_tokens(
        x, score, ratio, (h, w), patch, cfg_halves=cfg, cfg_reference=cfg_ref,
        recover_from=rec, generator=torch.Generator().manual_seed(gen_seed),
    )
    sy, sx = patch
    gy, gx = h // sy, w // sx
    nb = gy * gx
    k = _num_pruned(ratio, n, nb)
    y = torch.randn(bsz, n - k, 3, generator=g).to(dtype)  # an unrelated tensor, other C

    assert sel.pruned_index.shape == (bsz, k) and sel.parent_index.shape == (bsz, k)
    assert sel.kept_index.shape == (bsz, n - k)
    assert sel.prune(x).shape == (bsz, n - k, c)
    assert sel.recover(y).shape == (bsz, n, 3)

    if ratio == 0.0:  # spec 6: the identity selection, the very same tensors
        assert sel.base_index.shape == (bsz, 0)
        assert sel.prune(x) is x and sel.recover(y) is y
        assert torch.equal(sel.kept_index, torch.arange(n).expand(bsz, n))
        return

    # Base tokens (spec 4, 7.3): one per complete patch, none in border patches, at the argmax.
    base = sel.base_index
    assert base.shape == (bsz, nb)
    rows, cols = base // w, base % w
    patch_id = (rows // sy) * gx + cols // sx
    assert bool((rows < gy * sy).all() and (cols < gx * sx).all())
    for b in range(bsz):
        assert sorted(patch_id[b].tolist()) == list(range(nb))
        assert base[b].tolist() == sorted(base[b].tolist())
    aligned = cfg and bsz % 2 == 0
    half = bsz // 2
    if aligned:  # spec 7.4
        assert torch.equal(base[:half], base[half:])
    if score is not None:
        for b in range(bsz):
            ref = (half + b % half if cfg_ref == "cond" else b % half) if aligned else b
            assert base[b].tolist() == ref_bases(score[ref], (h, w), patch)

    # Same generator seed -> same random bases.
    again = select_tokens(
        x, score, ratio, (h, w), patch, cfg_halves=cfg, cfg_reference=cfg_ref,
        recover_from=rec, generator=torch.Generator().manual_seed(gen_seed),
    )
    for name in ("base_index", "pruned_index", "parent_index", "kept_index"):
        assert torch.equal(getattr(sel, name), getattr(again, name))

    if k == 0:  # nothing to prune (tiny grid or no complete patch)
        assert sel.prune(x) is x and sel.recover(y) is y
        return

    kept, pruned, parent = sel.kept_index, sel.pruned_index, sel.parent_index
    for b in range(bsz):
        # Partition of all N tokens, no duplicates; base tokens kept first (spec 7.5).
        assert sorted(kept[b].tolist() + pruned[b].tolist()) == list(range(n))
        assert kept[b, :nb].tolist() == base[b].tolist()
        assert kept[b, nb:].tolist() == sorted(kept[b, nb:].tolist())
        allowed = set(base[b].tolist()) if rec == "base" else set(kept[b].tolist())
        assert set(parent[b].tolist()) <= allowed

    # Similarity optimality, with a float32 tolerance: parents are argmax cosine, the
    # pruned set is the top-K of the max cosine to the base tokens (spec 5).
    cos = _cosine(x)
    tol = 1e-5
    for b in range(bsz):
        bl = base[b]
        base_set = set(bl.tolist())
        others = [t for t in range(n) if t not in base_set]
        max_to_base = cos[b][others][:, bl].max(dim=1).values
        best = dict(zip(others, max_to_base.tolist()))
        kept_others = kept[b, nb:].tolist()
        if kept_others:
            assert min(best[t] for t in pruned[b].tolist()) >= max(best[t] for t in kept_others) - tol
        cand = bl if rec == "base" else kept[b]
        best_cand = cos[b][pruned[b]][:, cand].max(dim=1).values
        assert bool((cos[b, pruned[b], parent[b]] >= best_cand - tol).all())

    # prune / recover (spec 6, 7.6): exact row copies.
    xp = sel.prune(x)
    for b in range(bsz):
        assert torch.equal(xp[b], x[b, kept[b]])
    xr = sel.recover(xp)
    for b in range(bsz):
        assert torch.equal(xr[b, kept[b]], x[b, kept[b]])
        assert torch.equal(xr[b, pruned[b]], x[b, parent[b]])
    yr = sel.recover(y)
    for b in range(bsz):
        pos = {t: i for i, t in enumerate(kept[b].tolist())}
        assert torch.equal(yr[b, kept[b]], y[b])
        assert torch.equal(yr[b, pruned[b]], y[b, [pos[p] for p in parent[b].tolist()]])


def test_ratio_zero_is_identity_and_cheap():
    x = torch.randn(2, 64, 8)
    score = torch.rand(2, 8, 8)
    sel = select_tokens(x, score, 0.0, (8, 8), cfg_halves=True)
    assert sel.prune(x) is x
    h = torch.randn(2, 64, 8)
    assert sel.recover(h) is h
    assert sel.num_pruned == 0 and sel.num_kept == 64


def test_random_bases_are_reproducible_and_leave_global_rng_alone():
    x = torch.randn(4, 100, 8)
    state = torch.get_rng_state()
    a = select_tokens(x, None, 0.5, (10, 10), generator=torch.Generator().manual_seed(7))
    b = select_tokens(x, None, 0.5, (10, 10), generator=torch.Generator().manual_seed(7))
    c = select_tokens(x, None, 0.5, (10, 10), generator=torch.Generator().manual_seed(8))
    d1 = select_tokens(x, None, 0.5, (10, 10))  # no generator: a fixed default seed
    d2 = select_tokens(x, None, 0.5, (10, 10))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.base_index, b.base_index) and torch.equal(a.pruned_index, b.pruned_index)
    assert not torch.equal(a.base_index, c.base_index)  # 25 patches x 4 choices: a clash is ~1e-15
    assert torch.equal(d1.base_index, d2.base_index)
    # Random bases differ between samples (no accidental alignment) unless cfg_halves.
    assert not torch.equal(a.base_index[0], a.base_index[1])
    e = select_tokens(x, None, 0.5, (10, 10), cfg_halves=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(e.base_index[:2], e.base_index[2:])


def test_similarity_matrix_is_never_n_by_n(monkeypatch):
    shapes = []
    real_bmm = torch.bmm

    def spy(a, b):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real_bmm(a, b)

    monkeypatch.setattr(torch, "bmm", spy)
    x = torch.randn(2, 256, 16)
    select_tokens(x, torch.rand(2, 16, 16), 0.5, (16, 16))
    assert shapes == [((2, 192, 16), (2, 16, 64))]  # (N - nb) x nb
    shapes.clear()
    select_tokens(x, torch.rand(2, 16, 16), 0.5, (16, 16), recover_from="kept")
    assert shapes == [((2, 192, 16), (2, 16, 64)), ((2, 128, 16), (2, 16, 64))]  # + K x (N - nb - K)


def test_bad_arguments_raise():
    x = torch.randn(2, 64, 8)
    with pytest.raises(ValueError, match="hw"):
        select_tokens(x, None, 0.5, (8, 7))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_tokens(x, None, 1.0, (8, 8))
    with pytest.raises(ValueError, match="diff_score"):
        select_tokens(x, torch.rand(2, 4, 4), 0.5, (8, 8))
    sel = select_tokens(x, None, 0.5, (8, 8))
    with pytest.raises(ValueError, match="prune"):
        sel.prune(torch.randn(2, 63, 8))
    with pytest.raises(ValueError, match="recover"):
        sel.recover(torch.randn(2, 64, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32 * 32, 64, generator=g).to(dtype)
    score = torch.rand(2, 32, 32, generator=g)
    for s in (score, None):
        kw = dict(cfg_halves=True, recover_from="kept")
        cpu = select_tokens(x, s, 0.5, (32, 32), generator=torch.Generator().manual_seed(3), **kw)
        gpu = select_tokens(
            x.cuda(), None if s is None else s.cuda(), 0.5, (32, 32),
            generator=torch.Generator().manual_seed(3), **kw,
        )
        assert torch.equal(cpu.base_index, gpu.base_index.cpu())
        # Matmul rounding may differ between devices: compare pruned sets loosely.
        overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(cpu.pruned_index, gpu.pruned_index.cpu())]
        assert min(overlap) >= 0.95 * cpu.num_pruned
        xg = x.cuda()
        back = gpu.recover(gpu.prune(xg))
        assert torch.equal(back.gather(1, gpu.kept_index.unsqueeze(-1).expand(-1, -1, 64)), gpu.prune(xg))


# ---------------------------------------------------------------------------
# DiffScore and pooling (spec 3)
# ---------------------------------------------------------------------------


def test_diff_score_is_channel_mean_of_abs_difference():
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    got = diff_score(f1, f2)
    assert got.shape == (2, 4, 5)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                want = sum(abs(float(f1[b, ch, i, j]) - float(f2[b, ch, i, j])) for ch in range(3)) / 3
                assert got[b, i, j].item() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert torch.equal(diff_score(f1, f1), torch.zeros(2, 4, 5))
    assert diff_score(f1.half(), f2.half()).dtype == torch.float32
    with pytest.raises(ValueError):
        diff_score(f1, f2[:, :2])


def test_pool_score_averages_cells():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 8, 6, generator=g)
    assert pool_score(s, (8, 6)) is s
    got = pool_score(s, (4, 3))
    assert got.shape == (2, 4, 3)
    for b in range(2):
        for i in range(4):
            for j in range(3):
                cell = [float(s[b, 2 * i + di, 2 * j + dj]) for di in range(2) for dj in range(2)]
                assert got[b, i, j].item() == pytest.approx(sum(cell) / 4, rel=1e-6)
    got = pool_score(s, (2, 1))
    assert got[1, 0, 0].item() == pytest.approx(s[1, :4].mean().item(), rel=1e-6)
    # Non-divisible grid (odd latent sides): cell i covers floor(i*H/h) .. ceil((i+1)*H/h).
    s = torch.rand(1, 5, 3, generator=g)
    got = pool_score(s, (3, 2))
    for i in range(3):
        r0, r1 = (i * 5) // 3, -((-(i + 1) * 5) // 3)
        for j in range(2):
            c0, c1 = (j * 3) // 2, -((-(j + 1) * 3) // 2)
            assert got[0, i, j].item() == pytest.approx(s[0, r0:r1, c0:c1].mean().item(), rel=1e-6)
