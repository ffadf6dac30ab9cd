"""Guidance of the samplers (`sgm` guiders): how a denoiser call is batched and its outputs combined.

`cfg_halves` tells the sampling hooks (ldm.models.diffusion.hooks) whether the denoiser's batch is
[unconditional; conditional] (datosd aligns the two halves' token choices).
"""
from typing import Dict, Tuple

import torch

GUIDED_KEYS = ("vector", "crossattn", "concat")


class VanillaCFG:
    """Classifier-free guidance on the denoised estimates: x_u + scale * (x_c - x_u), one batch [uc; c]."""

    cfg_halves = True

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x: (2B, C, H, W), the denoised [uncond; cond] -> (B, C, H, W)."""
        x_u, x_c = x.chunk(2)
        return x_u + self.scale * (x_c - x_u)

    def prepare_inputs(self, x: torch.Tensor, s: torch.Tensor, c: Dict,
                       uc: Dict) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
        """x: (B, ...), s: (B,) -> (2B, ...), (2B,) and the conditioning with uc stacked before c."""
        c_out = {}
        for key in c:
            if key in GUIDED_KEYS:
                c_out[key] = torch.cat((uc[key], c[key]), 0)
            else:
                if c[key] != uc[key]:
                    raise ValueError(f"conditioning entry {key!r} differs between cond and uncond; only "
                                     f"{GUIDED_KEYS} can be guided")
                c_out[key] = c[key]
        return torch.cat([x] * 2), torch.cat([s] * 2), c_out


class IdentityGuider:
    """No guidance: the conditional prediction only."""

    cfg_halves = False

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    def prepare_inputs(self, x: torch.Tensor, s: torch.Tensor, c: Dict,
                       uc: Dict) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
        return x, s, dict(c)
