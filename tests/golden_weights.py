"""The golden tiny model's weights, regenerated on first use instead of shipped (they would be 16 MB of git).

The reference weights (`model.safetensors` of the golden set, see tests/data/README.md) were drawn by a
documented rule: the CompVis construction, then every parameter redrawn from generator seed 1234 in
`named_parameters()` order, which is `ldm.util.seeded_random_weights`. `ensure_golden_weights` rebuilds them
and writes them in the reference file's layout (transformers-4 text-encoder names, with `position_ids`).
`REFERENCE_DIGEST` is `content_digest` of the reference file itself, so a regenerated file that differs from
it in any key, dtype, shape or bit is refused.
"""
import hashlib
import os
from pathlib import Path

import torch

REFERENCE_DIGEST = "955233722430cceb527b43cafde29f4d37910383411de9cd14714509b6cd3a1d"
REDRAW_SEED = 1234
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = TEXT_PREFIX + "text_model."


def content_digest(path: Path) -> str:
    """SHA-256 over (key, dtype, shape, bytes) of every tensor of a .safetensors file, keys sorted."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key).contiguous()
            digest.update(key.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _reference_layout(state_dict):
    """Our state dict -> the reference file's keys: `text_model.` text-encoder names, plus `position_ids`."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_MODEL_PREFIX):
            key = TEXT_MODEL_PREFIX + key[len(TEXT_PREFIX):]
        out[key] = value.contiguous()
    out.setdefault(TEXT_MODEL_PREFIX + "embeddings.position_ids", torch.arange(77).unsqueeze(0))
    return out


def ensure_golden_weights(config_path: Path, path: Path) -> Path:
    """Write the golden weights to `path` unless a file with the reference digest is there; returns `path`."""
    if path.is_file() and content_digest(path) == REFERENCE_DIGEST:
        return path
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.util import instantiate_from_config, seeded_random_weights

    model = instantiate_from_config(OmegaConf.load(str(config_path)).model)
    seeded_random_weights(model, seed=REDRAW_SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel test workers write their own
    save_file(_reference_layout(model.state_dict()), str(tmp), metadata={"format": "pt"})
    got = content_digest(tmp)
    if got != REFERENCE_DIGEST:
        tmp.unlink()
        raise RuntimeError(f"regenerated golden weights differ from the reference (digest {got}); "
                           "ldm.util.seeded_random_weights or the model's parameters changed")
    tmp.replace(path)
    return path
