"""The generation API every script and tool calls: build or load a model, encode prompts, sample latents
(optionally under an acceleration method), decode, and img2img. It serves CompVis LatentDiffusion models
(SD 1.x / 2.x: DDIM and PLMS) and generative-models DiffusionEngines (SDXL: EulerEDM with classifier-free
guidance, size conditioning, float32 decoding) alike.

    model = load_model("configs/stable-diffusion/v1-inference.yaml", "model.ckpt", device)
    cond = encode_prompts(model, ["a photograph of an astronaut riding a horse"], scale=7.5)
    x_T = start_noise([42], latent_shape(model, 512, 512))
    with parse_method("dato:b1").apply(model, steps=50, seed=42) as method:
        result = sample_latents(model, cond, x_T, sampler="plms", steps=50, scale=7.5, seed=42, method=method)
    images = decode(model, result.latents)

Randomness: the start noise comes from per-image CPU generators (`start_noise`), and every other random draw
of a run (DDIM eta noise, DaTo's random base tokens, tomesd's partition) from generators seeded with the
run's `seed`, so a seed gives the same images on any device, in any process, run after run.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from omegaconf import OmegaConf

from datosd.utils import model_family
from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import instantiate_from_config, load_model_from_config, seeded_random_weights
from sgm.inference import helpers as sdxl

from .methods import AppliedMethod
from .resources import SHAPES_CONFIG, TINY_CONFIG, find_config
from .runtime import UsageError, precision_scope, timed
from .samplers import family_samplers, sampler_info

DEMO_SEED = 0
DEMO_LABEL = "random-weight tiny model (not Stable Diffusion weights)"
SHAPES_LABEL = ("the shapes model: a small SD 1.x-structured model trained on this repository's shapes world, "
                "not Stable Diffusion")
SHAPES_PROMPT = "a red circle at the top left"  # one object: two-object prompts mostly fail (docs/shapes.md)


# --- models -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelGeometry:
    """What a model config fixes: latent channels C, the VAE downsampling factor f, the UNet's levels (the
    latent sides must halve evenly at each), its input-block count (DaTo's full depth: SD 1.x 12, SDXL 9) and
    the model kind, 'ldm' (CompVis LatentDiffusion, SD 1.x/2.x) or 'sgm' (generative-models DiffusionEngine,
    SDXL); the image side it was trained at (`size`: the config's latent image_size times f; SDXL 1024); and for
    the memory a run needs (`sdgen.memory`), per UNet level (highest resolution first) its
    channels, ResBlocks and whether it has attention, and the input channels of the VAE decoder's first
    full-resolution block. The defaults are SD 1.x's."""

    channels: int = 4
    factor: int = 8
    levels: int = 4
    kind: str = "ldm"
    blocks: int = 12
    level_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    level_res_blocks: Tuple[int, ...] = (2, 2, 2, 2)
    level_attention: Tuple[bool, ...] = (True, True, True, False)
    decoder_channels: int = 256
    size: int = 512

    @property
    def samplers(self) -> Tuple[str, ...]:
        return family_samplers(self.kind)

    @property
    def default_size(self) -> int:
        """The image side the model was trained at (SD 1.x 512, SD 2 768-v 768, SDXL 1024, the shapes model 64)."""
        return self.size


def _res_blocks(unet) -> Tuple[int, ...]:
    """ResBlocks per level of a UNet config (num_res_blocks: one int or one per level)."""
    res = unet.num_res_blocks
    return (int(res),) * len(unet.channel_mult) if isinstance(res, int) else tuple(int(r) for r in res)


def _unet_geometry(unet) -> Dict[str, object]:
    """The ModelGeometry fields of a UNet config: levels, input blocks (the input conv, num_res_blocks per level,
    a downsampler between levels), and per level its channels, ResBlocks and attention (ds = 2**level in
    attention_resolutions)."""
    res = _res_blocks(unet)
    levels = len(unet.channel_mult)
    attention = tuple(2 ** level in [int(r) for r in unet.attention_resolutions] for level in range(levels))
    return dict(levels=levels, blocks=1 + sum(res) + levels - 1, level_res_blocks=res, level_attention=attention,
                level_channels=tuple(int(unet.model_channels) * int(m) for m in unet.channel_mult))


def model_geometry(config) -> ModelGeometry:
    """ModelGeometry of a model config (an OmegaConf with `model`): CompVis or generative-models layout."""
    params = config.model.params
    vae = params.first_stage_config.params.ddconfig
    factor = 2 ** (len(vae.ch_mult) - 1)
    decoder_channels = int(vae.ch) * int(vae.ch_mult[1 if len(vae.ch_mult) > 1 else 0])
    if "network_config" in params:
        unet = params.network_config.params
        return ModelGeometry(int(unet.in_channels), factor, kind="sgm", decoder_channels=decoder_channels,
                             size=1024, **_unet_geometry(unet))
    return ModelGeometry(int(params.get("channels", 4)), factor, decoder_channels=decoder_channels,
                         size=int(params.get("image_size", 64)) * factor, **_unet_geometry(params.unet_config.params))


def is_sdxl(model) -> bool:
    """True for a generative-models DiffusionEngine (SDXL), False for a CompVis LatentDiffusion."""
    return model_family(model) == "sgm"


def read_config(path) -> OmegaConf:
    """The model config at `path` (a packaged copy for 'configs/...' outside the checkout)."""
    return OmegaConf.load(str(find_config(str(path))))


def is_shapes_config(config_path) -> bool:
    """True when `config_path` is the shapes model's config (the demo model)."""
    try:
        return find_config(str(config_path)).resolve() == SHAPES_CONFIG.resolve()
    except UsageError:
        return False


def model_banner(config_path, demo: bool) -> Optional[str]:
    """The line a script prints about a model that is not Stable Diffusion (random weights or the shapes model)."""
    if demo:
        return f"*** {DEMO_LABEL}: images are noise-like by design ***"
    if is_shapes_config(config_path):
        return (f"*** {SHAPES_LABEL}: it draws circles, squares or triangles in red, yellow, green or blue at a "
                f"place of a 3 x 3 grid, e.g. '{SHAPES_PROMPT}' (docs/shapes.md) ***")
    return None


def check_model_files(config_path, ckpt, demo: bool = False) -> None:
    """Raise UsageError / CheckpointError when the config or checkpoint is missing (nothing is loaded)."""
    if demo:
        return
    find_config(str(config_path))
    if not Path(ckpt).exists():
        raise CheckpointError(
            f"checkpoint not found: {ckpt}. Put the Stable Diffusion weights there (CompVis layout: "
            f"models/ldm/stable-diffusion-v1/model.ckpt), pass --ckpt PATH to a .ckpt or .safetensors "
            f"file, or run with --demo to try the pipeline on the built-in shapes model.")


def build_demo_model(device="cpu", config_path=TINY_CONFIG, seed: int = DEMO_SEED) -> torch.nn.Module:
    """A tiny model with weights drawn from `seed` (no checkpoint needed): the SD 1.x one by default, or the model
    of another (tiny) config, e.g. TINY_SDXL_CONFIG."""
    model = instantiate_from_config(read_config(config_path).model)
    return seeded_random_weights(model, seed).to(device).eval()


def build_random_model(config_path, device="cpu") -> torch.nn.Module:
    """A model of `config_path` with its random initial weights (for speed: it does not depend on them)."""
    torch.manual_seed(0)
    return instantiate_from_config(read_config(config_path).model).to(device).eval()


def load_model(config_path, ckpt, device="cpu", use_ema: bool = False, demo: bool = False,
               verbose: bool = True) -> torch.nn.Module:
    """The model a run asked for: `config_path` with seeded random weights (`demo`: the scripts' --demo with a
    --config, e.g. the tiny test models), or `config_path` + `ckpt` (both checked first)."""
    if demo:
        return build_demo_model(device, config_path)
    check_model_files(config_path, ckpt)
    model = load_model_from_config(read_config(config_path), ckpt, use_ema=use_ema, verbose=verbose)
    return model.to(device).eval()


@dataclass(frozen=True)
class ModelRef:
    """Which model a job uses: `config` with the weights of `ckpt` (its EMA weights with `use_ema`), or, with
    `demo`, `config` with seeded random weights. Small and picklable: every process builds its own copy."""

    config: str
    ckpt: str = ""
    use_ema: bool = False
    demo: bool = False

    def check(self) -> None:
        """Raise UsageError / CheckpointError when the config or checkpoint is missing (nothing is loaded)."""
        check_model_files(self.config, self.ckpt, demo=self.demo)

    def geometry(self) -> "ModelGeometry":
        return model_geometry(read_config(self.config))

    def load(self, device="cpu", verbose: bool = True) -> torch.nn.Module:
        """The model on `device`, in eval mode (`load_model`)."""
        return load_model(self.config, self.ckpt, device, use_ema=self.use_ema, demo=self.demo, verbose=verbose)

    @property
    def label(self) -> str:
        """What made the images: the demo label or the checkpoint path (PNG text)."""
        return DEMO_LABEL if self.demo else self.ckpt

    def settings(self) -> Union[str, Dict[str, object]]:
        """The model in a manifest's settings: the demo label, or the absolute checkpoint and config paths."""
        if self.demo:
            return DEMO_LABEL
        return {"ckpt": os.path.abspath(self.ckpt), "config": os.path.abspath(self.config), "ema": self.use_ema}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's UNet."""
    return next(model.model.parameters()).device


def latent_shape(geometry: ModelGeometry, height: int, width: int, flag: str = "--H and --W") -> Tuple[int, int, int]:
    """(C, H/f, W/f) for an image of height x width; every UNet level must halve the latent sides evenly
    (UsageError naming the sizes as `flag` does)."""
    halvings = geometry.levels - 1
    multiple = latent_multiple(geometry)
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        side = geometry.default_size
        raise UsageError(
            f"image size {height}x{width} is not supported: {flag} must be positive multiples of {multiple} "
            f"(latent sides multiples of {2 ** halvings}, as the UNet downsamples {halvings} times), e.g. "
            f"{side}x{side}.")
    return geometry.channels, height // geometry.factor, width // geometry.factor


def latent_multiple(geometry: ModelGeometry) -> int:
    """Image sides must be multiples of this (every UNet level halves the latent evenly)."""
    return geometry.factor * 2 ** (geometry.levels - 1)


def check_geometry(geometry: ModelGeometry, channels: Optional[int], factor: Optional[int]) -> None:
    """Raise UsageError when --C / --f disagree with the model config (they are fixed by the model; None: not
    given)."""
    if channels is not None and channels != geometry.channels:
        raise UsageError(f"--C {channels} does not fit the model: its latents have {geometry.channels} channels "
                         f"(leave --C at {geometry.channels})")
    if factor is not None and factor != geometry.factor:
        raise UsageError(f"--f {factor} does not fit the model: its autoencoder downsamples by {geometry.factor} "
                         f"(leave --f at {geometry.factor})")


# --- prompts and noise ------------------------------------------------------------------------------------

@dataclass
class Conditioning:
    """Conditioning of one batch: cond (B, 77, D) and, with guidance, the empty prompt's uncond; for SDXL
    both are dicts {"crossattn": (B, 77, D), "vector": (B, V)} (uncond: text zeroed, sizes kept)."""

    cond: Union[torch.Tensor, Dict[str, torch.Tensor]]
    uncond: Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]]

    @property
    def batch_size(self) -> int:
        return (self.cond["crossattn"] if isinstance(self.cond, dict) else self.cond).shape[0]


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning (ignored by SD 1.x/2.x): original size (h, w), crop top-left (top, left),
    target size (h, w); original and target default to the image size."""

    height: int
    width: int
    original_size: Optional[Tuple[int, int]] = None
    crop_coords_top_left: Tuple[int, int] = (0, 0)
    target_size: Optional[Tuple[int, int]] = None


def encode_prompts(model, prompts: Sequence[str], scale: float, precision: str = "full",
                   size: Optional[SizeConditioning] = None) -> Conditioning:
    """Encode `prompts`; the unconditional "" embedding too when `scale` != 1 (classifier-free guidance).
    An SDXL model needs `size` (its conditioning includes the image size)."""
    if is_sdxl(model):
        if size is None:
            raise UsageError("SDXL conditioning needs the image size (size=SizeConditioning(H, W))")
        with torch.no_grad(), precision_scope(precision, model_device(model)):
            cond, uncond = sdxl.get_conditioning(model, prompts, size.height, size.width,
                                                 original_size=size.original_size,
                                                 crop_coords_top_left=size.crop_coords_top_left,
                                                 target_size=size.target_size)
        return Conditioning(cond, uncond)
    with torch.no_grad(), precision_scope(precision, model_device(model)):
        cond = model.get_learned_conditioning(list(prompts))
        uncond = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
    return Conditioning(cond, uncond)


def start_noise(seeds: Sequence[int], shape: Tuple[int, ...]) -> torch.Tensor:
    """x_T for a batch: row j is randn(shape) from a CPU generator seeded with seeds[j]. (B, *shape)

    Drawn on the CPU, so a seed gives the same noise on every device and at every batch size.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# --- sampling ---------------------------------------------------------------------------------------------

