"""DaTo, DeepCache and ToMeSD on the tiny SDXL (sgm DiffusionEngine sampled with EulerEDMSampler).

Tiny SDXL layout at a 16 x 16 latent: level 0 (16 x 16, input_blocks 0-2, output_blocks 6-8) has no attention,
as SDXL's 128 x 128 level; level 1 (8 x 8 = 64 tokens: input_blocks 4-5, output_blocks 3-5, two transformer
blocks each) is the highest-resolution attention level, so it is where DaTo prunes; level 2 (4 x 4) has the rest.
"""
import pytest
import torch

from conftest import REPO_ROOT
from datosd import Strategy, apply_patch, remove_patch
from sdgen.costs import count_entry_macs, plain_unet_macs
from datosd.utils import attention_depth, attention_downsample
from helpers import golden_sdxl_model, tgate_gated_halves
from sgm.inference.helpers import decode_latents, get_conditioning, latent_shape, sample_latents

BLOCKS = [f"input_blocks.{k}" for k in range(9)] + ["middle_block"] + [f"output_blocks.{j}" for j in range(9)]
TOP_LEVEL = {"input_blocks.4", "input_blocks.5", "output_blocks.3", "output_blocks.4", "output_blocks.5"}


@pytest.fixture(scope="module")
def engine(sdxl_weights):
    return golden_sdxl_model(sdxl_weights)


@pytest.fixture(scope="module")
def cond(sdxl_io):
    c = {"crossattn": sdxl_io["cond.crossattn"], "vector": sdxl_io["cond.vector"]}
    uc = {"crossattn": sdxl_io["uncond.crossattn"], "vector": sdxl_io["uncond.vector"]}
    return c, uc


def sample(engine, cond, steps, seed=0):
    c, uc = cond
    x_T = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    return sample_latents(engine, c, uc, x_T, num_steps=steps, cfg_scale=7.0)


