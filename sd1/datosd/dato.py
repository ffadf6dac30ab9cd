"""DaTo token selection: base tokens, pruned tokens, prune and recover closures.

Pure tensor functions in the style of ``tomesd/merge.py``: nothing here knows
about models. ``select_tokens`` computes its indices once and returns closures
that apply them. Section numbers refer to ``docs/DATO_SPEC.md``.

Shapes: B batch, N = H * W tokens on an H x W grid, C channels, nb base tokens,
K pruned tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["TokenSelection", "select_tokens", "diff_score", "pool_score"]

CfgReference = Literal["cond", "uncond"]
RecoverFrom = Literal["base", "kept"]

# Seed of the generator used when select_tokens draws random base tokens without
# a generator: fixed, so such a run is still reproducible and never touches the
# global RNG (spec 3).
DEFAULT_BASE_SEED = 0
_EPS = 1e-12  # as F.normalize: a zero token has similarity 0 to everything


def _flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) per-sample row indices into (B, n, C) -> (B * K,) row indices into (B * n, C)."""
    offset = torch.arange(index.shape[0], device=index.device).mul_(n).unsqueeze(1)
    return (index + offset).reshape(-1)


def _take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t: (B, N, C), index: (B, K) -> (B, K, C), t[b, index[b, j]] (a row copy, faster than gather)."""
    b, n, c = t.shape
    return t.reshape(b * n, c).index_select(0, _flat_rows(index, n)).view(b, index.shape[1], c)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class TokenSelection:
    """The tokens one block keeps and prunes, and the closures that apply that choice.

    Attributes:
        base_index: (B, nb) token indices of the base tokens, ascending (spec 4).
            (B, 0) for the identity selection of ratio 0.
        pruned_index: (B, K) indices of the pruned tokens, most similar first (spec 5).
        parent_index: (B, K) index of the token each pruned token copies its output from.
        kept_index: (B, N - K) indices of the kept tokens in the order ``prune``
            returns them: the base tokens first (as in ``base_index``), then the
            kept non-base tokens ascending. ``arange(N)`` when nothing is pruned.
        prune: (B, N, C) -> (B, N - K, C), the rows ``kept_index`` (any C). When
            K = 0 it returns its argument itself.
        recover: (B, N - K, C) -> (B, N, C): each kept token back at its place,
            each pruned token a copy of its parent's row (spec 6). When K = 0 it
            returns its argument itself.
    """

    base_index: torch.Tensor
    pruned_index: torch.Tensor
    parent_index: torch.Tensor
    kept_index: torch.Tensor
    prune: Callable[[torch.Tensor], torch.Tensor]
    recover: Callable[[torch.Tensor], torch.Tensor]

    @property
    def num_pruned(self) -> int:
        """K, the number of pruned tokens per sample."""
        return self.pruned_index.shape[1]

    @property
    def num_kept(self) -> int:
        """N - K, the number of tokens self-attention sees."""
        return self.kept_index.shape[1]


def _identity_selection(
    batch: int, n: int, device: torch.device, base_index: Optional[torch.Tensor] = None
) -> TokenSelection:
    """A selection that prunes nothing; prune and recover return their input itself (spec 6, r = 0)."""
    empty = torch.empty(batch, 0, dtype=torch.long, device=device)
    return TokenSelection(
        base_index=empty if base_index is None else base_index,
        pruned_index=empty,
        parent_index=empty,
        kept_index=torch.arange(n, device=device).expand(batch, n),
        prune=_identity,
        recover=_identity,
    )


def _base_local_index(
    score: Optional[torch.Tensor],
    batch: int,
    grid: Tuple[int, int],
    patch: Tuple[int, int],
    device: torch.device,
    generator: Optional[torch.Generator],
    random_local: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Position of the base token inside each complete patch, (batch, nb) in 0 .. sy*sx - 1.

    score: (batch, H, W) DiffScore, or None for random positions: ``random_local`` (batch, nb) when given
    (drawn by the caller), else a uniform draw from ``generator``.
    Positions are row-major inside the patch, so lower position = lower token index.
    """
    (gy, gx), (sy, sx) = grid, patch
    if score is not None:
        # Spec 4: argmax of DiffScore in each complete sy x sx patch; argmax returns
        # the first maximum, i.e. the lowest token index on ties.
        s = score[:, : gy * sy, : gx * sx].reshape(batch, gy, sy, gx, sx)
        s = s.permute(0, 1, 3, 2, 4).reshape(batch, gy * gx, sy * sx)
        return s.argmax(dim=-1).to(device)
    # Spec 3: no DiffScore yet -> one random base token per patch, never from the global RNG.
    if random_local is not None:
        if tuple(random_local.shape) != (batch, gy * gx):
            raise ValueError(f"random_local must be (B, nb) = {(batch, gy * gx)}, got {tuple(random_local.shape)}")
        return random_local.to(device)
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_BASE_SEED)
    local = torch.randint(
        sy * sx, (batch, gy * gx), generator=generator, device=generator.device
    )
    return local.to(device)


