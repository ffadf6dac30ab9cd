"""The golden tiny SDXL model's weights, regenerated on first use instead of shipped (27 MB).

The reference `model.safetensors` of `golden-sdxl-tiny` (tests/data/README.md) was drawn by a documented rule:
the generative-models construction of `golden-sdxl-tiny.yaml`, then every parameter of the UNet and then of
the conditioner redrawn, in `named_parameters()` order, from one generator seeded 1234 (`redraw_by_name`);
the first stage is the golden-tiny VAE unchanged. `ensure_golden_sdxl_weights` rebuilds that file and
refuses it unless its SHA-256 (of the file bytes) is the reference file's.
"""
import hashlib
import math
import os
from pathlib import Path

import torch

from golden_weights import ensure_golden_weights

REFERENCE_SHA256 = "fd9d66b3779311205ab6607a24dc6f91bc41d698ddb692ccaa7d2d658b0feccd"
REDRAW_SEED = 1234
CLIP_PREFIX = "conditioner.embedders.0.transformer."
TEXT_MODEL_LEVEL = "text_model."


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def redraw_by_name(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter in named_parameters() order (the golden-sdxl-tiny rule): 1-D norm weights
    (`norm` / `ln_` in the name) 1 + 0.1 N(0, 1); other 0-D/1-D parameters 0.05 N(0, 1); names containing
    `embedding` 0.02 N(0, 1); every other weight N(0, min(0.1, 1 / sqrt(fan_in))), fan_in = numel / shape[0]."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim <= 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif param.ndim <= 1:
                value = 0.05 * noise
            elif "embedding" in name:
                value = 0.02 * noise
            else:
                value = min(0.1, 1.0 / math.sqrt(param.numel() // param.shape[0])) * noise
            param.copy_(value)


def _checkpoint_layout(state_dict):
    """Our keys -> the reference file's: the CLIP text model under `text_model.` (transformers-4 naming)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(CLIP_PREFIX) and not key.startswith(CLIP_PREFIX + TEXT_MODEL_LEVEL):
            key = CLIP_PREFIX + TEXT_MODEL_LEVEL + key[len(CLIP_PREFIX):]
        out[key] = value.contiguous()
    return out


def ensure_golden_sdxl_weights(config_path: Path, tiny_config_path: Path, tiny_weights_path: Path,
                               path: Path) -> Path:
    """Write the golden SDXL weights to `path` unless a file with the reference SHA-256 is there."""
    if path.is_file() and file_sha256(path) == REFERENCE_SHA256:
        return path
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(str(config_path)).model)
    generator = torch.Generator().manual_seed(REDRAW_SEED)
    redraw_by_name(model.model, generator)
    redraw_by_name(model.conditioner, generator)
    vae = {k: v for k, v in load_file(str(ensure_golden_weights(tiny_config_path, tiny_weights_path))).items()
           if k.startswith("first_stage_model.")}
    state_dict = _checkpoint_layout(model.state_dict())
    if set(vae) != {k for k in state_dict if k.startswith("first_stage_model.")}:
        raise RuntimeError("the golden-tiny VAE does not have the keys of the SDXL tiny config's first stage")
    state_dict.update(vae)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel test workers write their own
    save_file(state_dict, str(tmp))
    got = file_sha256(tmp)
    if got != REFERENCE_SHA256:
        tmp.unlink()
        raise RuntimeError(f"regenerated golden SDXL weights differ from the reference (sha256 {got}); the sgm "
                           f"model's parameters (names, order, shapes) or the redraw rule changed")
    tmp.replace(path)
    return path