class BlockRecorder:
    """Per UNet call: the blocks that ran and the token count every self-attention (attn1) saw, by block."""

    def __init__(self, engine):
        unet = engine.model.diffusion_model
        self.calls = []
        self.handles = [unet.register_forward_pre_hook(lambda m, a: self.calls.append({"blocks": set(), "attn1": []}))]
        for name in BLOCKS:
            block = unet.get_submodule(name)
            self.handles.append(block.register_forward_hook(
                lambda m, a, out, name=name: self.calls[-1]["blocks"].add(name)))
            for sub_name, sub in block.named_modules():
                if sub_name.endswith("attn1"):
                    self.handles.append(sub.register_forward_pre_hook(
                        lambda m, a, kw, name=name: self.calls[-1]["attn1"].append((name, a[0].shape[1])),
                        with_kwargs=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def blocks_for_depth(depth):
    """Spec 2 with 9 + 9 blocks: depth >= 9 computes everything; else input_blocks k < d, output ids 8 - j < d."""
    if depth >= 9:
        return set(BLOCKS)
    return ({f"input_blocks.{k}" for k in range(depth)} | {f"output_blocks.{j}" for j in range(9) if 8 - j < depth})


def test_attention_helpers_on_the_tiny_and_full_sdxl(engine):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    assert attention_downsample(engine) == 2
    assert attention_depth(engine) == 4
    with torch.device("meta"):
        full = instantiate_from_config(OmegaConf.load(
            str(REPO_ROOT / "configs/stable-diffusion/sd_xl_base.yaml")).model.params.network_config)
        sd1 = instantiate_from_config(OmegaConf.load(
            str(REPO_ROOT / "configs/stable-diffusion/v1-inference.yaml")).model.params.unet_config)
    assert (attention_downsample(full), attention_depth(full)) == (2, 4)
    assert (attention_downsample(sd1), attention_depth(sd1)) == (1, 1)


def test_all_full_ratio_zero_is_bit_identical_and_remove_restores(engine, cond):
    baseline = sample(engine, cond, 5)
    state = apply_patch(engine, Strategy([12, 9, 12, 10, 11], [0.0] * 5))
    try:
        patched = sample(engine, cond, 5)
    finally:
        remove_patch(engine)
    assert torch.equal(patched, baseline)
    assert [call.depth for call in state.calls] == [12] * 5
    assert state.cfg_halves  # EulerEDM with VanillaCFG told the patch its batch is [uncond; cond]
    assert torch.equal(sample(engine, cond, 5), baseline)


def test_cache_depths_compute_the_spec_blocks_and_depth_1_reaches_no_attention(engine, cond):
    depths = [12, 1, 4, 0, 5, 3, 12, 1]
    apply_patch(engine, Strategy(depths, [0.0] * len(depths)))
    try:
        with BlockRecorder(engine) as recorder:
            sample(engine, cond, len(depths))
    finally:
        remove_patch(engine)
    calls = recorder.calls
    assert len(calls) == len(depths)
    for depth, call in zip(depths, calls):
        assert call["blocks"] == blocks_for_depth(depth), depth
    assert calls[1]["attn1"] == [] and calls[5]["attn1"] == []  # depths 1 and 3: no attention on SDXL
    assert {name for name, _ in calls[2]["attn1"]} == {"output_blocks.5"}  # depth 4: the first attention
    assert {name for name, _ in calls[4]["attn1"]} == {"input_blocks.4", "output_blocks.4", "output_blocks.5"}


def test_uniform_deepcache_changes_the_samples_but_stays_finite(engine, cond):
    baseline = sample(engine, cond, 6)
    apply_patch(engine, Strategy.uniform(6, 3, 1))
    try:
        cached = sample(engine, cond, 6)
    finally:
        remove_patch(engine)
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, baseline)


def test_pruning_happens_in_the_highest_attention_level_only(engine, cond):
    """A b1-like strategy: attn1 sees N - K = 64 - 32 tokens in input_blocks 4-5 / output_blocks 3-5 at ratio
    0.5 (K = min(floor(r N), N - 16 base tokens)), all 64 at ratio 0, and the 4 x 4 level is never pruned."""
    depths = [12, 1, 12, 5, 0, 12]
    ratios = [0.5, 0.6, 0.5, 0.5, 0.3, 0.0]
    apply_patch(engine, Strategy(depths, ratios))
    try:
        with BlockRecorder(engine) as recorder:
            out = sample(engine, cond, len(depths))
    finally:
        remove_patch(engine)
    assert torch.isfinite(out).all()
    calls = recorder.calls
    for i in (0, 2):  # full steps at ratio 0.5
        top = [n for name, n in calls[i]["attn1"] if name in TOP_LEVEL]
        low = [n for name, n in calls[i]["attn1"] if name not in TOP_LEVEL]
        assert top == [32] * 10  # 5 blocks x 2 transformer blocks
        assert low and set(low) == {16}
    assert sorted(n for _, n in calls[3]["attn1"]) == [32] * 6  # depth 5: input_blocks 4, output_blocks 4-5
    assert calls[1]["attn1"] == [] and calls[4]["attn1"] == []
    assert {n for name, n in calls[5]["attn1"] if name in TOP_LEVEL} == {64}


def test_the_b1_strategy_transfers_unchanged(engine, cond):
    b1 = Strategy.load(REPO_ROOT / "configs" / "dato" / "b1.yaml")
    state = apply_patch(engine, b1)
    try:
        out = sample(engine, cond, b1.steps)
    finally:
        remove_patch(engine)
    assert torch.isfinite(out).all()
    assert [call.depth for call in state.calls] == [12 if d >= 9 or i == 0 else d
                                                   for i, d in enumerate(b1.cache_depth)]


def test_tomesd_merges_at_the_first_attention_level(engine, cond):
    import tomesd

    c, uc = cond
    x = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 500)
    args = dict(context=torch.cat([uc["crossattn"], c["crossattn"]]), y=torch.cat([uc["vector"], c["vector"]]))
    unet = engine.model.diffusion_model
    with torch.no_grad():
        before = unet(x, t, **args)
        seen = {}
        for max_downsample in (1, attention_downsample(engine)):
            tomesd.apply_patch(engine, ratio=0.5, max_downsample=max_downsample)
            try:
                with BlockRecorder(engine) as recorder:
                    merged = unet(x, t, **args)
            finally:
                tomesd.remove_patch(engine)
            seen[max_downsample] = {n for name, n in recorder.calls[0]["attn1"] if name in TOP_LEVEL}
        after = unet(x, t, **args)
    assert seen[1] == {64}  # tomesd's default reaches no attention on SDXL: nothing merged
    assert seen[2] == {32}  # 64 tokens, half merged
    assert not torch.equal(merged, before)
    assert torch.equal(after, before)


