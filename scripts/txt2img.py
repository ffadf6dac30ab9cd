"""Text-to-image sampling with the CompVis command-line interface (plus --demo, --device and DaTo flags).

    python scripts/txt2img.py --demo --prompt "a photograph of an astronaut riding a horse"
    python scripts/txt2img.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt --plms --prompt "..."
"""
import argparse
import math
import os
import sys

import torch
from tqdm import tqdm, trange

from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.runtime import (
    DEMO_LABEL,
    SampleWriter,
    UsageError,
    latent_shape,
    load_model,
    pick_device,
    precision_scope,
    timed,
    to_uint8_images,
)

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render")
    parser.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples",
                        help="dir to write results to (appended to, never overwritten)")
    parser.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    parser.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    parser.add_argument("--plms", action="store_true", help="use plms sampling")
    parser.add_argument("--fixed_code", action="store_true",
                        help="if enabled, uses the same starting code across samples")
    parser.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (eta=0.0 corresponds to deterministic sampling)")
    parser.add_argument("--n_iter", type=int, default=2, help="sample this often")
    parser.add_argument("--H", type=int, default=None, help="image height, in pixel space (default 512; 128 with --demo)")
    parser.add_argument("--W", type=int, default=None, help="image width, in pixel space (default 512; 128 with --demo)")
    parser.add_argument("--C", type=int, default=4, help="latent channels")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor")
    parser.add_argument("--n_samples", type=int, default=3,
                        help="how many samples to produce for each given prompt. A.k.a. batch size")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=7.5,
                        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    parser.add_argument("--from-file", type=str, help="if specified, load prompts from this file (one per line)")
    parser.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="path to config which constructs model")
    parser.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="path to checkpoint of model (.ckpt or .safetensors)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (model_ema.*) if it has them")
    parser.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    parser.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                        help="autocast = float16 on CUDA, bfloat16 on CPU; full = float32")
    parser.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run (auto: CUDA when available)")
    parser.add_argument("--demo", action="store_true",
                        help="use the built-in tiny model with seeded random weights (no checkpoint needed)")
    from datosd.cli import add_acceleration_args

    add_acceleration_args(parser)
    return parser


def read_prompt_batches(opt):
    """List of prompt batches: n_samples copies of --prompt, or the lines of --from-file in chunks."""
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    if not os.path.isfile(opt.from_file):
        raise UsageError(f"--from-file {opt.from_file} does not exist")
    with open(opt.from_file, "r", encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UsageError(f"--from-file {opt.from_file} holds no prompt")
    return [prompts[i:i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]


def check_options(opt):
    """Reject bad input before anything is loaded or written."""
    if opt.H is None:
        opt.H = 128 if opt.demo else 512
    if opt.W is None:
        opt.W = 128 if opt.demo else 512
    for name in ("ddim_steps", "n_iter", "n_samples"):
        if getattr(opt, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(opt, name)}")
    if not math.isfinite(opt.scale) or not math.isfinite(opt.ddim_eta):
        raise UsageError("--scale and --ddim_eta must be finite numbers")
    if opt.plms and opt.ddim_eta != 0:
        raise UsageError("PLMS sampling is deterministic: --ddim_eta must be 0 with --plms")
    if opt.ddim_steps > 1000:
        raise UsageError("--ddim_steps must be at most 1000 (the number of training timesteps)")
    latent_shape(None, opt.H, opt.W, factor=opt.f, channels=opt.C)


def main(argv=None):
    opt = build_parser().parse_args(argv)
    try:
        check_options(opt)
        batches = read_prompt_batches(opt)
        device = pick_device(opt.device)
        steps = len(make_ddim_timesteps("uniform", opt.ddim_steps, 1000, verbose=False))
        from datosd.cli import resolve_acceleration

        acceleration = resolve_acceleration(opt, steps)
        model = load_model(opt.config, opt.ckpt, device, use_ema=opt.ema, demo=opt.demo)
    except (UsageError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if opt.demo:
        print(f"*** {DEMO_LABEL}: images are noise-like by design ***")
    method = acceleration.apply(model, seed=opt.seed)
    print(f"method: {method}")
    sampler = PLMSSampler(model) if opt.plms else DDIMSampler(model)

    png_text = {"prompt_source": opt.from_file or opt.prompt, "seed": opt.seed, "steps": opt.ddim_steps,
                "sampler": "plms" if opt.plms else "ddim", "scale": opt.scale, "method": method,
                "model": DEMO_LABEL if opt.demo else opt.ckpt}
    writer = SampleWriter(opt.outdir, png_text, skip_save=opt.skip_save, skip_grid=opt.skip_grid)

    shape = latent_shape(model, opt.H, opt.W, factor=opt.f, channels=opt.C)
    generator = torch.Generator().manual_seed(opt.seed)
    start_code = torch.randn((opt.n_samples, *shape), generator=generator) if opt.fixed_code else None
    with torch.no_grad(), precision_scope(opt.precision, device):
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                batch = len(prompts)
                uc = model.get_learned_conditioning(batch * [""]) if opt.scale != 1.0 else None
                c = model.get_learned_conditioning(list(prompts))
                if start_code is not None:
                    x_T = start_code[:batch]
                else:
                    x_T = torch.randn((batch, *shape), generator=generator)
                (samples, _), seconds = timed(lambda: sampler.sample(
                    S=opt.ddim_steps, conditioning=c, batch_size=batch, shape=list(shape), verbose=False,
                    unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc, eta=opt.ddim_eta,
                    x_T=x_T.to(device)), device)
                writer.add(to_uint8_images(model.decode_first_stage(samples)), seconds)
    acceleration.remove(model)
    writer.finish(opt.n_rows if opt.n_rows > 0 else opt.n_samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