def select_tokens(
    x: torch.Tensor,
    diff_score: Optional[torch.Tensor],
    ratio: float,
    hw: Tuple[int, int],
    patch: Tuple[int, int] = (2, 2),
    cfg_halves: bool = False,
    cfg_reference: CfgReference = "cond",
    recover_from: RecoverFrom = "base",
    generator: Optional[torch.Generator] = None,
    random_local: Optional[torch.Tensor] = None,
) -> TokenSelection:
    """Choose base, pruned and kept tokens of one block (DaTo, spec 4-6).

    Args:
        x: (B, N, C) input of the transformer block (before ``norm1``).
        diff_score: (B, H, W) DiffScore (spec 3), or None to draw the base tokens
            at random, one per patch, from ``generator``.
        ratio: prune ratio r in [0, 1); K = min(floor(r * N), N - nb) tokens are
            pruned per sample (0 when the grid holds no complete patch: nothing to
            copy from). r = 0 returns the identity selection without any work
            (``base_index`` is then (B, 0)); K = 0 with r > 0 also prunes nothing
            but still reports the base tokens.
        hw: (H, W) token grid, H * W == N.
        patch: (sy, sx) patch size; one base token per complete patch.
        cfg_halves: the batch is [uncond; cond]; both halves then use the base
            positions of the ``cfg_reference`` half (spec 4). Ignored for odd B.
        cfg_reference: "cond" (paper) or "uncond" (released code).
        recover_from: "base" (paper): a pruned token copies its most similar base
            token; "kept" (released code): its most similar kept token.
        generator: source of the random base tokens when ``diff_score`` is None
            (on any device); None uses a fresh generator seeded with
            ``DEFAULT_BASE_SEED``. The global RNG is never used.
        random_local: (B_ref, nb) random base positions inside each patch (0 .. sy*sx - 1)
            drawn by the caller, used instead of ``generator`` when ``diff_score`` is
            None; B_ref is B // 2 when the halves are aligned, else B. Drawing them
            outside keeps this function free of generator calls (compilable).

    Returns:
        A ``TokenSelection``. Ties: base tokens and pruned tokens go to the lowest
        token index, a parent to the first candidate in ``kept_index`` order.
        Similarities are computed in float32 (float64 for float64 input).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
    batch, n, _ = x.shape
    h, w = hw
    if h * w != n:
        raise ValueError(f"hw = {tuple(hw)} gives {h * w} tokens but x has N = {n}; pass the block's token grid")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    sy, sx = patch
    if sy < 1 or sx < 1:
        raise ValueError(f"patch sides must be >= 1, got {tuple(patch)}")
    if cfg_reference not in ("cond", "uncond"):
        raise ValueError(f"cfg_reference must be 'cond' or 'uncond', got {cfg_reference!r}")
    if recover_from not in ("base", "kept"):
        raise ValueError(f"recover_from must be 'base' or 'kept', got {recover_from!r}")
    if diff_score is not None and tuple(diff_score.shape) != (batch, h, w):
        raise ValueError(
            f"diff_score must be (B, H, W) = {(batch, h, w)}, got {tuple(diff_score.shape)};"
            " pool it to the block's grid with pool_score"
        )

    device = x.device
    if ratio == 0.0:
        return _identity_selection(batch, n, device)  # spec 6: r = 0 -> unpatched block

    gy, gx = h // sy, w // sx
    nb = gy * gx  # spec 4: incomplete border patches hold no base token
    k = min(math.floor(ratio * n), n - nb) if nb > 0 else 0  # spec 5
    m = n - nb  # non-base tokens per sample

    # --- Base tokens (spec 4), with CFG alignment -------------------------------
    aligned = cfg_halves and batch % 2 == 0 and batch > 0
    half = batch // 2
    if aligned:
        ref = slice(half, batch) if cfg_reference == "cond" else slice(0, half)
        ref_score = None if diff_score is None else diff_score[ref]
        local = _base_local_index(ref_score, half, (gy, gx), patch, device, generator, random_local).repeat(2, 1)
    else:
        local = _base_local_index(diff_score, batch, (gy, gx), patch, device, generator, random_local)
    rows = torch.arange(gy, device=device).mul_(sy * w).view(gy, 1)
    cols = torch.arange(gx, device=device).mul_(sx).view(1, gx)
    origin = (rows + cols).view(1, nb)  # top-left token of each complete patch
    base_unsorted = origin + torch.div(local, sx, rounding_mode="floor") * w + local % sx

    # One stable sort of the base mask gives the non-base tokens ascending, then the
    # base tokens ascending.
    is_base = torch.zeros(batch, n, dtype=torch.uint8, device=device)
    is_base.scatter_(1, base_unsorted, 1)
    order = torch.argsort(is_base, dim=1, stable=True)
    nonbase_index, base_index = order[:, :m], order[:, m:]
    if k == 0:
        return _identity_selection(batch, n, device, base_index)

    # --- Pruned tokens (spec 5): max cosine of each non-base token to the base tokens
    # cos(a, b) = a.b / (|a| |b|): divide only the nb base rows by their norm, and each
    # non-base row's maximum by |a| afterwards (same argmax, far fewer divisions).
    sim_dtype = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(sim_dtype)
    norm = torch.linalg.vector_norm(xs, dim=-1).clamp_min_(_EPS)  # (B, N)
    x_base = _take_rows(xs, base_index) / norm.gather(1, base_index).unsqueeze(-1)
    x_other = _take_rows(xs, nonbase_index)
    other_norm = norm.gather(1, nonbase_index)
    sim = torch.bmm(x_other, x_base.transpose(1, 2))  # (B, N - nb, nb), never N x N
    best_sim, best_base = sim.max(dim=-1)  # first maximum -> lowest base index
    del sim
    best_sim = best_sim / other_norm  # max cosine similarity, (B, N - nb)
    # Top-K by max similarity; the stable sort makes ties go to the lowest token index.
    rank = torch.sort(best_sim, dim=1, descending=True, stable=True).indices
    pruned_pos, kept_pos = rank[:, :k], rank[:, k:]
    kept_pos = torch.sort(kept_pos, dim=1).values  # kept non-base tokens ascending
    pruned_index = nonbase_index.gather(1, pruned_pos)
    kept_other_index = nonbase_index.gather(1, kept_pos)
    kept_index = torch.cat([base_index, kept_other_index], dim=1)  # base first: parents are direct

    # Parent position in kept_index order (spec 6). Base tokens sit at 0 .. nb - 1.
    parent_pos = best_base.gather(1, pruned_pos)
    if recover_from == "kept" and m > k:
        # Released code: copy from the most similar kept token, base or not.
        x_other = x_other / other_norm.unsqueeze(-1)
        x_pruned, x_kept = _take_rows(x_other, pruned_pos), _take_rows(x_other, kept_pos)
        sim_kept, best_kept = torch.bmm(x_pruned, x_kept.transpose(1, 2)).max(dim=-1)
        closer = sim_kept > best_sim.gather(1, pruned_pos)  # ties stay with the base token
        parent_pos = torch.where(closer, best_kept + nb, parent_pos)
    parent_index = kept_index.gather(1, parent_pos)

    # source[b, t]: row of the pruned tensor that token t takes back in recover.
    source = torch.empty(batch, n, dtype=torch.long, device=device)
    source.scatter_(1, kept_index, torch.arange(n - k, device=device).expand(batch, n - k))
    source.scatter_(1, pruned_index, parent_pos)
    # Row indices into the flattened (B * N, C) / (B * (N - K), C) tensors.
    kept_rows = _flat_rows(kept_index, n)
    source_rows = _flat_rows(source, n - k)

    def _check(t: torch.Tensor, length: int, what: str) -> None:
        if t.dim() != 3 or t.shape[0] != batch or t.shape[1] != length:
            raise ValueError(f"{what} expects (B, {length}, C) with B = {batch}, got {tuple(t.shape)}")

    def prune(t: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - K, C): the kept tokens in kept_index order."""
        _check(t, n, "prune")
        c_t = t.shape[-1]
        return t.reshape(batch * n, c_t).index_select(0, kept_rows).view(batch, n - k, c_t)

    def recover(t: torch.Tensor) -> torch.Tensor:
        """(B, N - K, C) -> (B, N, C): kept rows back in place, pruned rows = parent's row."""
        _check(t, n - k, "recover")
        c_t = t.shape[-1]
        return t.reshape(batch * (n - k), c_t).index_select(0, source_rows).view(batch, n, c_t)

    return TokenSelection(
        base_index=base_index,
        pruned_index=pruned_index,
        parent_index=parent_index,
        kept_index=kept_index,
        prune=prune,
        recover=recover,
    )


