"""Text-to-image sampling with the CompVis command-line interface (plus --demo, --device and the
acceleration flags).

    python scripts/txt2img.py --demo --prompt "a photograph of an astronaut riding a horse"
    python scripts/txt2img.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt --plms --prompt "..."
    python scripts/txt2img.py --plms --dato          # DaTo, the paper's b1 strategy (50 steps)
    # SDXL (generative-models config and checkpoint): EulerEDM, 1024 x 1024, size conditioning from --H/--W
    python scripts/txt2img.py --config configs/stable-diffusion/sd_xl_base.yaml \
        --ckpt sd_xl_base_1.0.safetensors --scale 7.0 --dato
"""
import argparse
import math
import os
import sys

import torch
from ldm.checkpoint import CheckpointError
from tqdm import tqdm, trange

from .. import generate as gen
from ..images import SampleWriter, check_output_dir, to_uint8_images
from ..methods import MethodError
from ..runtime import UsageError, pick_device, seed_everything
from . import run
from .flags import add_acceleration_args, add_model_args, execution_from_args, method_from_args, resolve_model_args

DEMO_SIZE = 128


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render")
    parser.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples",
                        help="dir to write results to (appended to, never overwritten)")
    parser.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    parser.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    parser.add_argument("--ddim_steps", type=int, default=50,
                        help="number of sampling steps (with an SDXL config: EulerEDM steps)")
    parser.add_argument("--plms", action="store_true", help="use plms sampling (SD 1.x/2.x)")
    parser.add_argument("--fixed_code", action="store_true",
                        help="if enabled, uses the same starting code across samples")
    parser.add_argument("--ddim_eta", type=float, default=0.0,
                        help="ddim eta (eta=0.0 corresponds to deterministic sampling)")
    parser.add_argument("--n_iter", type=int, default=2, help="sample this often")
    parser.add_argument("--H", type=int, default=None, help=f"image height, in pixel space (default 512; "
                                                            f"{DEMO_SIZE} with --demo)")
    parser.add_argument("--W", type=int, default=None, help=f"image width, in pixel space (default 512; "
                                                            f"{DEMO_SIZE} with --demo)")
    parser.add_argument("--C", type=int, default=4, help="latent channels (fixed by the model)")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor (fixed by the model)")
    parser.add_argument("--n_samples", type=int, default=3,
                        help="how many samples to produce for each given prompt. A.k.a. batch size")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=7.5,
                        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    parser.add_argument("--from-file", type=str, help="if specified, load prompts from this file (one per line)")
    parser.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    sdxl = parser.add_argument_group("SDXL size conditioning (generative-models configs only)")
    sdxl.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="original_size_as_tuple (default: --H --W)")
    sdxl.add_argument("--crop_coords_top_left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                      help="crop_coords_top_left (default: 0 0)")
    sdxl.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="target_size_as_tuple (default: --H --W)")
    add_model_args(parser)
    add_acceleration_args(parser)
    return parser


