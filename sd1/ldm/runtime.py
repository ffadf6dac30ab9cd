"""What the command-line scripts share: device and precision choice, model loading, image files."""
import os
import random
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, PngImagePlugin

from ldm.checkpoint import CheckpointError
from ldm.util import instantiate_from_config, load_model_from_config, seeded_random_weights

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "tiny-demo.yaml"
DEMO_SEED = 0
DEMO_LABEL = "random-weight tiny demo model (not Stable Diffusion weights)"


class UsageError(ValueError):
    """Bad command-line input, reported before any work starts."""


def pick_device(name="auto"):
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto.")
    return torch.device(name)


def autocast_dtype(device):
    """The autocast dtype of --precision autocast: float16 on CUDA, bfloat16 on CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def precision_scope(precision, device):
    """Context for the model calls: torch.autocast for 'autocast', nothing for 'full' (float32)."""
    if precision == "autocast":
        device = torch.device(device)
        return torch.autocast(device.type, dtype=autocast_dtype(device))
    if precision != "full":
        raise UsageError(f"--precision must be 'full' or 'autocast', got {precision!r}")
    return nullcontext()


def seed_everything(seed):
    """Seed Python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_demo_model(config_path=DEMO_CONFIG, seed=DEMO_SEED):
    """The tiny demo LatentDiffusion with seeded random weights (no checkpoint needed)."""
    config = OmegaConf.load(str(config_path))
    model = instantiate_from_config(config.model)
    return seeded_random_weights(model, seed).eval()


def load_model(config_path, ckpt, device, use_ema=False, demo=False, verbose=True):
    """Load the model a script asked for: the demo model, or `config_path` + `ckpt` (checked first)."""
    if demo:
        model = build_demo_model()
    else:
        if not os.path.exists(config_path):
            raise UsageError(f"config file not found: {config_path}")
        if not os.path.exists(ckpt):
            raise CheckpointError(
                f"checkpoint not found: {ckpt}. Put the Stable Diffusion weights there (CompVis layout: "
                f"models/ldm/stable-diffusion-v1/model.ckpt), pass --ckpt PATH to a .ckpt or .safetensors "
                f"file, or run with --demo to try the pipeline on the built-in tiny model with random weights."
            )
        config = OmegaConf.load(str(config_path))
        model = load_model_from_config(config, ckpt, use_ema=use_ema, verbose=verbose)
    return model.to(device).eval()


def latent_shape(model, height, width, factor=8, channels=4):
    """(C, H/f, W/f) for an image of height x width; sides must give latents that are multiples of 8."""
    multiple = factor * 8
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise UsageError(
            f"image size {height}x{width} is not supported: --H and --W must be positive multiples of {multiple} "
            f"(latent sides multiples of 8, as the UNet downsamples three times), e.g. 512x512 or 512x768."
        )
    return channels, height // factor, width // factor


def to_uint8_images(x):
    """Decoded images (B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8 arrays."""
    x = torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0)
    arrays = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).round().astype(np.uint8)
    return list(arrays)


def make_grid(images, n_rows):
    """Tile (H, W, 3) uint8 arrays into a grid with `n_rows` images per row (2 px black padding)."""
    n_rows = max(1, min(n_rows, len(images)))
    h, w, c = images[0].shape
    n_lines = (len(images) + n_rows - 1) // n_rows
    pad = 2
    grid = np.zeros((n_lines * (h + pad) + pad, n_rows * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, n_rows)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def next_free_index(folder, pattern):
    """One past the largest number in file names of `folder` matching `pattern` (a regex with one group)."""
    regex = re.compile(pattern)
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := regex.fullmatch(name))]
    return max(numbers) + 1 if numbers else 0


def save_png(array, path, text=None):
    """Write a PNG without ever replacing an existing file; `text` goes into PNG text chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    with open(path, "xb") as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=info)


class SampleWriter:
    """Writes numbered samples to outdir/samples and one grid per run to outdir, after what is there.

    Nothing existing is ever replaced: numbering continues from the largest number found.
    """

    def __init__(self, outdir, png_text, skip_save=False, skip_grid=False):
        self.outdir = outdir
        self.sample_path = os.path.join(outdir, "samples")
        os.makedirs(self.sample_path, exist_ok=True)
        self.base_count = next_free_index(self.sample_path, r"(\d+)\.png")
        self.grid_count = next_free_index(outdir, r"grid-(\d+)\.png")
        self.png_text = png_text
        self.skip_save = skip_save
        self.skip_grid = skip_grid
        self.images = []
        self.sampling_seconds = 0.0

    def add(self, images, sampling_seconds=0.0):
        """images: list of (H, W, 3) uint8 arrays of one batch; sampling_seconds: its sampler time."""
        if not self.skip_save:
            for image in images:
                save_png(image, os.path.join(self.sample_path, f"{self.base_count:05}.png"), self.png_text)
                self.base_count += 1
        self.images.extend(images)
        self.sampling_seconds += sampling_seconds

    def finish(self, n_rows):
        """Write the grid and print the timing summary."""
        if not self.skip_grid and self.images:
            grid = make_grid(self.images, n_rows)
            save_png(grid, os.path.join(self.outdir, f"grid-{self.grid_count:04}.png"), self.png_text)
        count = len(self.images)
        print(f"sampling time: {self.sampling_seconds:.2f} s for {count} images "
              f"({self.sampling_seconds / max(1, count):.2f} s per image)")
        print(f"Your samples are ready and waiting for you here: \n{self.outdir} \nEnjoy.")


def timed(fn, device):
    """Run fn() and return (result, seconds), synchronising CUDA around it."""
    import time

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started
