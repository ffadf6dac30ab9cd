"""CUDA checks for a GPU machine (marker `cuda`; skipped without a GPU): `python -m pytest -m cuda`.

1. The golden tiny model on CUDA in float32 (TF32 off) reproduces the CompVis reference tensors: one UNet pass,
   DDIM and PLMS samples, the decoded images.
2. Every registry method, under both samplers (ddim<N> brings its own): the CUDA float32 latents equal the CPU
   float32 ones (same seeds and start noise), and the CUDA fp16-autocast latents are finite and close to CUDA
   float32. Methods with ToMeSD skip the CPU comparison: the registry seeds tomesd's random partition with a
   generator on the UNet's device, and CPU and CUDA generators draw different numbers from one seed.
3. A v-parameterized model (SD 2.x 768-v style) samples finite latents with both samplers under autocast.
4. Compiled execution with CUDA graphs ('reduce-overhead'): DaTo, DeepCache and the original under PLMS (which
   keeps earlier predictions, so a graph replay overwriting them would show) match eager CUDA float32.
"""
import pytest
import torch

from conftest import GOLDEN_CONFIG
from helpers import golden_model
from ldm.util import instantiate_from_config, seeded_random_weights
from sdgen import generate as gen
from sdgen.compiled import Execution
from sdgen.methods import parse_method

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 10
METHODS = ["original", "ddim10", "tome-0.5", "deepcache-n3", "deepcache-n3+tome-0.5", "dato@every5",
           "dato@every5,parity"]
CASES = [(name, sampler) for name in METHODS for sampler in ("plms", "ddim")
         if parse_method(name).run_sampler(sampler) == sampler]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


@pytest.fixture(scope="module")
def cuda():
    """CUDA with TF32 off (the golden tolerances are float32's), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cuda_model(cuda):
    return golden_model().to(cuda)


@pytest.fixture(scope="module")
def cpu_model():
    return golden_model()


def golden_cond(golden_io, device) -> gen.Conditioning:
    return gen.Conditioning(golden_io["sample.c"].to(device), golden_io["sample.uc"].to(device))


def sample(model, method_name, sampler, golden_io, x_T, precision="full", execution=Execution()):
    """Final latents (B, 4, h, w), float32 on the CPU, of one guided run of a registry method."""
    method = parse_method(method_name)
    sampler, steps = method.run_sampler(sampler), method.run_steps(STEPS)
    with method.apply(model, steps, seed=0, execution=execution) as applied:
        result = gen.sample_latents(model, golden_cond(golden_io, gen.model_device(model)), x_T, sampler=sampler,
                                    steps=steps, scale=7.5, seed=0, method=applied, precision=precision)
    return result.latents.float().cpu()


def test_golden_unet_on_cuda(cuda_model, golden_io, cuda):
    with torch.no_grad():
        out = cuda_model.apply_model(golden_io["unet.x"].to(cuda), golden_io["unet.t"].to(cuda),
                                     golden_io["unet.context"].to(cuda))
    assert max_err(out, golden_io["unet.out"]) < 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_golden_samples_on_cuda(cuda_model, golden_io, sampler):
    cond = golden_cond(golden_io, gen.model_device(cuda_model))
    result = gen.sample_latents(cuda_model, cond, golden_io["ddim.x_T"], sampler=sampler, steps=5, scale=7.5, eta=0.0)
    assert max_err(result.latents, golden_io[f"{sampler}.samples"]) < 1e-3


def test_golden_decoded_on_cuda(cuda_model, golden_io):
    assert max_err(gen.decode(cuda_model, golden_io["plms.samples"]), golden_io["decoded.samples"]) < 1e-3


@pytest.mark.parametrize("method_name, sampler", CASES)
def test_method_on_cuda_matches_cpu_and_fp16_matches_fp32(cpu_model, cuda_model, golden_io, method_name, sampler):
    x_T = gen.start_noise([7, 8], (4, 16, 16))
    on_cuda = sample(cuda_model, method_name, sampler, golden_io, x_T)
    half = sample(cuda_model, method_name, sampler, golden_io, x_T, precision="autocast")
    scale = on_cuda.abs().max().item()
    assert torch.isfinite(half).all()
    assert max_err(half, on_cuda) / scale < 0.05
    if parse_method(method_name).component("tome") is None:
        on_cpu = sample(cpu_model, method_name, sampler, golden_io, x_T)
        assert max_err(on_cuda, on_cpu) / scale < 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_v_parameterized_model_under_autocast(golden_io, cuda, sampler):
    from omegaconf import OmegaConf

    config = OmegaConf.load(str(GOLDEN_CONFIG))
    config.model.params.parameterization = "v"
    model = seeded_random_weights(instantiate_from_config(config.model).eval(), seed=0).to(cuda)
    latents = sample(model, "original", sampler, golden_io, gen.start_noise([7, 8], (4, 16, 16)), precision="autocast")
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("method_name", ["original", "deepcache-n3", "dato@every5"])
def test_cuda_graphs_match_eager(cuda_model, golden_io, method_name):
    x_T = gen.start_noise([7, 8], (4, 16, 16))
    eager = sample(cuda_model, method_name, "plms", golden_io, x_T)
    compiled = Execution("reduce-overhead")
    assert compiled.cuda_graphs
    first = sample(cuda_model, method_name, "plms", golden_io, x_T, execution=compiled)
    second = sample(cuda_model, method_name, "plms", golden_io, x_T, execution=compiled)  # replays the graphs
    scale = eager.abs().max().item()
    assert max_err(first, eager) / scale < 1e-3
    assert max_err(second, eager) / scale < 1e-3