def check_sampler(model_or_geometry, sampler: str) -> None:
    """Raise UsageError when `sampler` does not belong to the model kind (SDXL: euler; SD: ddim, plms)."""
    kind = model_or_geometry.kind if isinstance(model_or_geometry, ModelGeometry) else (
        "sgm" if is_sdxl(model_or_geometry) else "ldm")
    allowed = family_samplers(kind)
    if sampler not in allowed:
        model = "an SDXL model (EulerEDM)" if kind == "sgm" else "an SD 1.x/2.x model"
        raise UsageError(f"sampler {sampler!r} does not apply to {model}; use {' or '.join(allowed)}")


@dataclass
class SampleResult:
    """Final latents (B, C, h, w) on the model's device, the sampler loop's seconds, and the UNet calls by
    kind when a caching patch recorded them."""

    latents: torch.Tensor
    seconds: float
    calls: Optional[Dict[str, int]] = None


class NonFiniteLatents(RuntimeError):
    """Sampling ended in NaN or infinite latents (they would decode to a blank image)."""


def _result(latents: torch.Tensor, seconds: float, method: Optional[AppliedMethod],
            check_finite: bool) -> SampleResult:
    """The SampleResult of a sampler run; NonFiniteLatents when `check_finite` and a value is NaN or inf."""
    if check_finite:
        bad = int((~torch.isfinite(latents)).sum())
        if bad:
            raise NonFiniteLatents(
                f"sampling ended in {bad} NaN or infinite values of {latents.numel()} latents, which decode to a "
                f"blank image: the checkpoint's weights may hold NaN or inf, or float16 overflowed under "
                f"--precision autocast (try --precision full); the images of this batch were not written")
    return SampleResult(latents, seconds, method.call_counts() if method is not None else None)


