"""T-GATE-style cross-attention gating (datosd.tgate): no cross-attention after the gate, exact before it,
the CFG-mean cache and the halved batch, composition with DaTo."""
from collections import Counter, defaultdict

import pytest
import torch

import datosd
from datosd import Strategy, TGateOptions, apply_tgate, remove_tgate
from helpers import PROMPTS, golden_model
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
