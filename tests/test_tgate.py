"""T-GATE (datosd.tgate): no cross-attention after the gate, exact before it, the CFG-mean cache and the halved
batch, composition with DaTo; the released code's self-attention schedule against hand-written schedules."""
from collections import Counter, defaultdict

import pytest
import torch

import datosd
from datosd import SelfAttentionSchedule, Strategy, TGateOptions, apply_tgate, attention_plan, remove_tgate
from helpers import PROMPTS, golden_model, tgate_gated_halves
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.hooks import SamplingHook

STEPS = 5
GATE = 3
HW = (8, 8)


@pytest.fixture(scope="module")
def model():
    return golden_model()


@pytest.fixture(scope="module")
def conditioning(model):
    with torch.no_grad():
        return model.get_learned_conditioning(PROMPTS[:1]), model.get_learned_conditioning([""])


def sample(model, conditioning, seed=0):
    c, uc = conditioning
    x_T = torch.randn((1, 4, *HW), generator=torch.Generator().manual_seed(seed))
    samples, _ = DDIMSampler(model).sample(
        S=STEPS, conditioning=c, batch_size=1, shape=[4, *HW], unconditional_guidance_scale=7.5,
        unconditional_conditioning=uc, x_T=x_T, verbose=False, disable_progress=True)
    return samples


class Recorder(SamplingHook):
    """Per sampler step: UNet call batches and outputs, attn2 outputs, and how often q/k/v/out projected."""

    def __init__(self, model):
        self.model = model
        self.step = None
        self.unet_batches = defaultdict(list)
        self.unet_outputs = defaultdict(list)
        self.attn2_outputs = defaultdict(list)
        self.projections = Counter()  # step -> projections run
        unet = model.model.diffusion_model
        self.handles = [unet.register_forward_pre_hook(lambda m, a: self.unet_batches[self.step].append(a[0].shape[0])),
                        unet.register_forward_hook(lambda m, a, out: self.unet_outputs[self.step].append(out))]
        for block in unet.modules():
            if type(block).__name__.endswith("BasicTransformerBlock"):
                attn = block.attn2
                self.handles.append(attn.register_forward_hook(
                    lambda m, a, out: self.attn2_outputs[self.step].append(out)))
                for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                    self.handles.append(layer.register_forward_hook(
                        lambda m, a, out: self.projections.update([self.step])))

    def step_started(self, step):
        self.step = step

    def __enter__(self):
        self.model.sampling_hooks.add(self)
        return self

    def __exit__(self, *exc):
        self.model.sampling_hooks.remove(self)
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def reference(model, conditioning):
    """The unpatched run: its sample and its per-step record."""
    with Recorder(model) as record:
        samples = sample(model, conditioning)
    return samples, record


def test_cfg_mean_gate_computes_no_cross_attention_and_is_exact_before_the_gate(model, conditioning, reference):
    reference_sample, before = reference
    state = apply_tgate(model, gate_step=GATE)
    try:
        with Recorder(model) as after:
            gated = sample(model, conditioning)
    finally:
        remove_tgate(model)
    layers = len(before.attn2_outputs[0])
    for step in range(STEPS):
        if step < GATE:
            assert after.projections[step] == before.projections[step] == 4 * layers
            assert after.unet_batches[step] == [2]
            for ours, theirs in zip(after.unet_outputs[step], before.unet_outputs[step]):
                assert torch.equal(ours, theirs)
        else:
            assert after.projections[step] == 0
            # Every layer returns the mean of its two CFG halves at the last step before the gate ...
            for ours, last in zip(after.attn2_outputs[step], after.attn2_outputs[GATE - 1]):
                uncond, cond = last.chunk(2)
                assert torch.equal(ours, (uncond + cond) / 2)
            # ... so the halves agree, the UNet runs once on one half, and its output is copied to both.
            assert after.unet_batches[step] == [1]
            (out,) = after.unet_outputs[step]
            assert out.shape[0] == 2 and torch.equal(out[0], out[1])
    assert (state.run.computed, state.run.reused, state.run.halved) == (GATE * layers, (STEPS - GATE) * layers,
                                                                       STEPS - GATE)
    assert not torch.equal(gated, reference_sample)


