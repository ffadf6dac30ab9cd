"""EDM-style samplers over a denoiser D(x, sigma, c) (`sgm` sampling; Karras et al. 2022, Algorithm 2).

A sampler is called as `sampler(denoiser, x, cond, uc=None, num_steps=None)` with
`denoiser(x, sigma, c) -> denoised` (for a DiffusionEngine: `lambda x, s, c: engine.denoiser(engine.model, x, s, c)`)
and unit-variance noise x; it returns the sampled latents.

Sampling hooks: the keyword `sampling_hooks` (an `ldm.models.diffusion.hooks.SamplingHooks`, e.g.
`engine.sampling_hooks`) receives the same events as under the CompVis DDIM/PLMS samplers:
sampling_started(num_steps), step_started(i) for i = 0 (noisiest) .. num_steps - 1, model_call(cfg_halves)
before each denoiser call (cfg_halves is True with VanillaCFG, whose batch is [uncond; cond]) and
sampling_finished(). It is a keyword of the call, not of the constructor, because the sampler does not
know the model it samples; without it no hook is told anything.
"""
from typing import Callable, Dict, Optional, Union

import torch
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from ldm.models.diffusion.hooks import SamplingHooks
from ldm.modules.encoders.modules import _resolve_device
from sgm.util import append_dims, default, instantiate_from_config

DEFAULT_GUIDER = {"target": "sgm.modules.diffusionmodules.guiders.IdentityGuider"}
ConfigLike = Union[Dict, DictConfig, ListConfig]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - D(x)) / sigma. x, denoised: (B, C, H, W), sigma: (B,)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


class BaseDiffusionSampler:
    """The schedule (`discretization_config`), the guider (`guider_config`, default none) and the device the
    sigmas live on (a CUDA device falls back to the CPU when there is none)."""

    first_step_model_calls = 1  # denoiser calls (each with the whole CFG batch) in step 0; one in every later step
    takes_eta = False  # s_churn 0 here: deterministic

    def __init__(self, discretization_config: ConfigLike, num_steps: Optional[int] = None,
                 guider_config: Optional[ConfigLike] = None, verbose: bool = False, device: str = "cuda"):
        self.num_steps = num_steps
        self.discretization = instantiate_from_config(discretization_config)
        self.guider = instantiate_from_config(default(guider_config, DEFAULT_GUIDER))
        self.verbose = verbose
        self.device = _resolve_device(device)

    def prepare_sampling_loop(self, x, cond, uc=None, num_steps=None):
        """x: (B, C, H, W) unit-variance noise -> (x scaled to the first sigma, s_in (B,) ones, sigmas
        (S + 1,) with a final 0, S + 1, cond, uc)."""
        num_steps = default(num_steps, self.num_steps)
        if num_steps is None or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int (constructor or call), got {num_steps}")
        sigmas = self.discretization(num_steps, device=self.device)
        uc = default(uc, cond)
        x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        s_in = x.new_ones([x.shape[0]])
        return x, s_in, sigmas, len(sigmas), cond, uc

    def denoise(self, x, denoiser, sigma, cond, uc):
        """One guided denoiser evaluation: x (B, ...), sigma (B,) -> denoised (B, ...)."""
        denoised = denoiser(*self.guider.prepare_inputs(x, sigma, cond, uc))
        return self.guider(denoised, sigma)

    def get_sigma_gen(self, num_sigmas):
        """The step indices 0 .. num_sigmas - 2, with a progress bar when verbose."""
        steps = range(num_sigmas - 1)
        if self.verbose:
            steps = tqdm(steps, desc=f"Sampling with {type(self).__name__} for {num_sigmas - 1} steps")
        return steps


class SingleStepDiffusionSampler(BaseDiffusionSampler):
    def sampler_step(self, sigma, next_sigma, denoiser, x, cond, uc, *args, **kwargs):
        raise NotImplementedError

    def euler_step(self, x, d, dt):
        return x + dt * d


class EDMSampler(SingleStepDiffusionSampler):
    """Karras et al.'s stochastic sampler: optional churn (s_churn > 0 adds noise with the global RNG, as
    upstream), an Euler step, and a correction step the subclass defines."""

    def __init__(self, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise

    def sampler_step(self, sigma, next_sigma, denoiser, x, cond, uc=None, gamma=0.0):
        """x at sigma (B,) -> x at next_sigma (B,)."""
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            eps = torch.randn_like(x) * self.s_noise
            x = x + eps * append_dims(sigma_hat ** 2 - sigma ** 2, x.ndim) ** 0.5
        denoised = self.denoise(x, denoiser, sigma_hat, cond, uc)
        d = to_d(x, sigma_hat, denoised)
        dt = append_dims(next_sigma - sigma_hat, x.ndim)
        euler_step = self.euler_step(x, d, dt)
        return self.possible_correction_step(euler_step, x, d, dt, next_sigma, denoiser, cond, uc)

    def possible_correction_step(self, euler_step, x, d, dt, next_sigma, denoiser, cond, uc):
        raise NotImplementedError

    def __call__(self, denoiser: Callable, x: torch.Tensor, cond: Dict, uc: Optional[Dict] = None,
                 num_steps: Optional[int] = None, *, sampling_hooks: Optional[SamplingHooks] = None) -> torch.Tensor:
        """x: (B, C, H, W) unit-variance noise -> the sampled latents (B, C, H, W)."""
        x, s_in, sigmas, num_sigmas, cond, uc = self.prepare_sampling_loop(x, cond, uc, num_steps)
        hooks = default(sampling_hooks, SamplingHooks())
        cfg_halves = bool(getattr(self.guider, "cfg_halves", False))

        def announced_denoiser(*args, **kwargs):
            hooks.model_call(cfg_halves)
            return denoiser(*args, **kwargs)

        with hooks.run(num_sigmas - 1):
            for i in self.get_sigma_gen(num_sigmas):
                hooks.step_started(i)
                gamma = (min(self.s_churn / (num_sigmas - 1), 2 ** 0.5 - 1)
                         if self.s_tmin <= sigmas[i] <= self.s_tmax else 0.0)
                x = self.sampler_step(s_in * sigmas[i], s_in * sigmas[i + 1], announced_denoiser, x, cond, uc,
                                      gamma)
        return x


class EulerEDMSampler(EDMSampler):
    """The first-order (Euler) EDM sampler, one denoiser call per step: SDXL's default sampler."""

    def possible_correction_step(self, euler_step, x, d, dt, next_sigma, denoiser, cond, uc):
        return euler_step
