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
import sys

import torch

from .. import generate as gen
from ..images import SampleWriter, check_output_dir
from ..methods import REGISTRY, Registry
from ..runtime import UsageError, pick_device
from ..settings import RunSettings, SettingFlags
from . import run
from .flags import add_acceleration_args, add_model_args, method_from_args, resolve_model_args
from .sampling import (add_prompt_args, checked_start, prompt_batches, read_prompt_list, sample_passes,
                       sampler_calls)

def build_parser(registry: Registry = REGISTRY) -> argparse.ArgumentParser:
    """The flags; the method flags are those of `registry`'s kinds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_args(parser)
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
    parser.add_argument("--H", type=int, default=None, help="image height, in pixel space (default: the size the "
                                                            "model was trained at, e.g. 512; the shapes model 64)")
    parser.add_argument("--W", type=int, default=None, help="image width, in pixel space (default: as --H)")
    parser.add_argument("--C", type=int, default=None, help="latent channels (fixed by the model; default its own)")
    parser.add_argument("--f", type=int, default=None,
                        help="downsampling factor (fixed by the model; default its own: 8 for SD, 4 for the shapes "
                             "model)")
    parser.add_argument("--n_samples", type=int, default=3,
                        help="how many samples to produce for each given prompt. A.k.a. batch size")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=7.5,
                        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    parser.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    sdxl = parser.add_argument_group("SDXL size conditioning (generative-models configs only)")
    sdxl.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="original_size_as_tuple (default: --H --W)")
    sdxl.add_argument("--crop_coords_top_left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                      help="crop_coords_top_left (default: 0 0)")
    sdxl.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="target_size_as_tuple (default: --H --W)")
    add_model_args(parser)
    add_acceleration_args(parser, registry)
    return parser


def pick_sampler(opt, geometry) -> str:
    """plms / ddim for SD 1.x/2.x (CompVis flags); EulerEDM for SDXL, where those flags do not apply."""
    if geometry.kind == "sgm":
        if opt.plms or opt.ddim_eta != 0:
            raise UsageError("an SDXL config samples with EulerEDM (generative-models): --plms and --ddim_eta do "
                             "not apply; drop them")
        return "euler"
    given = [f"--{name}" for name in ("original_size", "crop_coords_top_left", "target_size")
             if getattr(opt, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: SDXL size conditioning; this config is not an SDXL one")
    return "plms" if opt.plms else "ddim"


def size_conditioning(opt) -> gen.SizeConditioning:
    return gen.SizeConditioning(opt.H, opt.W, original_size=opt.original_size and tuple(opt.original_size),
                                crop_coords_top_left=tuple(opt.crop_coords_top_left or (0, 0)),
                                target_size=opt.target_size and tuple(opt.target_size))


FLAGS = SettingFlags(sampler="--plms", steps="--ddim_steps", eta="--ddim_eta", batch="--n_samples")


def check_options(opt):
    """Reject bad input before anything is loaded or written. Returns (batches, method, run settings)."""
    geometry = gen.model_geometry(gen.read_config(opt.config))
    if opt.H is None:
        opt.H = geometry.default_size
    if opt.W is None:
        opt.W = geometry.default_size
    if opt.n_iter < 1:
        raise UsageError(f"--n_iter must be at least 1, got {opt.n_iter}")
    gen.check_geometry(geometry, opt.C, opt.f)
    prompts = read_prompt_list(opt)
    settings = RunSettings.resolve(flags=FLAGS, sampler=pick_sampler(opt, geometry), steps=opt.ddim_steps,
                                   scale=opt.scale, eta=opt.ddim_eta, precision=opt.precision, height=opt.H,
                                   width=opt.W, batch=opt.n_samples, seed=opt.seed,
                                   seed_count=sampler_calls(opt, prompts), device=str(pick_device(opt.device)),
                                   geometry=geometry)
    batches = prompt_batches(opt, prompts)
    method = method_from_args(opt)
    settings = settings.for_method(method, FLAGS)
    gen.check_model_files(opt.config, opt.ckpt, demo=opt.demo)
    check_output_dir(opt.outdir)
    return batches, method, settings


def main(argv=None, registry: Registry = REGISTRY) -> int:
    opt = resolve_model_args(build_parser(registry).parse_args(argv))
    started = checked_start(opt, check_options)
    if started is None:
        return 2
    (batches, method, settings), model = started
    print(f"method: {method.name} = {method.label}")
    if (note := settings.method_note(method, FLAGS)) is not None:
        print(f"note: {note}")
    png_text = {"prompt_source": opt.from_file or batches[0][0], "seed": opt.seed, "steps": settings.sampler_steps,
                "sampler": settings.sampler, "scale": opt.scale, "eta": opt.ddim_eta, "method": method.name,
                "model": gen.DEMO_LABEL if opt.demo else opt.ckpt}
    writer = SampleWriter(opt.outdir, png_text, skip_save=opt.skip_save, skip_grid=opt.skip_grid)
    noise = torch.Generator().manual_seed(opt.seed)  # x_T of every batch, drawn in order on the CPU
    shape = settings.latent_shape
    fixed_code = torch.randn((opt.n_samples, *shape), generator=noise) if opt.fixed_code else None

    def sample_batch(prompts, applied, seed):
        cond = gen.encode_prompts(model, prompts, opt.scale, opt.precision, size=size_conditioning(opt))
        batch = len(prompts)
        x_T = fixed_code[:batch] if fixed_code is not None else torch.randn((batch, *shape), generator=noise)
        return gen.sample_latents(model, cond, x_T, sampler=settings.sampler, steps=settings.steps, scale=opt.scale,
                                  eta=opt.ddim_eta, seed=seed, method=applied, precision=opt.precision)

    return sample_passes(model, method, settings, opt, batches, writer, sample_batch)


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
