"""Fidelity of an accelerated run to the original one (same prompt, seed and starting noise): the relative RMS
error of the final latents and the PSNR of the decoded images. The benchmarks and the search's fidelity objective
use these two functions."""
from __future__ import annotations

import math

import torch


def relative_rms_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS(x - reference) / RMS(reference) over all elements, in float64 (0: identical). x, reference: one shape,
    e.g. final latents (B, C, H, W)."""
    if x.shape != reference.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(x.shape)} and {tuple(reference.shape)}; pass the "
                         f"run's output and the original run's output of the same batch and size")
    x, reference = x.detach().double(), reference.detach().double()
    return math.sqrt((x - reference).pow(2).sum().item() / max(reference.pow(2).sum().item(), 1e-300))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (clamped), peak-to-peak 2 (inf: identical). a, b: (B, 3, H, W)."""
    mse = torch.mean((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)
