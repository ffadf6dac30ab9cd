"""datosd.apply_patch on the tiny model: spec section 2 (caching) and the invariants of section 7."""
import pytest
import torch

import datosd.caching as caching_module
from datosd import Strategy, StrategyError
from datosd.patch import apply_patch, remove_patch
from helpers import build, golden_model, tiny_unet_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.hooks import SamplingHook
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import seeded_random_weights

BLOCKS = [f"input_blocks.{k}" for k in range(12)] + ["middle_block"] + [f"output_blocks.{j}" for j in range(12)]
SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler}


@pytest.fixture(scope="module")
def model():
    return golden_model()


@pytest.fixture(scope="module")
def conditioning(model):
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red fox", "a blue bird"])
        uc = model.get_learned_conditioning(["", ""])
    return c, uc


def sample(model, conditioning, sampler="ddim", steps=5, hw=(16, 16), scale=7.5, seed=0, batch=2):
    c, uc = conditioning
    c, uc = c[:1].expand(batch, -1, -1), uc[:1].expand(batch, -1, -1)
    x_T = torch.randn((batch, 4, *hw), generator=torch.Generator().manual_seed(seed))
    samples, _ = SAMPLERS[sampler](model).sample(
        S=steps, conditioning=c, batch_size=batch, shape=[4, *hw], unconditional_guidance_scale=scale,
        unconditional_conditioning=uc if scale != 1.0 else None, x_T=x_T, verbose=False, disable_progress=True)
    return samples


class CallRecorder(SamplingHook):
    """Records, for every UNet call, the sampler step it belongs to, the blocks that ran and the output."""

    def __init__(self, model):
        self.model = model
        self.unet = model.model.diffusion_model
        self.step = None
        self.calls = []
        self.handles = [self.unet.register_forward_pre_hook(self._call_started),
                        self.unet.register_forward_hook(self._call_finished)]
        for name in BLOCKS:
            self.handles.append(self.unet.get_submodule(name).register_forward_hook(
                lambda m, a, out, name=name: self.calls[-1]["blocks"].add(name)))
        self.handles.append(self.unet.output_blocks[11].register_forward_hook(
            lambda m, a, out: self.calls[-1].__setitem__("feature", out)))

    def step_started(self, step):
        self.step = step

    def _call_started(self, module, args):
        self.calls.append({"step": self.step, "blocks": set(), "feature": None})

    def _call_finished(self, module, args, out):
        self.calls[-1]["out"] = out

    def __enter__(self):
        self.model.sampling_hooks.add(self)
        return self

    def __exit__(self, *exc):
        self.model.sampling_hooks.remove(self)
        for h in self.handles:
            h.remove()


def blocks_for_depth(depth):
    """Spec 2: the blocks a call at cache depth `depth` computes."""
    if depth >= 12:
        return set(BLOCKS)
    return ({f"input_blocks.{k}" for k in range(depth)}
            | {f"output_blocks.{j}" for j in range(12) if 11 - j < depth})


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_full_strategy_is_bit_identical_and_remove_restores(model, conditioning, sampler):
    reference = sample(model, conditioning, sampler)
    apply_patch(model, Strategy.full(5))
    try:
        patched = sample(model, conditioning, sampler)
        again = sample(model, conditioning, sampler)
    finally:
        remove_patch(model)
    restored = sample(model, conditioning, sampler)
    assert torch.equal(patched, reference)
    assert torch.equal(again, reference)
    assert torch.equal(restored, reference)
    assert type(model.model.diffusion_model).__name__ == "UNetModel"
    assert len(model.sampling_hooks) == 0


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
@pytest.mark.parametrize("steps,interval,depth", [(5, 2, 0), (5, 2, 1), (5, 3, 2), (5, 1, 12),
                                                  (50, 3, 1), (50, 5, 0)])
def test_cached_blocks_follow_the_depth(model, conditioning, sampler, steps, interval, depth):
    strategy = Strategy.uniform(steps, interval, depth)
    apply_patch(model, strategy)
    try:
        with CallRecorder(model) as recorder:
            sample(model, conditioning, sampler, steps=steps, hw=(8, 8), scale=1.0, batch=1)
    finally:
        remove_patch(model)
    expected_calls = steps + (1 if sampler == "plms" else 0)
    assert len(recorder.calls) == expected_calls
    for call in recorder.calls:
        step = call["step"]
        depth_run = 12 if step == 0 else strategy.cache_depth[step]
        assert call["blocks"] == blocks_for_depth(depth_run), (step, depth_run)
    for previous, call in zip(recorder.calls, recorder.calls[1:]):
        if not call["blocks"]:  # depth 0: the noise prediction is the last computed one
            assert torch.equal(call["out"], previous["out"])
    if sampler == "plms":
        assert [c["step"] for c in recorder.calls[:3]] == [0, 0, 1]
        assert recorder.calls[1]["blocks"] == set(BLOCKS)