def sample_latents(model, cond: Conditioning, x_T: torch.Tensor, *, sampler: str = "plms", steps: int = 50,
                   scale: float = 7.5, eta: float = 0.0, seed: int = 0, method: Optional[AppliedMethod] = None,
                   precision: str = "full", progress: bool = False, check_finite: bool = True) -> SampleResult:
    """Sample latents from x_T: (B, C, h, w) with `sampler` for `steps` steps: the CompVis 'plms' or 'ddim' for
    an SD 1.x/2.x model, 'euler' (EulerEDMSampler with VanillaCFG, generative-models) for SDXL.

    method: an applied acceleration (`Method.apply`), re-seeded with `seed` for this run; `seed` also seeds
    the DDIM eta noise. Seconds cover the sampler loop only (UNet calls and sampler arithmetic).
    check_finite: raise NonFiniteLatents when a final latent is NaN or inf (off only where a caller scores
    such a run itself, as the search does a candidate).
    """
    check_sampler(model, sampler)
    device = model_device(model)
    if method is not None:
        method.reseed(seed)
    info = sampler_info(sampler)
    if info.family == "sgm":
        if eta != 0:
            raise UsageError("EulerEDM sampling is deterministic here (s_churn 0): eta must be 0")
        with torch.no_grad(), precision_scope(precision, device):
            latents, seconds = timed(lambda: sdxl.sample_latents(model, cond.cond, cond.uncond, x_T.to(device),
                                                                 steps, scale), device)
        return _result(latents, seconds, method, check_finite)
    generator = torch.Generator().manual_seed(seed)
    run = info.sampler_class(model)
    with torch.no_grad(), precision_scope(precision, device):
        (latents, _), seconds = timed(lambda: run.sample(
            S=steps, conditioning=cond.cond, batch_size=x_T.shape[0], shape=list(x_T.shape[1:]), verbose=False,
            unconditional_guidance_scale=scale, unconditional_conditioning=cond.uncond, eta=eta,
            x_T=x_T.to(device), generator=generator, disable_progress=not progress), device)
    return _result(latents, seconds, method, check_finite)