def read_prompt_batches(opt) -> list:
    """List of prompt batches: n_samples copies of --prompt, or the lines of --from-file in chunks."""
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    if not os.path.isfile(opt.from_file):
        raise UsageError(f"--from-file {opt.from_file} does not exist")
    try:
        with open(opt.from_file, "r", encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--from-file {opt.from_file}: cannot read it ({err})") from None
    if not prompts:
        raise UsageError(f"--from-file {opt.from_file} holds no prompt")
    return gen.batches(prompts, opt.n_samples)


def pick_sampler(opt, geometry, method) -> str:
    """plms / ddim for SD 1.x/2.x (CompVis flags); EulerEDM for SDXL, where those flags do not apply."""
    if geometry.kind == "sgm":
        if opt.plms or opt.ddim_eta != 0:
            raise UsageError("an SDXL config samples with EulerEDM (generative-models): --plms and --ddim_eta do "
                             "not apply; drop them")
        sampler = method.run_sampler("euler")
    else:
        given = [f"--{name}" for name in ("original_size", "crop_coords_top_left", "target_size")
                 if getattr(opt, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: SDXL size conditioning; this config is not an SDXL one")
        sampler = method.run_sampler("plms" if opt.plms else "ddim")
    gen.check_sampler(geometry, sampler)
    return sampler


def size_conditioning(opt) -> gen.SizeConditioning:
    return gen.SizeConditioning(opt.H, opt.W, original_size=opt.original_size and tuple(opt.original_size),
                                crop_coords_top_left=tuple(opt.crop_coords_top_left or (0, 0)),
                                target_size=opt.target_size and tuple(opt.target_size))


def check_options(opt):
    """Reject bad input before anything is loaded or written. Returns (batches, method, steps, sampler,
    latent shape)."""
    geometry = gen.model_geometry(gen.read_config(opt.config))
    if opt.H is None:
        opt.H = DEMO_SIZE if opt.demo else geometry.default_size
    if opt.W is None:
        opt.W = DEMO_SIZE if opt.demo else geometry.default_size
    for name in ("ddim_steps", "n_iter", "n_samples"):
        if getattr(opt, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(opt, name)}")
    if not math.isfinite(opt.scale) or not math.isfinite(opt.ddim_eta) or opt.ddim_eta < 0:
        raise UsageError("--scale must be a finite number and --ddim_eta a finite number >= 0")
    if opt.plms and opt.ddim_eta != 0:
        raise UsageError("PLMS sampling is deterministic: --ddim_eta must be 0 with --plms")
    if opt.ddim_steps > 1000:
        raise UsageError("--ddim_steps must be at most 1000 (the number of training timesteps)")
    gen.check_geometry(geometry, opt.C, opt.f)
    shape = gen.latent_shape(geometry, opt.H, opt.W)
    batches = read_prompt_batches(opt)
    method = method_from_args(opt)
    sampler = pick_sampler(opt, geometry, method)
    steps = gen.sampler_steps(sampler, method.run_steps(opt.ddim_steps))
    method.check_steps(steps)
    gen.check_model_files(opt.config, opt.ckpt, demo=opt.demo)
    check_output_dir(opt.outdir)
    return batches, method, steps, sampler, shape


def main(argv=None) -> int:
    opt = resolve_model_args(build_parser().parse_args(argv))
    try:
        batches, method, steps, sampler, shape = check_options(opt)
        device = pick_device(opt.device)
        model = gen.load_model(opt.config, opt.ckpt, device, use_ema=opt.ema, demo=opt.demo)
    except (UsageError, CheckpointError, MethodError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seed_everything(opt.seed)
    if opt.demo:
        print(f"*** {gen.DEMO_LABEL}: images are noise-like by design ***")
    print(f"method: {method.name} = {method.label}")
    png_text = {"prompt_source": opt.from_file or opt.prompt, "seed": opt.seed, "steps": steps,
                "sampler": sampler, "scale": opt.scale, "eta": opt.ddim_eta, "method": method.name,
                "model": gen.DEMO_LABEL if opt.demo else opt.ckpt}
    writer = SampleWriter(opt.outdir, png_text, skip_save=opt.skip_save, skip_grid=opt.skip_grid)
    noise = torch.Generator().manual_seed(opt.seed)  # x_T of every batch, drawn in order on the CPU
    fixed_code = torch.randn((opt.n_samples, *shape), generator=noise) if opt.fixed_code else None
    run_index = 0
    with method.apply(model, steps, seed=opt.seed, execution=execution_from_args(opt)) as applied:
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                batch = len(prompts)
                cond = gen.encode_prompts(model, prompts, opt.scale, opt.precision, size=size_conditioning(opt))
                x_T = fixed_code[:batch] if fixed_code is not None else torch.randn((batch, *shape), generator=noise)
                result = gen.sample_latents(model, cond, x_T, sampler=sampler, steps=steps, scale=opt.scale,
                                            eta=opt.ddim_eta, seed=opt.seed + run_index, method=applied,
                                            precision=opt.precision)
                writer.add(to_uint8_images(gen.decode(model, result.latents, opt.precision)), result.seconds)
                run_index += 1
    writer.finish(opt.n_rows if opt.n_rows > 0 else opt.n_samples)
    return 0


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