def test_wrong_length_strategy_fails_before_any_unet_call(model, conditioning):
    apply_patch(model, Strategy.full(50))
    try:
        with CallRecorder(model) as recorder, pytest.raises(StrategyError, match="50 steps"):
            sample(model, conditioning, steps=5)
    finally:
        remove_patch(model)
    assert recorder.calls == []


def attention_lengths(model):
    """Hook every attn1 and record (module name, number of query tokens) per call."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, args[0].shape[1])))
               for name, m in model.named_modules() if name.endswith("attn1")]
    return seen, handles


LEVEL_OF_BLOCK = {1: 0, 2: 0, 4: 1, 5: 1, 7: 2, 8: 2}  # input block -> downsampling level
LEVEL_OF_OUTPUT = {9: 0, 10: 0, 11: 0, 6: 1, 7: 1, 8: 1, 3: 2, 4: 2, 5: 2}


def block_level(name):
    """Downsampling level (0 = full resolution) of the transformer block an attn1 module belongs to."""
    name = name.split("diffusion_model.")[-1]
    kind = name.split(".")[0]
    if kind == "middle_block":
        return 3
    index = int(name.split(".")[1])
    return LEVEL_OF_BLOCK[index] if kind == "input_blocks" else LEVEL_OF_OUTPUT[index]


@pytest.mark.parametrize("max_downsample", [1, 2])
def test_self_attention_sees_kept_tokens_only(model, conditioning, max_downsample):
    apply_patch(model, Strategy.constant_ratio(5, 0.5), max_downsample=max_downsample)
    seen, handles = attention_lengths(model)
    try:
        sample(model, conditioning, steps=5, hw=(16, 24))
    finally:
        remove_patch(model)
        for h in handles:
            h.remove()
    assert len(seen) == 5 * 16
    for name, length in seen:
        level = block_level(name)
        n = (16 >> level) * (24 >> level)
        pruned = 2 ** level <= max_downsample
        n_base = n // 4  # 2x2 patches tile these grids exactly
        expected = n - min(int(0.5 * n), n - n_base) if pruned else n
        assert length == expected, (name, n, length)


def recording_selections(monkeypatch):
    """Spy on the selections the patch makes: list of (x, selection) per pruned block call."""
    made = []
    original = caching_module.select_tokens

    def spy(x, *args, **kwargs):
        selection = original(x, *args, **kwargs)
        made.append((x, args, kwargs, selection))
        return selection

    monkeypatch.setattr(caching_module, "select_tokens", spy)
    return made


@pytest.mark.parametrize("align_cfg,reference", [(True, "cond"), (True, "uncond"), (False, "cond")])
def test_cfg_alignment_and_diff_score(model, conditioning, monkeypatch, align_cfg, reference):
    made = recording_selections(monkeypatch)
    apply_patch(model, Strategy.constant_ratio(5, 0.5), align_cfg=align_cfg, cfg_reference=reference)
    try:
        with CallRecorder(model) as recorder:
            sample(model, conditioning, steps=5, hw=(16, 16))
    finally:
        remove_patch(model)
    per_call = 5  # pruned blocks per call at 16x16: input 1, 2 and output 9, 10, 11
    assert len(made) == per_call * len(recorder.calls)
    for call_index, call in enumerate(recorder.calls):
        for x, args, kwargs, selection in made[call_index * per_call:(call_index + 1) * per_call]:
            assert kwargs["cfg_halves"] is align_cfg
            base = selection.base_index
            if align_cfg:
                assert torch.equal(base[:2], base[2:])
            if call_index < 2:
                assert args[0] is None  # random base tokens until two feature maps exist
                continue
            newer, older = recorder.calls[call_index - 1]["feature"], recorder.calls[call_index - 2]["feature"]
            score = (newer - older).abs().mean(dim=1)  # spec 3
            assert torch.allclose(args[0], score)
            patches = score.reshape(4, 8, 2, 8, 2).permute(0, 1, 3, 2, 4).reshape(4, 64, 4)
            local = patches.argmax(dim=-1)
            rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
            expected = (rows.reshape(-1) * 2 + local // 2) * 16 + cols.reshape(-1) * 2 + local % 2
            if align_cfg:
                source = expected[2:] if reference == "cond" else expected[:2]
                expected = torch.cat([source, source])
            assert torch.equal(base.sort(dim=1).values, expected.sort(dim=1).values)


def test_same_seed_same_samples_and_no_state_leak(model, conditioning):
    strategy = Strategy([12, 1, 0, 2, 1], [0.7, 0.5, 0.3, 0.6, 0.4])
    apply_patch(model, strategy, seed=3)
    try:
        first = sample(model, conditioning, "plms")
        second = sample(model, conditioning, "plms")
        other_seed = sample(model, conditioning, "plms", seed=1)
        third = sample(model, conditioning, "plms")
    finally:
        remove_patch(model)
    assert torch.equal(first, second)
    assert torch.equal(first, third)
    assert not torch.equal(first, other_seed)


def test_two_patched_models_do_not_interfere(conditioning):
    a, b = golden_model(), golden_model()
    apply_patch(a, Strategy.uniform(5, 2, 1, ratio=0.5))
    apply_patch(b, Strategy.full(5))
    reference = sample(golden_model(), conditioning)
    assert torch.equal(sample(b, conditioning), reference)
    assert not torch.equal(sample(a, conditioning), reference)
    assert torch.equal(sample(b, conditioning), reference)


@pytest.mark.parametrize("batch,scale,hw", [(1, 1.0, (16, 16)), (3, 7.5, (8, 24)), (5, 1.0, (24, 8))])
def test_any_batch_guidance_and_latent_shape(model, conditioning, batch, scale, hw):
    reference = sample(model, conditioning, batch=batch, scale=scale, hw=hw)
    apply_patch(model, Strategy([12, 1, 0, 12, 2], [0.0] * 5))
    try:
        cached = sample(model, conditioning, batch=batch, scale=scale, hw=hw)
        apply_patch(model, Strategy([12, 1, 0, 12, 2], [0.7, 0.5, 0.4, 0.3, 0.6]))
        dato = sample(model, conditioning, batch=batch, scale=scale, hw=hw)
    finally:
        remove_patch(model)
    assert cached.shape == dato.shape == reference.shape
    assert torch.isfinite(dato).all()
    assert not torch.equal(cached, reference)
    assert not torch.equal(dato, cached)


def test_v2_layout_unet_patched_directly():
    """SD 2.x layout (linear projections, head width) through the UNet-level API with explicit steps."""
    unet = seeded_random_weights(build(tiny_unet_config(use_linear_in_transformer=True, num_heads=-1,
                                                        num_head_channels=4)), seed=2).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 77, 16, generator=g), torch.tensor([500] * 2)
    with torch.no_grad():
        reference = unet(x, t, context=ctx)
        state = apply_patch(unet, Strategy([12, 1, 0], [0.5, 0.5, 0.0]))
        state.sampling_started(3)
        outputs = []
        for step in range(3):
            state.step_started(step)
            outputs.append(unet(x, t, context=ctx))
        remove_patch(unet)
        restored = unet(x, t, context=ctx)
    assert [c.kind for c in state.calls] == ["full", "partial", "reused"]
    assert not torch.equal(outputs[0], reference)  # pruned at ratio 0.5
    assert torch.equal(outputs[2], outputs[1])
    assert torch.equal(restored, reference)


def test_bad_options_are_rejected(model):
    with pytest.raises(ValueError, match="diff_source"):
        apply_patch(model, None, diff_source="latents")
    with pytest.raises(ValueError, match="prune_ratio"):
        apply_patch(model, None, prune_ratio=1.2)
    with pytest.raises(TypeError, match="LatentDiffusion or UNetModel"):
        apply_patch(torch.nn.Linear(2, 2))
    assert type(model.model.diffusion_model).__name__ == "UNetModel"


def selections_with_score_noise(model, conditioning, monkeypatch, score_noise, seed):
    """Per pruning block call of one guided DDIM run: (score passed to select_tokens, base_index, DiffScore
    of the call computed here from the recorded output_blocks[11] maps, or None)."""
    made = recording_selections(monkeypatch)
    apply_patch(model, Strategy.constant_ratio(4, 0.5), seed=seed, score_noise=score_noise)
    try:
        with CallRecorder(model) as recorder:
            sample(model, conditioning, steps=4, hw=(16, 16))
    finally:
        remove_patch(model)
        monkeypatch.undo()
    per_call = len(made) // len(recorder.calls)
    out = []
    for i, (x, args, kwargs, selection) in enumerate(made):
        call = i // per_call
        expected = None
        if call >= 2:
            newer, older = recorder.calls[call - 1]["feature"], recorder.calls[call - 2]["feature"]
            expected = (newer - older).abs().mean(dim=1)  # spec 3
        out.append((args[0], selection.base_index, expected))
    return out


def test_score_noise_is_seeded_and_follows_the_released_rule(model, conditioning, monkeypatch):
    noisy = selections_with_score_noise(model, conditioning, monkeypatch, (0.1, 0.1), seed=0)
    again = selections_with_score_noise(model, conditioning, monkeypatch, (0.1, 0.1), seed=0)
    other = selections_with_score_noise(model, conditioning, monkeypatch, (0.1, 0.1), seed=1)
    assert len(noisy) == 20  # 4 calls x 5 pruning blocks at 16x16
    assert all(torch.equal(a[1], b[1]) for a, b in zip(noisy, again))  # one seed: identical base tokens
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(noisy, other))  # two seeds: different ones
    # Until two feature maps exist there is no score (random base tokens, drawn as without noise).
    assert all(score is None for score, _, _ in noisy[:10])
    # With no noise weight the released rule is +-w * DiffScore, the sign drawn per block.
    signs = set()
    for score, base, expected in selections_with_score_noise(model, conditioning, monkeypatch, (0.5, 0.0), 3)[10:]:
        sign = 1 if torch.sum(score * expected) > 0 else -1
        assert torch.allclose(score, sign * 0.5 * expected, atol=1e-6)
        signs.add(sign)
    assert signs == {1, -1}
    # With noise, the score is not a multiple of DiffScore.
    score, _, expected = noisy[12]
    assert not torch.allclose(score.abs(), 0.1 * expected, atol=1e-3)


def test_score_noise_off_passes_the_plain_diff_score(model, conditioning, monkeypatch):
    for score, _, expected in selections_with_score_noise(model, conditioning, monkeypatch, None, seed=0)[10:]:
        assert torch.allclose(score, expected)


def test_score_noise_weights_are_checked(model):
    with pytest.raises(ValueError, match="score_noise"):
        apply_patch(model, None, score_noise=(0.1, -1.0))


class NoHooks(torch.nn.Module):
    """An ldm-like wrapper (model.model.diffusion_model) without sampling hooks."""

    def __init__(self, unet):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet


def test_a_model_without_sampling_hooks_is_refused_with_how_to_drive_the_state(model):
    unet = model.model.diffusion_model
    with pytest.raises(TypeError, match=r"state\.sampling_started\(num_steps\).*state\.step_started\(i\)"):
        apply_patch(NoHooks(unet), Strategy.full(5))
    assert type(unet).__name__ == "UNetModel" and not hasattr(unet, "_dato")


def test_tomesd_patched_blocks_are_refused(model):
    import tomesd

    tomesd.apply_patch(model, ratio=0.5)
    try:
        with pytest.raises(TypeError, match="patched by tomesd"):
            apply_patch(model, Strategy.constant_ratio(5, 0.5))
        state = apply_patch(model, Strategy.uniform(5, 2, 1))  # caching alone leaves the blocks to tomesd
        assert state.config.prunes is False
    finally:
        remove_patch(model)
        tomesd.remove_patch(model)


DATOSD_ALONE = r"""
import importlib.abc, sys