def test_deepcache_with_tomesd(engine, cond):
    import tomesd

    tomesd.apply_patch(engine, ratio=0.5, max_downsample=attention_downsample(engine))
    apply_patch(engine, Strategy.uniform(4, 2, 4))
    try:
        with BlockRecorder(engine) as recorder:
            out = sample(engine, cond, 4)
    finally:
        remove_patch(engine)
        tomesd.remove_patch(engine)
    assert torch.isfinite(out).all()
    assert {n for name, n in recorder.calls[1]["attn1"]} == {32}  # depth 4: output_blocks 5, merged


def test_mac_counts_take_the_vector_conditioning(engine):
    unet = engine.model.diffusion_model
    macs = count_entry_macs(unet, 16, 16, 1, [(12, 0.0), (1, 0.0), (4, 0.0), (12, 0.5)])
    assert macs["d12_r0.00"] == plain_unet_macs(unet, 16, 16, 1)
    assert macs["d1_r0.00"] < macs["d4_r0.00"] < macs["d12_r0.50"] < macs["d12_r0.00"]


def test_helpers_text_to_image(engine):
    c, uc = get_conditioning(engine, ["a red fox", "a blue bird"], height=128, width=128)
    assert c["crossattn"].shape == (2, 77, 48) and c["vector"].shape == (2, 64)
    size = engine.conditioner.embedders[2](torch.tensor([[128, 128]] * 2))
    assert torch.equal(c["vector"][:, 16:32], size) and torch.equal(uc["vector"][:, 16:], c["vector"][:, 16:])
    assert latent_shape(engine, 128, 128) == (4, 16, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        latent_shape(engine, 120, 128)
    z = sample_latents(engine, c, uc, torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0)), 2)
    images = decode_latents(engine, z)
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.float32
    vae = engine.first_stage_model
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.half()
    try:
        assert torch.allclose(decode_latents(engine, z), images, atol=1e-2)
        assert next(vae.parameters()).dtype == torch.float16  # upcast for decoding only
    finally:
        vae.float()
        vae.load_state_dict(weights)


def test_depths_9_to_11_are_full_steps_in_kinds_summaries_and_counts(engine, cond):
    """The tiny SDXL UNet has 9 input blocks: depths 9, 10 and 11 compute everything, and the call records, the
    strategy summary and the planned call counts (through the model's geometry) all say so."""
    from conftest import SDXL_CONFIG
    from sdgen import generate as gen
    from sdgen.methods import dato_method
    from sdgen.settings import RunSettings

    strategy = Strategy([12, 9, 10, 11, 1, 4], [0.0] * 6, name="deep")
    geometry = gen.model_geometry(gen.read_config(SDXL_CONFIG))
    assert geometry.blocks == 9 == len(engine.model.diffusion_model.output_blocks)
    summary = strategy.summary(n_blocks=geometry.blocks)
    assert (summary.full, summary.partial, summary.reused) == (4, 2, 0)
    assert (strategy.summary().full, strategy.summary().partial) == (1, 5)  # on SD 1.x's 12 blocks
    assert strategy.describe(geometry.blocks).startswith("deep: 6 steps, 4 full / 2 partial / 0 reused")
    method = dato_method(strategy)
    run = RunSettings(sampler="euler", steps=6, scale=7.0, height=32, width=32, batch=2,
                      geometry=geometry).for_method(method)
    planned = method.call_counts(run.sampler_steps, run.sampler, geometry.blocks)
    assert planned == {"full": 4, "partial": 2, "reused": 0}
    assert [depth for depth, _ in run.call_plan(method)] == [12, 12, 12, 12, 1, 4]
    c, uc = cond
    x_T = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    with method.apply(engine, run.sampler_steps, seed=0) as applied:
        result = gen.sample_latents(engine, gen.Conditioning(c, uc), x_T, sampler="euler", steps=run.steps,
                                    scale=7.0, method=applied)
        assert [call.kind for call in applied.dato_state.calls] == ["full"] * 4 + ["partial"] * 2
    assert result.calls == planned


