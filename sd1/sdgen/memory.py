"""The memory a sampling run needs at least, from the model config's geometry and the run's sizes (no model is
built), and the memory free for it, so that a run that cannot fit is refused before anything is allocated.

The estimate is a lower bound for one sampler call of B images (R = 2B UNet rows with classifier-free
guidance, B without), with b bytes per value (4 in float32, 2 under autocast):
- latents: x_T, the sample and the model output, 3 x (B, C, h, w) in float32;
- UNet, at the level l that needs most (N_l = h w / 4^l latent pixels, C_l channels): the input-block outputs of
  that level, which wait for the skip connections (one C_l per ResBlock, and below level 0 the downsampler's
  C_(l-1) output), and one block's working set: at a level with attention the
  GEGLU feed-forward's projection (R, N_l, 8 C_l), its gelu half and their product (4 C_l each) and the
  residual stream, 17 C_l; at a level without, a ResBlock's input and output, 2 C_l; times R N_l b;
- VAE decode: the input of the decoder's first full-resolution ResBlock and its normalised copy,
  2 x (B, C_in, H, W) (in float32 for SDXL, whose VAE decodes in float32);
and the run's peak is at least latents + max(UNet, VAE decode). Not counted: the weights, the attention matrices
(torch's scaled_dot_product_attention kernels for long sequences never hold them), the text encoder, the
allocator's slack. Every counted tensor is held at the same time by a real run, so a run refused here could
not have run.
"""
import os
from dataclasses import dataclass
from typing import Tuple

import torch

from .generate import ModelGeometry

GIB = 1024 ** 3
FEED_FORWARD_VALUES = 17  # per channel and token at an attention level: 8 (GEGLU projection) + 4 + 4 + 1 residual
RESBLOCK_VALUES = 2  # per channel and pixel elsewhere: a ResBlock's input and output


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run holds at least: its latents, the UNet's peak and the VAE decode's peak (see the module)."""

    latents: int
    unet: int
    decode: int

    @property
    def total(self) -> int:
        return self.latents + max(self.unet, self.decode)

    def describe(self) -> str:
        return (f"UNet activations {size_text(self.unet)}, VAE decode {size_text(self.decode)}, latents "
                f"{size_text(self.latents)}; weights not counted")


def size_text(n_bytes: float) -> str:
    """Bytes for a message: '512 MiB', '2.5 GiB', '3,590 GiB'."""
    if n_bytes < GIB:
        return f"{n_bytes / 1024 ** 2:.3g} MiB"
    gib = n_bytes / GIB
    return f"{gib:,.0f} GiB" if gib >= 100 else f"{gib:.3g} GiB"


def estimate_run_memory(geometry: ModelGeometry, height: int, width: int, batch: int, guided: bool,
                        precision: str) -> MemoryEstimate:
    """The lower bound of the module docstring for one sampler call of `batch` images of height x width;
    `guided`: classifier-free guidance doubles the UNet's rows; precision 'full' (float32) or 'autocast'."""
    h, w = height // geometry.factor, width // geometry.factor
    value_bytes = 4 if precision == "full" else 2
    rows = batch * (2 if guided else 1)
    latents = 3 * batch * geometry.channels * h * w * 4
    unet = 0
    for level, (channels, res_blocks, attention) in enumerate(zip(
            geometry.level_channels, geometry.level_res_blocks, geometry.level_attention)):
        pixels = (h >> level) * (w >> level)
        waiting = res_blocks * channels + (geometry.level_channels[level - 1] if level else 0)
        working = (FEED_FORWARD_VALUES if attention else RESBLOCK_VALUES) * channels
        unet = max(unet, rows * pixels * (waiting + working) * value_bytes)
    decode_bytes = 4 if geometry.kind == "sgm" else value_bytes
    decode = 2 * batch * geometry.decoder_channels * height * width * decode_bytes
    return MemoryEstimate(latents=latents, unet=unet, decode=decode)


def free_memory(device: str) -> Tuple[int, str]:
    """(bytes free for a run on `device`, where they were measured): CUDA's free memory on a CUDA device, else
    the RAM available plus the free swap (psutil), or without psutil the total RAM (os.sysconf)."""
    where = torch.device(device)
    if where.type == "cuda":
        free, _ = torch.cuda.mem_get_info(where)
        return int(free), f"free on {where}"
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of RAM in this machine"
    return int(psutil.virtual_memory().available + psutil.swap_memory().free), "of RAM (and swap) available"