def test_per_half_gate_keeps_each_half_and_the_whole_batch(model, conditioning, reference):
    reference_sample, _ = reference
    apply_tgate(model, TGateOptions(gate_step=GATE, cache="per_half"))
    try:
        with Recorder(model) as after:
            gated = sample(model, conditioning)
    finally:
        remove_tgate(model)
    for step in range(GATE, STEPS):
        assert after.projections[step] == 0 and after.unet_batches[step] == [2]
        for ours, last in zip(after.attn2_outputs[step], after.attn2_outputs[GATE - 1]):
            assert torch.equal(ours, last)
        (out,) = after.unet_outputs[step]
        assert not torch.equal(out[0], out[1])
    assert not torch.equal(gated, reference_sample)
    assert torch.equal(sample(model, conditioning), reference_sample)
    assert not any(hasattr(m, "_tgate") for m in model.modules())


def test_composes_with_dato_and_removal_restores(model, conditioning, reference):
    reference_sample, _ = reference
    dato = datosd.apply_patch(model, Strategy([12, 1, 12, 1, 12], [0.5] * STEPS))
    state = apply_tgate(model, gate_step=GATE)
    try:
        gated = sample(model, conditioning)
        # The halved batch changes the call shape: DaTo computes the first gated step fully.
        assert [c.depth for c in dato.calls] == [12, 1, 12, 12, 12]
        assert state.run.halved == STEPS - GATE
        assert torch.isfinite(gated).all()
    finally:
        remove_tgate(model)
        datosd.remove_patch(model)
    assert torch.equal(sample(model, conditioning), reference_sample)


def test_bad_options_are_rejected(model):
    for kwargs in (dict(gate_step=0), dict(gate_step=2.5), dict(gate_step=3, cache="both")):
        with pytest.raises(ValueError):
            TGateOptions(**kwargs)
    with pytest.raises(TypeError):
        apply_tgate(model, TGateOptions(), gate_step=3)
    assert not hasattr(model.model.diffusion_model, "_tgate")


# --- the self-attention schedule (the released code's tgate_scheduler) ---------------------------------------------
# Written out by hand from the released code's rules; per step: (self-attention, cross-attention), "c" compute,
# "k" compute and keep (cache), "r" reuse.
RELEASED_DEFAULTS = (10, SelfAttentionSchedule(), "c c k r r k r r r k k k")  # gate 10; warm_up 2, sp 5, fi 1
RELEASED_DEFAULTS_CROSS = "c c c c c c c c c k r r"
SMALL_SCHEDULE = (5, SelfAttentionSchedule(warm_up=1, sp_interval=3, fi_interval=2), "c k r k k r k r")
SMALL_SCHEDULE_CROSS = "c c c c k r r r"  # step 5 (5 % 2 = 1) reuses what step 4 = gate - 1 kept
ACTIONS = {"c": "compute", "k": "cache", "r": "reuse"}


def test_schedule_matches_the_hand_written_one():
    assert SelfAttentionSchedule() == SelfAttentionSchedule(warm_up=2, sp_interval=5, fi_interval=1)
    for (gate, schedule, self_plan), cross_plan in ((RELEASED_DEFAULTS, RELEASED_DEFAULTS_CROSS),
                                                    (SMALL_SCHEDULE, SMALL_SCHEDULE_CROSS)):
        options = TGateOptions(gate_step=gate, self_attention=schedule)
        expected = [(ACTIONS[a], ACTIONS[b]) for a, b in zip(self_plan.split(), cross_plan.split())]
        assert [attention_plan(step, options) for step in range(len(expected))] == expected
        v1 = TGateOptions(gate_step=gate)  # without the schedule self-attention always computes
        assert [attention_plan(step, v1) for step in range(len(expected))] == [("compute", c) for _, c in expected]
    # sp_interval 1 and warm_up 0 (the released code's DeepCache setting): self-attention is never reused.
    options = TGateOptions(gate_step=4, self_attention=SelfAttentionSchedule(warm_up=0, sp_interval=1))
    assert [attention_plan(step, options)[0] for step in range(6)] == ["cache"] * 6


class AttentionRecorder(SamplingHook):
    """Per sampler step: every attn1 / attn2 call's (layer, input, context, output) and their projection counts."""

    def __init__(self, model):
        self.model = model
        self.step = None
        self.calls = {"attn1": defaultdict(list), "attn2": defaultdict(list)}
        self.projections = {"attn1": Counter(), "attn2": Counter()}
        self.unet_batches = defaultdict(list)
        self.unet_outputs = defaultdict(list)
        unet = model.model.diffusion_model
        self.handles = [unet.register_forward_pre_hook(lambda m, a: self.unet_batches[self.step].append(a[0].shape[0])),
                        unet.register_forward_hook(lambda m, a, out: self.unet_outputs[self.step].append(out))]
        blocks = [b for b in unet.modules() if type(b).__name__.endswith("BasicTransformerBlock")]
        for kind in ("attn1", "attn2"):
            for index, block in enumerate(blocks):
                attn = getattr(block, kind)
                self.handles.append(attn.register_forward_hook(
                    lambda m, a, kw, out, kind=kind, index=index: self.calls[kind][self.step].append(
                        (index, a[0], kw.get("context", a[1] if len(a) > 1 else None), out)), with_kwargs=True))
                for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                    self.handles.append(layer.register_forward_hook(
                        lambda m, a, out, kind=kind: self.projections[kind].update([self.step])))

    def step_started(self, step):
        self.step = step

    def __enter__(self):
        self.model.sampling_hooks.add(self)
        return self

    def __exit__(self, *exc):
        self.model.sampling_hooks.remove(self)
        for handle in self.handles:
            handle.remove()


def sample_steps(model, conditioning, steps):
    c, uc = conditioning
    x_T = torch.randn((1, 4, *HW), generator=torch.Generator().manual_seed(0))
    samples, _ = DDIMSampler(model).sample(
        S=steps, conditioning=c, batch_size=1, shape=[4, *HW], unconditional_guidance_scale=7.5,
        unconditional_conditioning=uc, x_T=x_T, verbose=False, disable_progress=True)
    return samples


@pytest.mark.parametrize("cache", ["cfg_mean", "per_half"])
def test_self_attention_schedule_computes_and_reuses_as_written(model, conditioning, cache):
    gate, schedule, self_plan = SMALL_SCHEDULE
    self_plan, cross_plan = self_plan.split(), SMALL_SCHEDULE_CROSS.split()
    steps = len(self_plan)
    with AttentionRecorder(model) as plain:
        reference = sample_steps(model, conditioning, steps)
    state = apply_tgate(model, TGateOptions(gate_step=gate, cache=cache, self_attention=schedule))
    try:
        with AttentionRecorder(model) as after:
            gated = sample_steps(model, conditioning, steps)
    finally:
        remove_tgate(model)
    layers = len(after.calls["attn1"][0])
    kept = {}  # attn1 layer -> the output it keeps, by hand: the newest "k" step's (CFG mean at gate - 1)
    for step in range(steps):
        halved = cache == "cfg_mean" and step >= gate
        assert after.unet_batches[step] == [1 if halved else 2]
        assert after.projections["attn1"][step] == (0 if self_plan[step] == "r" else 4 * layers)
        assert after.projections["attn2"][step] == (0 if cross_plan[step] == "r" else 4 * layers)
        for index, x, context, out in after.calls["attn1"][step]:
            if self_plan[step] == "r":
                assert torch.equal(out, kept[index])
                continue
            # A computing layer gives exactly what the unpatched layer gives on its input (now unpatched).
            assert torch.equal(out, model.model.diffusion_model.get_submodule(
                attn1_names(model)[index])(x, context=context))
            if self_plan[step] == "k":
                mean = cache == "cfg_mean" and step == gate - 1
                kept[index] = (out[:1] + out[1:]) / 2 if mean else out
    # Before the first reuse the run is the unpatched one, bit for bit.
    first_reuse = self_plan.index("r")
    for step in range(first_reuse):
        for ours, theirs in zip(after.unet_outputs[step], plain.unet_outputs[step]):
            assert torch.equal(ours, theirs)
    reuses = self_plan.count("r")
    assert (state.run.self_computed, state.run.self_reused) == ((steps - reuses) * layers, reuses * layers)
    assert (state.run.computed, state.run.reused) == (gate * layers, (steps - gate) * layers)
    assert not torch.equal(gated, reference)
    assert torch.equal(sample_steps(model, conditioning, steps), reference)
    assert not any(hasattr(m, "_tgate") or hasattr(m, "_tgate_layer") for m in model.modules())