def test_text_pruning_protects_bos_and_eos_of_the_sdxl_prompts(engine):
    """The SDXL conditioner's prompts are registered: every context row (uncond zeros included) finds its prompt,
    with no warning, and each conditional row keeps its BOS and first EOS; both text towers put them at the same
    of the 77 shared positions (the cross-attention context concatenates their hidden states along channels)."""
    import warnings

    from datosd import apply_text_pruning, remove_text_pruning
    from datosd.text_tokens import protected_positions

    prompts = ["a red fox", "a blue bird sitting on a branch in a snowy forest at dawn"]
    towers = [e for e in engine.conditioner.embedders if callable(getattr(e, "tokenize", None))]
    assert len(towers) == 2
    expected = [protected_positions(tower.tokenize(prompts)) for tower in towers]
    assert torch.equal(expected[0], expected[1])
    eos = [int(row.nonzero()[1]) for row in expected[0]]
    assert eos == [4, 14]
    keys = []  # (to_k input (B, m, D), context (B, M, D)) of every attn2 after the warm-up
    layers = [m.attn2 for m in engine.model.diffusion_model.modules() if type(m).__name__.endswith("TransformerBlock")]
    context = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: context.update(c=kw["context"]), with_kwargs=True)
               for layer in layers]
    handles += [layer.to_k.register_forward_pre_hook(lambda m, a: keys.append((a[0], context["c"])))
                for layer in layers]
    state = apply_text_pruning(engine, keep=6, warmup=0.25)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c, uc = get_conditioning(engine, prompts, height=128, width=128)
            x_T = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
            sample_latents(engine, c, uc, x_T, num_steps=4, cfg_scale=7.0)
    finally:
        remove_text_pruning(engine)
        for handle in handles:
            handle.remove()
    assert state.kept_counts() == [(0, None), (1, [6] * 4), (2, [6] * 4), (3, [6] * 4)]
    pruned = [(k, ctx) for k, ctx in keys if k.shape[1] == 6]
    assert len(pruned) == 3 * len(layers)
    for k, ctx in pruned:
        for row, position in enumerate(eos):  # rows [uncond x2; cond x2]
            for kept in (0, position):
                assert (k[2 + row] == ctx[2 + row, kept]).all(dim=-1).any()


def test_cfg_mean_tgate_runs_the_unconditional_half_whose_output_the_conditional_half_would_not_give(engine, cond):
    """After the gate, "cfg_mean" runs the unconditional half (as the released pipelines run the negative prompt
    and its added conditions) and copies it; on SDXL the vector y differs between the halves, so the conditional
    half run alone gives another output: guidance cancels by choice, not because the halves agree."""
    c, uc = cond
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    context, y = torch.cat([uc["crossattn"][:1], c["crossattn"][:1]]), torch.cat([uc["vector"][:1], c["vector"][:1]])
    assert not torch.equal(y[0], y[1])
    batch, conditional = tgate_gated_halves(engine.model.diffusion_model, x, torch.tensor([500, 500]),
                                            {"context": context, "y": y})
    assert torch.equal(batch[0], batch[1])
    error = ((conditional[0] - batch[1]).norm() / batch[1].norm()).item()
    assert error > 1e-3  # 0.02 on the tiny SDXL
