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
import math
import sys

import torch
from tqdm import tqdm, trange

from ldm.checkpoint import CheckpointError

from .. import generate as gen
from ..images import SampleWriter, check_output_dir, load_init_image, to_uint8_images
from ..methods import MethodError, parse_method
from ..runtime import UsageError, pick_device, seed_everything
from . import run
from .flags import (add_acceleration_args, add_model_args, execution_from_args, method_from_args, method_name_from_args,
                    resolve_model_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render")
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
    parser.add_argument("--C", type=int, default=4, help="latent channels (fixed by the model)")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor (fixed by the model)")
    parser.add_argument("--n_samples", type=int, default=2, help="how many samples to produce for each given prompt")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=5.0, help="unconditional guidance scale")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising. 1.0 corresponds to full destruction of information "
                             "in init image")
    parser.add_argument("--from-file", type=str, help="if specified, load prompts from this file")
    parser.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    add_model_args(parser)
    add_acceleration_args(parser)
    return parser


def resolve_method(opt, t_enc: int):
    """The method for a t_enc-step run: --dato without --strategy takes b1's last t_enc steps."""
    method = method_from_args(opt)
    if method.steps is not None:
        raise UsageError(f"img2img samples with DDIM over --strength x --ddim_steps steps; {method.name} "
                         f"sets its own sampler and steps")
    if opt.dato and opt.strategy is None and method.strategy.steps != t_enc:
        name = method_name_from_args(opt).replace("dato", f"dato@last{t_enc}", 1)
        method = parse_method(name)
        print(f"--dato: b1 is a 50-step strategy; this run of {t_enc} steps uses its last {t_enc} steps "
              f"({method.name})")
    method.check_steps(t_enc)
    return method


def check_options(opt):
    """Reject bad input before anything is loaded or written. Returns (init image, batches, method, t_enc)."""
    for name in ("ddim_steps", "n_iter", "n_samples"):
        if getattr(opt, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(opt, name)}")
    if opt.ddim_steps > 1000:
        raise UsageError("--ddim_steps must be at most 1000 (the number of training timesteps)")
    if not math.isfinite(opt.scale) or not math.isfinite(opt.ddim_eta) or opt.ddim_eta < 0:
        raise UsageError("--scale must be a finite number and --ddim_eta a finite number >= 0")
    geometry = gen.model_geometry(gen.read_config(opt.config))
    gen.check_geometry(geometry, opt.C, opt.f)
    init_image = load_init_image(opt.init_img, multiple=gen.latent_multiple(geometry), flag="--init-img")
    total = gen.sampler_steps("ddim", opt.ddim_steps)
    t_enc = min(gen.img2img_steps(opt.strength, opt.ddim_steps), total)
    if opt.from_file:
        try:
            with open(opt.from_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--from-file {opt.from_file}: cannot read it ({err})") from None
        if not prompts:
            raise UsageError(f"--from-file {opt.from_file} holds no prompt")
        batches = gen.batches(prompts, opt.n_samples)
    else:
        batches = [opt.n_samples * [opt.prompt]]
    method = resolve_method(opt, t_enc)
    gen.check_model_files(opt.config, opt.ckpt, demo=opt.demo)
    check_output_dir(opt.outdir)
    return init_image, batches, method, t_enc


def main(argv=None, model=None) -> int:
    """Run img2img with command-line flags `argv`; `model`, when given, is used instead of loading one
    (a driver transforming many images loads it once)."""
    opt = resolve_model_args(build_parser().parse_args(argv))
    try:
        init_image, batches, method, t_enc = check_options(opt)
        device = pick_device(opt.device)
        if model is None:
            model = gen.load_model(opt.config, opt.ckpt, device, use_ema=opt.ema, demo=opt.demo)
    except (UsageError, CheckpointError, MethodError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seed_everything(opt.seed)
    if opt.demo:
        print(f"*** {gen.DEMO_LABEL}: images are noise-like by design ***")
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
    run_index = 0
    with method.apply(model, t_enc, seed=opt.seed, execution=execution_from_args(opt)) as applied:
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                batch = len(prompts)
                cond = gen.encode_prompts(model, prompts, opt.scale, opt.precision)
                noise = fixed_noise[:batch] if opt.fixed_code else torch.randn((batch, *latent_shape),
                                                                              generator=noise_generator)
                result = gen.img2img_latents(model, init_latent.expand(batch, -1, -1, -1), cond, noise,
                                             steps=opt.ddim_steps, encode_steps=t_enc, scale=opt.scale,
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