def img2img_steps(strength: float, ddim_steps: int, strength_flag: str = "--strength",
                  steps_flag: str = "--ddim_steps") -> int:
    """t_enc: how many DDIM steps img2img runs (CompVis: int(strength * ddim_steps)); UsageError if none (naming
    the settings as `strength_flag` and `steps_flag` do)."""
    if not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
        raise UsageError(f"{strength_flag} must be in [0, 1], got {strength}")
    t_enc = int(strength * ddim_steps)
    if t_enc < 1:
        raise UsageError(f"{strength_flag} {strength} with {steps_flag} {ddim_steps} runs no step; raise either")
    return t_enc


def img2img_latents(model, init_latent: torch.Tensor, cond: Conditioning, noise: torch.Tensor, *, steps: int,
                    encode_steps: int, scale: float = 7.5, eta: float = 0.0, seed: int = 0,
                    method: Optional[AppliedMethod] = None, precision: str = "full",
                    progress: bool = False) -> SampleResult:
    """CompVis img2img with DDIM: noise the scaled init latents (B, C, h, w) to step index `encode_steps` of
    a `steps`-step schedule and denoise over those `encode_steps` steps. `encode_steps` = all the steps
    (strength 1.0) starts from pure `noise`, as full destruction of the image means. NonFiniteLatents when a
    final latent is NaN or inf."""
    device = model_device(model)
    if method is not None:
        method.reseed(seed)
    generator = torch.Generator().manual_seed(seed)
    run = DDIMSampler(model)
    run.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
    total = len(run.ddim_timesteps)
    if not 1 <= encode_steps <= total:
        raise UsageError(f"img2img runs 1..{total} of the {total} steps, got {encode_steps}")
    with torch.no_grad(), precision_scope(precision, device):
        noise = noise.to(device)
        if encode_steps == total:
            z_enc = noise
        else:
            z_enc = run.stochastic_encode(init_latent.to(device), torch.tensor([encode_steps] * noise.shape[0]),
                                          noise=noise)
        latents, seconds = timed(lambda: run.decode(
            z_enc, cond.cond, encode_steps, unconditional_guidance_scale=scale,
            unconditional_conditioning=cond.uncond, generator=generator, disable_progress=not progress), device)
    return _result(latents, seconds, method, check_finite=True)


# --- images -----------------------------------------------------------------------------------------------

def decode(model, latents: torch.Tensor, precision: str = "full") -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W), float32 on the CPU, about [-1, 1]. SDXL decodes in float32
    (its original VAE overflows in float16)."""
    if is_sdxl(model):
        with torch.no_grad():
            return sdxl.decode_latents(model, latents.to(model_device(model))).cpu()
    with torch.no_grad(), precision_scope(precision, model_device(model)):
        return model.decode_first_stage(latents.to(model_device(model))).float().cpu()


def encode_image(model, image: torch.Tensor, seed: int, precision: str = "full") -> torch.Tensor:
    """Image (1, 3, H, W) in [-1, 1] -> scaled latent (1, C, H/f, W/f), the posterior sampled with `seed`."""
    device = model_device(model)
    with torch.no_grad(), precision_scope(precision, device):
        posterior = model.encode_first_stage(image.to(device))
        return model.get_first_stage_encoding(posterior, generator=torch.Generator(device=device).manual_seed(seed))


def batches(items: Sequence, size: int) -> List[Sequence]:
    """`items` cut into consecutive batches of at most `size`."""
    return [items[i:i + size] for i in range(0, len(items), size)]