def attn1_names(model):
    unet = model.model.diffusion_model
    return [f"{name}.attn1" for name, b in unet.named_modules() if type(b).__name__.endswith("BasicTransformerBlock")]


def test_self_attention_schedule_refuses_pruned_or_merged_tokens(model, conditioning, reference):
    reference_sample, _ = reference
    options = TGateOptions(gate_step=GATE, self_attention=SelfAttentionSchedule(warm_up=0, sp_interval=2))
    datosd.apply_patch(model, Strategy([12, 12, 12, 12, 12], [0.5] * STEPS))
    try:
        with pytest.raises(ValueError, match="DaTo's pruned tokens"):
            apply_tgate(model, options)
        assert not hasattr(model.model.diffusion_model, "_tgate")
    finally:
        datosd.remove_patch(model)
    apply_tgate(model, options)  # applied first: the run's first call refuses
    datosd.apply_patch(model, Strategy([12, 12, 12, 12, 12], [0.5] * STEPS))
    try:
        with pytest.raises(ValueError, match="DaTo's pruned tokens"):
            sample(model, conditioning)
    finally:
        datosd.remove_patch(model)
        remove_tgate(model)
    deepcache = datosd.apply_patch(model, Strategy([12, 1, 12, 1, 12], [0.0] * STEPS))  # no pruning: combines
    apply_tgate(model, options)
    try:
        combined = sample(model, conditioning)
        assert [c.depth for c in deepcache.calls] == [12, 1, 12, 12, 12] and torch.isfinite(combined).all()
    finally:
        remove_tgate(model)
        datosd.remove_patch(model)
    assert torch.equal(sample(model, conditioning), reference_sample)


def test_bad_schedules_are_rejected():
    for kwargs in (dict(warm_up=-1), dict(sp_interval=0), dict(fi_interval=0), dict(sp_interval=2.0),
                   dict(warm_up=True)):
        with pytest.raises(ValueError):
            SelfAttentionSchedule(**kwargs)
    with pytest.raises(ValueError, match="SelfAttentionSchedule"):
        TGateOptions(self_attention=(2, 5, 1))


def test_cfg_mean_gated_halves_agree_on_sd1(model, conditioning):
    """On SD 1.x the halves differ only in the context, which gated cross-attention no longer reads: the
    conditional half run alone gives the unconditional half's output (tests/test_sdxl_accel.py: not on SDXL)."""
    c, uc = conditioning
    x = torch.randn((1, 4, *HW), generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    batch, conditional = tgate_gated_halves(model.model.diffusion_model, x, torch.tensor([500, 500]),
                                            {"context": torch.cat([uc, c])})
    assert torch.equal(batch[0], batch[1])
    assert torch.equal(conditional[0], batch[1])
