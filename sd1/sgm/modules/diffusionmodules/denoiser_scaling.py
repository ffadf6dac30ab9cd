"""Preconditioning of the denoiser: sigma -> (c_skip, c_out, c_in, c_noise) (`sgm` denoiser_scaling)."""
from typing import Tuple

import torch


class EpsScaling:
    """An eps-prediction network as an EDM denoiser: D(x) = x - sigma * eps(x / sqrt(sigma^2 + 1), sigma).

    sigma: (B, 1, 1, 1) -> c_skip 1, c_out -sigma, c_in 1 / sqrt(sigma^2 + 1), c_noise sigma.
    """

    def __call__(self, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise
