"""Noise-level schedules of the samplers (`sgm` discretizer)."""
from abc import abstractmethod

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_beta_schedule
from sgm.util import append_zero


class Discretization:
    """`discretization(n)` -> n sigmas, descending (noisiest first), then a 0 when do_append_zero."""

    def __call__(self, n, do_append_zero=True, device="cpu", flip=False):
        sigmas = self.get_sigmas(n, device=device)
        sigmas = append_zero(sigmas) if do_append_zero else sigmas
        return torch.flip(sigmas, (0,)) if flip else sigmas

    @abstractmethod
    def get_sigmas(self, n, device):
        """n sigmas, descending."""


class LegacyDDPMDiscretization(Discretization):
    """The sigmas of the discrete DDPM schedule (CompVis scaled-linear betas): sigma_t = sqrt((1 - a_t) / a_t)
    at n roughly equally spaced timesteps of the num_timesteps (all of them when n == num_timesteps)."""

    def __init__(self, linear_start=0.00085, linear_end=0.0120, num_timesteps=1000):
        super().__init__()
        self.num_timesteps = num_timesteps
        betas = make_beta_schedule("linear", num_timesteps, linear_start=linear_start, linear_end=linear_end)
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)

    def get_sigmas(self, n, device="cpu"):
        if not 1 <= n <= self.num_timesteps:
            raise ValueError(f"the number of sigmas must be in 1..{self.num_timesteps}, got {n}")
        if n < self.num_timesteps:
            # timesteps (T-1)(1 - k/n), k < n, rounded down, ascending: n=4 -> [249, 499, 749, 999]
            timesteps = np.linspace(self.num_timesteps - 1, 0, n, endpoint=False).astype(int)[::-1]
            alphas_cumprod = self.alphas_cumprod[timesteps]
        else:
            alphas_cumprod = self.alphas_cumprod
        sigmas = torch.tensor((1 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32, device=device) ** 0.5
        return torch.flip(sigmas, (0,))