class NoHigherLayers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sdgen", "sdeval", "dato_search", "dato_tables"):
            raise ImportError(f"{name} is blocked: datosd must not need it")
        return None

sys.meta_path.insert(0, NoHigherLayers())
import torch
from omegaconf import OmegaConf
import datosd
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import load_model_from_config

config, weights, b1 = sys.argv[1:4]
model = load_model_from_config(OmegaConf.load(config), weights, verbose=False)
state = datosd.apply_patch(model, "b1")
shipped = datosd.Strategy.load(b1)
assert state.strategy.name == "b1"
assert (state.strategy.cache_depth, state.strategy.prune_ratio) == (shipped.cache_depth, shipped.prune_ratio)
with torch.no_grad():
    c, uc = model.get_learned_conditioning(["a red fox"]), model.get_learned_conditioning([""])
    PLMSSampler(model).sample(S=50, conditioning=c, batch_size=1, shape=[4, 8, 8], unconditional_guidance_scale=7.5,
                              unconditional_conditioning=uc, verbose=False, disable_progress=True,
                              x_T=torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
kinds = [call.kind for call in state.calls]
print({kind: kinds.count(kind) for kind in ("full", "partial", "reused")})
assert not any(name.split(".")[0] == "sdgen" for name in sys.modules)
"""


def test_datosd_patches_with_the_shipped_b1_without_sdgen():
    """datosd alone (sdgen, sdeval and the tools cannot be imported) finds its shipped b1 by name, and the 50 PLMS
    steps run as b1 plans them (step 0 twice: 7 full, 38 partial, 6 reused calls)."""
    import subprocess
    import sys

    from conftest import GOLDEN_CONFIG, GOLDEN_WEIGHTS, REPO_ROOT

    result = subprocess.run([sys.executable, "-c", DATOSD_ALONE, str(GOLDEN_CONFIG), str(GOLDEN_WEIGHTS),
                             str(REPO_ROOT / "configs" / "dato" / "b1.yaml")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "{'full': 7, 'partial': 38, 'reused': 6}"
