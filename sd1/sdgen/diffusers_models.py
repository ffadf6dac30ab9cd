"""diffusers pipelines built offline: from an ldm checkpoint (diffusers' own conversion functions) or from the
SD 1.5 configuration with random weights, with a CLIP tokenizer made from the BPE vocabulary open_clip ships.

Needs the `diffusers` extra (`pip install -e ".[diffusers]"`).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from ldm.modules.diffusionmodules.coordconv import CoordConv2d, CoordUNetModel
from ldm.modules.encoders.modules import CLIP_VIT_L_TEXT_CONFIG
from ldm.util import seeded_random_weights



def require_diffusers():
    """The diffusers module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError('the diffusers pipelines need diffusers: pip install -e ".[diffusers]"') from e
    return diffusers


def _single_file_utils():
    """diffusers' single-file conversion module (`diffusers.loaders.single_file_utils`)."""
    require_diffusers()
    from diffusers.loaders import single_file_utils

    return single_file_utils


def clip_tokenizer(max_length: int = 77):
    """transformers' CLIPTokenizer over open_clip's copy of the CLIP BPE vocabulary (the SD 1.x tokenizer, offline)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
        (Path(directory) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)


def compvis_ddim_scheduler(ldm_params: Mapping[str, Any]):
    """diffusers' DDIMScheduler set up as CompVis's DDIMSampler: the model's scaled-linear betas, "leading" spacing
    with steps_offset 1 (timesteps 1, 1 + T/S, ...), and alpha_cumprod[0] after the last step."""
    diffusers = require_diffusers()
    return diffusers.DDIMScheduler(
        num_train_timesteps=int(ldm_params.get("timesteps", 1000)),
        beta_start=float(ldm_params["linear_start"]), beta_end=float(ldm_params["linear_end"]),
        beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
        clip_sample=False, prediction_type="epsilon")


def _plain(config: Any) -> Dict[str, Any]:
    """An OmegaConf (or mapping) config as plain dicts and lists."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    return dict(config)


def diffusers_configs(ldm_config: Any, image_size: int) -> Dict[str, Dict[str, Any]]:
    """The UNet and VAE configs diffusers derives from an ldm model config (its `create_*_diffusers_config_from_ldm`).

    ldm_config: the whole config (with `model.params`); image_size: the pixel size the sample size is set from.
    """
    single_file = _single_file_utils()
    config = _plain(ldm_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers marks the explicit image_size as deprecated
        if hasattr(single_file, "create_unet_diffusers_config_from_ldm"):
            unet = single_file.create_unet_diffusers_config_from_ldm(config, {}, image_size=image_size)
            vae = single_file.create_vae_diffusers_config_from_ldm(config, {}, image_size=image_size)
        else:  # diffusers 0.27: the same functions under the names they had before 0.28
            unet = single_file.create_unet_diffusers_config(config, image_size)
            vae = single_file.create_vae_diffusers_config(config, image_size)
    return {"unet": unet, "vae": vae}


def _clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The CLIP text encoder's weights of an ldm checkpoint, under transformers' names, as diffusers converts them."""
    single_file = _single_file_utils()
    if hasattr(single_file, "convert_ldm_clip_checkpoint"):
        return single_file.convert_ldm_clip_checkpoint(dict(state_dict))
    # diffusers 0.27 strips these prefixes only inside create_text_encoder_from_ldm_clip_checkpoint, which fetches
    # the text config from the hub; 0.28 moved the same loop into convert_ldm_clip_checkpoint
    return {key[len(prefix):]: value for key, value in state_dict.items()
            for prefix in single_file.LDM_CLIP_PREFIX_TO_REMOVE if key.startswith(prefix)}


def _text_encoder(ldm_config: Mapping[str, Any]):
    """The CLIPTextModel of an ldm config's FrozenCLIPEmbedder (ViT-L/14 values, `text_config` overrides), eager."""
    from transformers import CLIPTextConfig, CLIPTextModel

    params = ldm_config["model"]["params"]["cond_stage_config"].get("params") or {}
    values = dict(CLIP_VIT_L_TEXT_CONFIG)
    values.update(params.get("text_config") or {})
    config = CLIPTextConfig(**values, attn_implementation="eager")
    config._attn_implementation = "eager"  # as FrozenCLIPEmbedder: older transformers ignore the argument
    return CLIPTextModel(config)


def _with_coordinate_input(unet: torch.nn.Module, ldm_config: Mapping[str, Any]) -> torch.nn.Module:
    """The diffusers UNet of a config whose UNet is ldm's CoordUNetModel (the shapes model) gets the same first
    convolution (`conv_in`, which diffusers' converter fills from `input_blocks.0.0`); any other is returned as is."""
    target = ldm_config["model"]["params"]["unet_config"]["target"]
    if target.rsplit(".", 1)[-1] == CoordUNetModel.__name__:
        unet.conv_in = CoordConv2d(unet.conv_in)
    return unet


def pipeline_from_ldm(ldm_config: Any, state_dict: Mapping[str, torch.Tensor], image_size: int):
    """A StableDiffusionPipeline holding an ldm SD 1.x checkpoint, converted by diffusers' own functions
    (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), with the
    CompVis DDIM scheduler. state_dict: the LatentDiffusion's keys (`model.diffusion_model.*`, ...)."""
    diffusers = require_diffusers()
    single_file = _single_file_utils()
    config = _plain(ldm_config)
    configs = diffusers_configs(config, image_size)
    unet = _with_coordinate_input(diffusers.UNet2DConditionModel(**configs["unet"]), config)
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(dict(state_dict), configs["unet"]), strict=True)
    vae = diffusers.AutoencoderKL(**configs["vae"])
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(dict(state_dict), configs["vae"]), strict=True)
    text_encoder = _text_encoder(config)
    text_state = {k: v for k, v in _clip_state_dict(state_dict).items() if "position_ids" not in k}
    if not hasattr(text_encoder, "text_model"):  # transformers 5 dropped the text_model level
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    text_encoder.load_state_dict(text_state, strict=True)
    scheduler = compvis_ddim_scheduler(config["model"]["params"])
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_pipeline(config_path, seed: int = 0, image_size: int = 512):
    """A StableDiffusionPipeline with the architecture of a CompVis SD 1.x config (e.g. v1-inference.yaml,
    converted by diffusers) and random weights drawn by `ldm.util.seeded_random_weights` (no download)."""
    diffusers = require_diffusers()
    from omegaconf import OmegaConf

    config = _plain(OmegaConf.load(str(config_path)))
    configs = diffusers_configs(config, image_size)
    unet = _with_coordinate_input(seeded_random_weights(diffusers.UNet2DConditionModel(**configs["unet"]), seed=seed),
                                  config)
    vae = seeded_random_weights(diffusers.AutoencoderKL(**configs["vae"]), seed=seed + 1)
    text_encoder = seeded_random_weights(_text_encoder(config), seed=seed + 2)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                             unet=unet, scheduler=compvis_ddim_scheduler(config["model"]["params"]),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