def diff_score(newer: torch.Tensor, older: torch.Tensor) -> torch.Tensor:
    """DiffScore = mean over channels of |F1 - F2| (spec 3).

    newer, older: (B, C, H, W) feature maps (F1 the newer). Returns (B, H, W),
    computed and returned in float32 (float64 for float64 input).
    """
    if newer.shape != older.shape or newer.dim() != 4:
        raise ValueError(
            f"diff_score needs two (B, C, H, W) maps of the same shape, got {tuple(newer.shape)} and {tuple(older.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(newer.dtype, older.dtype), torch.float32)
    return (newer.to(dtype) - older.to(dtype)).abs().mean(dim=1)


def pool_score(score: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Average-pool a (B, H, W) DiffScore to a block's (h, w) grid (spec 3, max_downsample > 1).

    When H, W are multiples of h, w this is the mean over each (H/h) x (W/w)
    cell; otherwise adaptive average pooling. Returns ``score`` itself when the
    grid already matches.
    """
    if score.dim() != 3:
        raise ValueError(f"score must be (B, H, W), got shape {tuple(score.shape)}")
    if tuple(score.shape[1:]) == tuple(hw):
        return score
    return F.adaptive_avg_pool2d(score.unsqueeze(1), tuple(hw)).squeeze(1)
