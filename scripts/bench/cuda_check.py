"""CUDA checks for a GPU machine: the golden numerics on CUDA, and every acceleration under fp16 autocast.

CI has no GPU, so this is the check to run once on one (it needs no weights and takes seconds):

    python scripts/bench/cuda_check.py --out outputs/cuda_check.json

1. The golden tiny model (tests/data) on CUDA in float32 (TF32 off) reproduces the CompVis reference tensors:
   one UNet pass, DDIM and PLMS samples, the decoded images.
2. For the original model, DaTo (pruning + caching), uniform DeepCache, ToMeSD (tomesd) and DeepCache + ToMeSD,
   both samplers: the CUDA float32 latents equal the CPU float32 ones (same strategy, seeds and start noise),
   and the CUDA fp16-autocast latents are finite and close to CUDA float32 (ToMeSD with use_rand=False: its
   random partition comes from each device's own RNG).
3. A v-parameterized model (SD 2.x 768-v style) samples finite latents with both samplers under autocast.
Prints one line per check and exits non-zero if any fails.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from datosd import Strategy, apply_patch, remove_patch
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import instantiate_from_config, seeded_random_weights

REPO = Path(__file__).resolve().parents[2]
GOLDEN_CONFIG = REPO / "tests" / "data" / "golden-tiny.yaml"
GOLDEN_IO = REPO / "tests" / "data" / "golden-tiny-io.safetensors"
STEPS = 10
SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler}


def golden_model(config):
    """The golden tiny model: its reference weights are the CompVis init redrawn from seed 1234
    (tests/golden_weights.py checks that rule against the reference file's digest)."""
    model = instantiate_from_config(config.model).eval()
    seeded_random_weights(model, seed=1234)
    return model


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def sample(model, sampler_class, io, steps, x_T, autocast=False):
    """Latents (B, 4, h, w) of one guided run from x_T on the model's device."""
    device = next(model.parameters()).device
    sampler = sampler_class(model)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=autocast):
        samples, _ = sampler.sample(
            S=steps, conditioning=io["sample.c"].to(device), batch_size=x_T.shape[0], shape=list(x_T.shape[1:]),
            unconditional_guidance_scale=7.5, unconditional_conditioning=io["sample.uc"].to(device), eta=0.0,
            x_T=x_T.to(device), verbose=False, disable_progress=True)
    return samples.float().cpu()


def accelerations(steps):
    """name -> (strategy or None, DaTo options or None, ToMeSD ratio or None)."""
    depths = [12, 1, 12, 1, 1, 12, 1, 0, 12, 1][:steps]
    ratios = [0.0, 0.3, 0.5, 0.7, 0.5, 0.3, 0.5, 0.0, 0.4, 0.6][:steps]
    return {
        "original": (None, None, None),
        "dato": (Strategy(depths, ratios, name="cuda-check"), {}, None),
        "deepcache-n3": (Strategy.uniform(steps, 3, 1), None, None),
        "tome": (None, None, 0.5),
        "deepcache-tome": (Strategy.uniform(steps, 3, 1), None, 0.5),
    }


def run_accelerated(model, spec, sampler_class, io, x_T, autocast=False):
    strategy, dato_options, tome_ratio = spec
    if strategy is not None:
        apply_patch(model, strategy, seed=0, **(dato_options if dato_options is not None else {}))
    if tome_ratio is not None:
        import tomesd

        # use_rand=False: tomesd forks each device's default RNG for its random partition, so with
        # use_rand the CPU and CUDA runs merge different tokens by design.
        tomesd.apply_patch(model, ratio=tome_ratio, use_rand=False)
    try:
        return sample(model, sampler_class, io, strategy.steps if strategy else STEPS, x_T, autocast)
    finally:
        if tome_ratio is not None:
            import tomesd

            tomesd.remove_patch(model)
        remove_patch(model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for every number")
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script (bf16 autocast)")
    opt = parser.parse_args()
    if opt.device == "cuda" and not torch.cuda.is_available():
        print("cuda_check: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.device(opt.device)
    io = load_file(str(GOLDEN_IO))
    config = OmegaConf.load(str(GOLDEN_CONFIG))
    cpu_model = golden_model(config)
    model = golden_model(config).to(cuda)
    results, failures = {"device": torch.cuda.get_device_name(cuda) if cuda.type == "cuda" else "cpu", "torch": torch.__version__}, []

    def check(name, value, limit):
        ok = value == value and value < limit
        results[name] = value
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (limit {limit:g})")
        if not ok:
            failures.append(name)

    with torch.no_grad():
        out = model.apply_model(io["unet.x"].to(cuda), io["unet.t"].to(cuda), io["unet.context"].to(cuda))
        check("golden.unet_out", max_err(out, io["unet.out"]), 1e-4)
        for name, sampler_class in SAMPLERS.items():
            got = sample(model, sampler_class, io, 5, io["ddim.x_T"])
            check(f"golden.{name}_samples", max_err(got, io[f"{name}.samples"]), 1e-3)
        decoded = model.decode_first_stage(io["plms.samples"].to(cuda))
        check("golden.decoded", max_err(decoded, io["decoded.samples"]), 1e-3)

    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    for name, spec in accelerations(STEPS).items():
        for sampler_name, sampler_class in SAMPLERS.items():
            on_cpu = run_accelerated(cpu_model, spec, sampler_class, io, x_T)
            on_cuda = run_accelerated(model, spec, sampler_class, io, x_T)
            half = run_accelerated(model, spec, sampler_class, io, x_T, autocast=True)
            scale = on_cpu.abs().max().item()
            check(f"{name}.{sampler_name}.cuda_vs_cpu_rel", max_err(on_cuda, on_cpu) / scale, 1e-3)
            finite = bool(torch.isfinite(half).all())
            check(f"{name}.{sampler_name}.fp16_nonfinite", 0.0 if finite else 1.0, 0.5)
            check(f"{name}.{sampler_name}.fp16_vs_fp32_rel", max_err(half, on_cuda) / scale, 0.05)

    v_config = OmegaConf.load(str(GOLDEN_CONFIG))
    v_config.model.params.parameterization = "v"
    v_model = instantiate_from_config(v_config.model).eval()
    seeded_random_weights(v_model, seed=0)
    v_model = v_model.to(cuda)
    for sampler_name, sampler_class in SAMPLERS.items():
        got = sample(v_model, sampler_class, io, STEPS, x_T, autocast=True)
        check(f"v_param.{sampler_name}.fp16_nonfinite", 0.0 if bool(torch.isfinite(got).all()) else 1.0, 0.5)

    if opt.out:
        Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opt.out).write_text(json.dumps(results, indent=2))
    print(f"{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
