"""DiffusionEngine (`sgm.models.diffusion`), inference only: the SDXL model of generative-models.

Holds `model` (an OpenAIWrapper whose `diffusion_model` is the UNet), `denoiser` (D(x, sigma) around it),
`conditioner` (text and size embedders) and `first_stage_model` (the VAE, latents scaled by `scale_factor`).
Sampling is done by a sampler (sgm.modules.diffusionmodules.sampling) over
`denoiser(model, x, sigma, c)`; see sgm.inference.helpers for the whole text-to-image path.
"""
import math
from contextlib import nullcontext
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig

from ldm.models.diffusion.hooks import SamplingHooks
from sgm.modules import UNCONDITIONAL_CONFIG
from sgm.modules.diffusionmodules.wrappers import OPENAIUNETWRAPPER
from sgm.util import default, get_obj_from_str, instantiate_from_config

ConfigLike = Union[None, Dict, DictConfig, ListConfig]


class DiffusionEngine(nn.Module):
    """The generative-models constructor; its training arguments (optimizer_config, scheduler_config,
    loss_fn_config, ema_decay_rate, input_key, log_keys, no_cond_log) are accepted and ignored.

    disable_first_stage_autocast: decode and encode with autocast off (SDXL: the VAE runs in its own dtype).
    Without it they follow the caller's autocast state (upstream would switch CUDA autocast on).
    en_and_decode_n_samples_a_time: decode/encode at most that many images at once.
    """

    def __init__(self, network_config, denoiser_config, first_stage_config, conditioner_config: ConfigLike = None,
                 sampler_config: ConfigLike = None, optimizer_config: ConfigLike = None,
                 scheduler_config: ConfigLike = None, loss_fn_config: ConfigLike = None,
                 network_wrapper: Optional[str] = None, ckpt_path: Optional[str] = None, use_ema: bool = False,
                 ema_decay_rate: float = 0.9999, scale_factor: float = 1.0, disable_first_stage_autocast=False,
                 input_key: str = "jpg", log_keys: Optional[List] = None, no_cond_log: bool = False,
                 compile_model: bool = False, en_and_decode_n_samples_a_time: Optional[int] = None):
        super().__init__()
        if use_ema:
            raise ValueError("use_ema is a training option; SDXL checkpoints hold no EMA copy (set use_ema: false)")
        unet = instantiate_from_config(network_config)
        self.model = get_obj_from_str(default(network_wrapper, OPENAIUNETWRAPPER))(unet, compile_model=compile_model)
        self.denoiser = instantiate_from_config(denoiser_config)
        self.sampler = instantiate_from_config(sampler_config) if sampler_config is not None else None
        self.conditioner = instantiate_from_config(default(conditioner_config, UNCONDITIONAL_CONFIG))
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        for param in self.first_stage_model.parameters():
            param.requires_grad = False
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        # Observers the samplers tell about each run, step and UNet call (ldm.models.diffusion.hooks; datosd).
        self.sampling_hooks = SamplingHooks()
        if ckpt_path is not None:
            from ldm.checkpoint import load_state_dict_into

            load_state_dict_into(self, ckpt_path)

    def _chunks(self, x: torch.Tensor) -> List[torch.Tensor]:
        n = default(self.en_and_decode_n_samples_a_time, x.shape[0])
        return [x[k * n:(k + 1) * n] for k in range(math.ceil(x.shape[0] / n))]

    def _first_stage_dtype(self) -> torch.dtype:
        return next(self.first_stage_model.parameters()).dtype

    def _first_stage_autocast(self, device: torch.device):
        return torch.autocast(device.type, enabled=False) if self.disable_first_stage_autocast else nullcontext()

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Latent z: (B, 4, h, w) (scaled) -> image (B, 3, 8h, 8w) in about [-1, 1]."""
        z = (1.0 / self.scale_factor * z).to(self._first_stage_dtype())
        with self._first_stage_autocast(z.device):
            return torch.cat([self.first_stage_model.decode(chunk) for chunk in self._chunks(z)], dim=0)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Image x: (B, 3, H, W) in [-1, 1] -> scaled latent sample (B, 4, H/8, W/8)."""
        x = x.to(self._first_stage_dtype())
        with self._first_stage_autocast(x.device):
            z = torch.cat([self.first_stage_model.encode(chunk) for chunk in self._chunks(x)], dim=0)
        return self.scale_factor * z
