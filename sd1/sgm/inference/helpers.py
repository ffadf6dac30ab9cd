"""Text-to-image with an SDXL DiffusionEngine in three calls, as generative-models' sampling scripts do it:
conditioning for prompts at a size, EulerEDM sampling with classifier-free guidance from given noise, and
decoding in float32.

    c, uc = get_conditioning(engine, prompts, height=1024, width=1024)
    x_T = torch.randn((len(prompts), *latent_shape(engine, 1024, 1024)), generator=g).to(device)
    z = sample_latents(engine, c, uc, x_T, num_steps=50, cfg_scale=7.0)
    images = decode_latents(engine, z)  # (B, 3, 1024, 1024) in about [-1, 1]

Sampling announces itself through `engine.sampling_hooks`, so a datosd patch follows the steps.
"""
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Tuple

import torch

from sgm.modules.diffusionmodules.sampling import EulerEDMSampler

DISCRETIZATION = {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
LATENT_FACTOR = 8  # the SDXL VAE downsamples by 8


def latent_shape(engine, height: int, width: int) -> Tuple[int, int, int]:
    """(C, H/8, W/8) of the latents of an H x W image; H and W must let every UNet level halve evenly."""
    unet = engine.model.diffusion_model
    multiple = LATENT_FACTOR * 2 ** (len(unet.channel_mult) - 1)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} for this model, "
                         f"got {height} x {width}")
    return unet.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR


def size_batch(prompts: Sequence[str], height: int, width: int, original_size: Optional[Tuple[int, int]] = None,
               crop_coords_top_left: Tuple[int, int] = (0, 0), target_size: Optional[Tuple[int, int]] = None,
               device="cpu") -> Dict[str, object]:
    """The conditioner batch of B prompts: "txt" and the SDXL size conditioning, each (B, 2) int64:
    original_size_as_tuple (height, width) and target_size_as_tuple (height, width), both H x W unless given,
    and crop_coords_top_left (top, left), default (0, 0)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt")

    def rows(pair):
        return torch.tensor([list(pair)] * len(prompts), dtype=torch.long, device=device)

    return {
        "txt": prompts,
        "original_size_as_tuple": rows(original_size or (height, width)),
        "crop_coords_top_left": rows(crop_coords_top_left),
        "target_size_as_tuple": rows(target_size or (height, width)),
    }


def get_conditioning(engine, prompts: Sequence[str], height: int, width: int, **size) -> Tuple[Dict, Dict]:
    """(c, uc) for the prompts: {"crossattn": (B, 77, D), "vector": (B, V)} each; uc has the text parts zeroed
    and the same size conditioning (generative-models' SDXL choice: force_uc_zero_embeddings=["txt"]).
    `size`: original_size, crop_coords_top_left, target_size of `size_batch`."""
    latent_shape(engine, height, width)
    device = next(engine.conditioner.parameters()).device
    batch = size_batch(prompts, height, width, device=device, **size)
    batch_uc = dict(batch, txt=[""] * len(batch["txt"]))
    return engine.conditioner.get_unconditional_conditioning(batch, batch_uc, force_uc_zero_embeddings=["txt"])


def make_sampler(num_steps: int, cfg_scale: float = 7.0, device="cpu") -> EulerEDMSampler:
    """EulerEDMSampler over the LegacyDDPM sigmas, with VanillaCFG (no guider when cfg_scale is 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    guider = ({"target": "sgm.modules.diffusionmodules.guiders.IdentityGuider"} if cfg_scale == 1.0 else
              {"target": "sgm.modules.diffusionmodules.guiders.VanillaCFG", "params": {"scale": cfg_scale}})
    return EulerEDMSampler(num_steps=num_steps, discretization_config=DISCRETIZATION, guider_config=guider,
                           device=device)


def sample_latents(engine, c: Dict, uc: Dict, x_T: torch.Tensor, num_steps: int,
                   cfg_scale: float = 7.0) -> torch.Tensor:
    """x_T: (B, 4, h, w) unit-variance noise -> latents (B, 4, h, w), announced to engine.sampling_hooks."""
    sampler = make_sampler(num_steps, cfg_scale, device=x_T.device)

    def denoiser(x, sigma, cond):
        return engine.denoiser(engine.model, x, sigma, cond)

    with torch.no_grad():
        return sampler(denoiser, x_T, cond=c, uc=uc, sampling_hooks=engine.sampling_hooks)


@contextmanager
def float32_first_stage(engine):
    """Run the block with a float16 VAE upcast to float32 (restored after): the original SDXL VAE overflows in
    float16 at 1024 x 1024. float32 and bfloat16 VAEs are left as they are."""
    vae = engine.first_stage_model
    dtype = next(vae.parameters()).dtype
    if dtype != torch.float16:
        yield
        return
    vae.float()
    try:
        yield
    finally:
        vae.to(dtype)


def decode_latents(engine, z: torch.Tensor) -> torch.Tensor:
    """z: (B, 4, h, w) scaled latents -> images (B, 3, 8h, 8w) in about [-1, 1], float32, decoded with autocast
    off and a float16 VAE upcast (see float32_first_stage)."""
    with float32_first_stage(engine), torch.autocast(z.device.type, enabled=False):
        vae_dtype = next(engine.first_stage_model.parameters()).dtype
        return engine.decode_first_stage(z.to(vae_dtype)).float()

