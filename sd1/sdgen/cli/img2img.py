"""Image-to-image with the CompVis command-line interface, DDIM, and the same acceleration flags as txt2img.

    python scripts/img2img.py --init-img photo.png --strength 0.75 --prompt "a fantasy landscape" --ckpt ...
    python scripts/img2img.py --demo --init-img photo.png --deepcache

The init image is resized (Lanczos) to the nearest smaller multiple of 64 per side (latent sides multiples of
8), encoded, noised to DDIM step t_enc = int(strength * ddim_steps) and denoised over those t_enc steps, as in
CompVis; --strength 1.0 starts from pure noise and runs every step. A DaTo strategy must therefore have t_enc
steps: without --strategy, --dato uses the last t_enc steps of b1 (the steps of its 50-step schedule that
img2img visits) and says so; for another strategy use --method 'dato:FILE@last<t_enc>'.
"""
import argparse
import sys

import torch

from .. import generate as gen
from ..images import SampleWriter, check_output_dir, load_init_image
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
    parser.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    parser.add_argument("--outdir", type=str, nargs="?", default="outputs/img2img-samples",
                        help="dir to write results to (appended to, never overwritten)")
    parser.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    parser.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of ddim sampling steps")
    parser.add_argument("--fixed_code", action="store_true",
                        help="if enabled, uses the same starting noise across samples")
    parser.add_argument("--ddim_eta", type=float, default=0.0,
                        help="ddim eta (eta=0.0 corresponds to deterministic sampling)")
    parser.add_argument("--n_iter", type=int, default=1, help="sample this often")
    parser.add_argument("--C", type=int, default=None, help="latent channels (fixed by the model; default its own)")
    parser.add_argument("--f", type=int, default=None, help="downsampling factor (fixed by the model; default its own)")
    parser.add_argument("--n_samples", type=int, default=2, help="how many samples to produce for each given prompt")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=5.0, help="unconditional guidance scale")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising. 1.0 corresponds to full destruction of information "
                             "in init image")
    parser.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    add_model_args(parser)
    add_acceleration_args(parser, registry)
    return parser


FLAGS = SettingFlags(steps="--ddim_steps", eta="--ddim_eta", size="the --init-img size", batch="--n_samples")


def resolve_method(opt, settings: RunSettings):
    """The method of the flags for the run's steps: --dato without --strategy takes b1's last steps (the ones
    of its 50-step schedule img2img visits), and says so."""
    method = method_from_args(opt)
    steps = settings.sampler_steps
    adapted = method.for_last_steps(steps)
    if adapted.name != method.name:
        print(f"{method.name}: this run of {steps} steps uses its last {steps} steps ({adapted.name})")
    return adapted


def check_options(opt):
    """Reject bad input before anything is loaded or written. Returns (init image, batches, method, run
    settings)."""
    if opt.n_iter < 1:
        raise UsageError(f"--n_iter must be at least 1, got {opt.n_iter}")
    geometry = gen.model_geometry(gen.read_config(opt.config))
    gen.check_geometry(geometry, opt.C, opt.f)
    init_image = load_init_image(opt.init_img, multiple=gen.latent_multiple(geometry), flag="--init-img")
    prompts = read_prompt_list(opt)
    settings = RunSettings.resolve(flags=FLAGS, sampler="ddim", steps=opt.ddim_steps, scale=opt.scale,
                                   eta=opt.ddim_eta, precision=opt.precision, height=init_image.shape[-2],
                                   width=init_image.shape[-1], batch=opt.n_samples, seed=opt.seed,
                                   seed_count=sampler_calls(opt, prompts), device=str(pick_device(opt.device)),
                                   strength=opt.strength, geometry=geometry)
    batches = prompt_batches(opt, prompts)
    method = resolve_method(opt, settings)
    settings = settings.for_method(method, FLAGS)
    gen.check_model_files(opt.config, opt.ckpt, demo=opt.demo)
    check_output_dir(opt.outdir)
    return init_image, batches, method, settings


def main(argv=None, model=None, registry: Registry = REGISTRY) -> int:
    """Run img2img with command-line flags `argv`; `model`, when given, is used instead of loading one
    (a driver transforming many images loads it once)."""
    opt = resolve_model_args(build_parser(registry).parse_args(argv))
    started = checked_start(opt, check_options, model)
    if started is None:
        return 2
    (init_image, batches, method, settings), model = started
    t_enc = settings.sampler_steps
    print(f"img2img runs {t_enc} of {opt.ddim_steps} DDIM steps (strength {opt.strength})")
    print(f"method: {method.name} = {method.label}")
    png_text = {"init_img": opt.init_img, "strength": opt.strength, "seed": opt.seed, "steps": opt.ddim_steps,
                "scale": opt.scale, "eta": opt.ddim_eta, "method": method.name,
                "model": gen.DEMO_LABEL if opt.demo else opt.ckpt}
    writer = SampleWriter(opt.outdir, png_text, skip_save=opt.skip_save, skip_grid=opt.skip_grid)
    noise_generator = torch.Generator().manual_seed(opt.seed)
    init_latent = gen.encode_image(model, init_image, opt.seed, opt.precision)
    latent_shape = tuple(init_latent.shape[1:])
    fixed_noise = torch.randn((opt.n_samples, *latent_shape), generator=noise_generator)

    def transform_batch(prompts, applied, seed):
        batch = len(prompts)
        cond = gen.encode_prompts(model, prompts, opt.scale, opt.precision)
        noise = fixed_noise[:batch] if opt.fixed_code else torch.randn((batch, *latent_shape),
                                                                      generator=noise_generator)
        return gen.img2img_latents(model, init_latent.expand(batch, -1, -1, -1), cond, noise, steps=opt.ddim_steps,
                                   encode_steps=t_enc, scale=opt.scale, eta=opt.ddim_eta, seed=seed, method=applied,
                                   precision=opt.precision)

    return sample_passes(model, method, settings, opt, batches, writer, transform_batch)


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
