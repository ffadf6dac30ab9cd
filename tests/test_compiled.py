"""Compiled execution (sdgen.compiled): a DaTo or DeepCache call compiles without a graph break, once per
(depth, ratio) variant and not again on a second run; compiled and eager latents agree for every method.

Dynamo tracing costs seconds per UNet on 2 cores, so these tests use a compact UNet (2 levels, 1 res block:
4 input and 4 output blocks) with seeded random weights, and the 'eager' backend (Dynamo's graph capture,
without code generation) except for one Inductor check on a small depth-1 call.
"""
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import GOLDEN_CONFIG
from helpers import CountingBackend, graph_breaks
from datosd.patch import apply_patch, remove_patch
from datosd.strategy import Strategy
from ldm.util import instantiate_from_config
from sdgen import generate as gen
from sdgen.compiled import CompiledCall, CompileError, Execution
from sdgen.methods import dato_method, parse_method

STEPS = 8
# DaTo steps covering a full step and a depth-1 step at r 0.5 and r 0.3, with and without DiffScore maps.
DEPTHS = [12, 1, 1, 12, 1, 0, 1, 12]
RATIOS = [0.5, 0.3, 0.3, 0.5, 0.5, 0.3, 0.3, 0.5]


@pytest.fixture(scope="module")
def model():
    config = OmegaConf.load(str(GOLDEN_CONFIG))
    unet = config.model.params.unet_config.params
    unet.channel_mult, unet.num_res_blocks, unet.attention_resolutions = [1, 2], 1, [1, 2]
    torch.manual_seed(0)
    return instantiate_from_config(config.model).eval()


@pytest.fixture(scope="module")
def cond(model):
    return gen.encode_prompts(model, ["a red fox"], scale=7.5)


def x_T():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def sample(model, cond, method, execution=Execution(), steps=STEPS):
    with method.apply(model, steps, seed=3, execution=execution) as applied:
        first = gen.sample_latents(model, cond, x_T(), sampler="ddim", steps=steps, seed=3, method=applied)
        return first.latents, applied


def variants(calls):
    """The distinct compiled variants of a run's calls: (depth, ratio, DiffScore known). A call that computes
    blocks compares the two newest maps, which exist from the third computed call on; without pruning the
    scores are not read."""
    computed = [call for call in calls if call.depth > 0]
    return {(call.depth, call.ratio, call.ratio > 0 and index >= 2) for index, call in enumerate(computed)}


def test_dato_compiles_each_variant_once_without_graph_breaks(model, cond):
    method = dato_method(Strategy(DEPTHS, RATIOS, name="mixed"))
    eager, _ = sample(model, cond, method)
    backend = CountingBackend()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with method.apply(model, STEPS, seed=3, execution=Execution("default", backend=backend)) as applied:
        assert isinstance(applied.dato_state.compute, CompiledCall)
        assert applied.dato_state.compute.compiled is not None
        first = gen.sample_latents(model, cond, x_T(), sampler="ddim", steps=STEPS, seed=3, method=applied)
        seen = variants(applied.dato_state.calls)
        assert {(12, 0.5, False), (1, 0.3, False), (1, 0.3, True), (12, 0.5, True), (1, 0.5, True)} == seen
        compiled_first_run = backend.graphs
        second = gen.sample_latents(model, cond, x_T(), sampler="ddim", steps=STEPS, seed=3, method=applied)
    assert graph_breaks() == 0  # fullgraph=True as well: a break would have raised
    assert 0 < compiled_first_run <= len(seen)
    assert backend.graphs == compiled_first_run  # the second run reuses every graph
    torch.testing.assert_close(first.latents, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.latents, eager, rtol=1e-5, atol=1e-5)


def test_deepcache_compiles_without_graph_breaks(model, cond):
    method = parse_method("deepcache-n3")
    eager, _ = sample(model, cond, method, steps=5)
    backend = CountingBackend()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, applied = sample(model, cond, method, Execution("default", backend=backend), steps=5)
    assert graph_breaks() == 0
    assert backend.graphs == 2  # a full call and a depth-1 call
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["original", "ddim4", "tome-0.5", "deepcache-n2+tome-0.5"])
def test_compiled_latents_match_eager(model, cond, name):
    method = parse_method(name)
    eager, _ = sample(model, cond, method)
    compiled, _ = sample(model, cond, method, Execution("default", backend="eager"))  # ddim4 reuses original's
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    unet = model.model.diffusion_model
    assert "forward" not in vars(unet)  # removing the method restores the eager forward
    assert type(unet).__name__ == "UNetModel"


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="Inductor's CPU code generation needs a C++ compiler")
def test_inductor_depth1_call_matches_eager(model, cond):
    """A full call eager, then depth-1 pruned calls both eager and Inductor-compiled: the same outputs."""
    unet = model.model.diffusion_model
    state = apply_patch(model, Strategy([12, 1, 1], [0.5, 0.3, 0.3]), seed=5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.cat([cond.uncond, cond.cond])
    timesteps = torch.tensor([801, 801])
    eager_compute = state.compute
    inductor = CompiledCall(eager_compute, Execution("default"), fullgraph=True)
    outputs = {}
    try:
        for name, partial_compute in (("eager", eager_compute), ("inductor", inductor)):
            state.use_compute(lambda blocks, x_, cond, depth, cached: (
                eager_compute if depth >= 12 else partial_compute)(blocks, x_, cond, depth, cached))
            state.sampling_started(3)
            results = []
            with torch.no_grad():
                for step in range(3):
                    state.step_started(step)
                    state.model_call(cfg_halves=True)
                    results.append(unet(x + 0.1 * step, timesteps - 100 * step, context))
            assert [call.depth for call in state.calls] == [12, 1, 1]
            outputs[name] = torch.stack(results)
    finally:
        remove_patch(model)
    torch.testing.assert_close(outputs["inductor"], outputs["eager"], rtol=1e-4, atol=1e-4)


def test_channels_last_matches_and_is_undone(model, cond):
    method = parse_method("dato:b1@every7")
    assert method.component("dato").plan.steps == STEPS
    eager, _ = sample(model, cond, method)
    unet = model.model.diffusion_model
    with method.apply(model, STEPS, seed=3, execution=Execution(channels_last=True)) as applied:
        assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        result = gen.sample_latents(model, cond, x_T(), sampler="ddim", steps=STEPS, seed=3, method=applied)
    torch.testing.assert_close(result.latents, eager, rtol=1e-5, atol=1e-5)
    assert unet.input_blocks[0][0].weight.is_contiguous()


def test_unknown_compile_mode_is_refused():
    with pytest.raises(CompileError, match="--compile must be one of none, default, reduce-overhead, max-autotune"):
        Execution("fast")
