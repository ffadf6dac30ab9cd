"""Image-to-image with the CompVis command-line interface, DDIM, and the same acceleration flags as txt2img.

    python scripts/img2img.py --init-img photo.png --strength 0.75 --prompt "a fantasy landscape" --ckpt ...
    python scripts/img2img.py --demo --init-img photo.png --deepcache

The init image is resized (Lanczos) to the nearest smaller multiple of 64 per side (latent sides multiples of
8), encoded, noised to DDIM step t_enc = int(strength * ddim_steps) and denoised over those t_enc steps, as in
CompVis. A --strategy for --dato must therefore have t_enc steps.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm, trange

from datosd.cli import add_acceleration_args, resolve_acceleration
from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.runtime import (
    DEMO_LABEL,
    SampleWriter,
    UsageError,
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
    parser.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    parser.add_argument("--outdir", type=str, nargs="?", default="outputs/img2img-samples",
                        help="dir to write results to (appended to, never overwritten)")
    parser.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    parser.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of ddim sampling steps")
    parser.add_argument("--fixed_code", action="store_true",
                        help="if enabled, uses the same starting noise across samples")
    parser.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (eta=0.0 corresponds to deterministic sampling)")
    parser.add_argument("--n_iter", type=int, default=1, help="sample this often")
    parser.add_argument("--C", type=int, default=4, help="latent channels")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor, most often 8 or 16")
    parser.add_argument("--n_samples", type=int, default=2, help="how many samples to produce for each given prompt")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=5.0, help="unconditional guidance scale")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising. 1.0 corresponds to full destruction of information in init image")
    parser.add_argument("--from-file", type=str, help="if specified, load prompts from this file")
    parser.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="path to config which constructs model")
    parser.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="path to checkpoint of model")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights if it has them")
    parser.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    parser.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                        help="autocast = float16 on CUDA, bfloat16 on CPU; full = float32")
    parser.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--demo", action="store_true",
                        help="use the built-in tiny model with seeded random weights (no checkpoint needed)")
    add_acceleration_args(parser)
    return parser


def load_init_image(path):
    """Image file -> (1, 3, H, W) in [-1, 1], sides cut down to multiples of 64."""
    if not path or not os.path.isfile(path):
        raise UsageError(f"--init-img {path} does not exist; give the path of the image to transform")
    try:
        image = Image.open(path).convert("RGB")
    except Exception as err:
        raise UsageError(f"--init-img {path} is not a readable image ({err})") from None
    w, h = image.size
    w, h = w - w % 64, h - h % 64
    if w == 0 or h == 0:
        raise UsageError(f"--init-img {path} is {image.size[0]}x{image.size[1]}: both sides must be at least 64")
    image = image.resize((w, h), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array[None].transpose(0, 3, 1, 2).copy())
    return 2.0 * tensor - 1.0


def encode_steps(opt):
    """t_enc: how many DDIM steps img2img runs (CompVis: int(strength * ddim_steps))."""
    if not 0.0 <= opt.strength <= 1.0 or not math.isfinite(opt.strength):
        raise UsageError(f"--strength must be in [0, 1], got {opt.strength}")
    t_enc = int(opt.strength * opt.ddim_steps)
    if t_enc < 1:
        raise UsageError(f"--strength {opt.strength} with --ddim_steps {opt.ddim_steps} runs no step; raise either")
    return t_enc


def main(argv=None, model_loader=load_model):
    """Run img2img with command-line flags `argv`. `model_loader` builds the model from (config, ckpt, device,
    use_ema=, demo=) after every flag is checked; a driver transforming many images passes one that caches."""
    opt = build_parser().parse_args(argv)
    try:
        for name in ("ddim_steps", "n_iter", "n_samples"):
            if getattr(opt, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(opt, name)}")
        if not math.isfinite(opt.scale):
            raise UsageError("--scale must be a finite number")
        init_image = load_init_image(opt.init_img)
        t_enc = encode_steps(opt)
        if opt.from_file:
            if not os.path.isfile(opt.from_file):
                raise UsageError(f"--from-file {opt.from_file} does not exist")
            with open(opt.from_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
            batches = [prompts[i:i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]
        else:
            batches = [opt.n_samples * [opt.prompt]]
        device = pick_device(opt.device)
        acceleration = resolve_acceleration(opt, t_enc)
        model = model_loader(opt.config, opt.ckpt, device, use_ema=opt.ema, demo=opt.demo)
    except (UsageError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if opt.demo:
        print(f"*** {DEMO_LABEL}: images are noise-like by design ***")
    print(f"img2img runs {t_enc} of {opt.ddim_steps} DDIM steps (strength {opt.strength})")
    method = acceleration.apply(model, seed=opt.seed)
    print(f"method: {method}")
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=opt.ddim_steps, ddim_eta=opt.ddim_eta, verbose=False)

    png_text = {"init_img": opt.init_img, "strength": opt.strength, "seed": opt.seed, "steps": opt.ddim_steps,
                "scale": opt.scale, "method": method, "model": DEMO_LABEL if opt.demo else opt.ckpt}
    writer = SampleWriter(opt.outdir, png_text, skip_save=opt.skip_save, skip_grid=opt.skip_grid)
    generator = torch.Generator().manual_seed(opt.seed)
    with torch.no_grad(), precision_scope(opt.precision, device):
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(init_image.to(device)),
                                                     generator=torch.Generator(device=device).manual_seed(opt.seed))
        fixed_noise = torch.randn((opt.n_samples, *init_latent.shape[1:]), generator=generator)
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                batch = len(prompts)
                uc = model.get_learned_conditioning(batch * [""]) if opt.scale != 1.0 else None
                c = model.get_learned_conditioning(list(prompts))
                noise = fixed_noise[:batch] if opt.fixed_code else torch.randn(
                    (batch, *init_latent.shape[1:]), generator=generator)
                z_enc = sampler.stochastic_encode(init_latent.expand(batch, -1, -1, -1),
                                                  torch.tensor([t_enc] * batch), noise=noise.to(device))
                samples, seconds = timed(lambda: sampler.decode(
                    z_enc, c, t_enc, unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc),
                    device)
                writer.add(to_uint8_images(model.decode_first_stage(samples)), seconds)
    acceleration.remove(model)
    writer.finish(opt.n_rows if opt.n_rows > 0 else opt.n_samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
