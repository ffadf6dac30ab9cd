"""Digests of what a stored evaluation depends on: JSON data, files and the model."""
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

from sdgen.image_jobs import file_sha256
from sdgen.resources import find_config


def sha256_json(data: Any) -> str:
    """Hex SHA-256 of the canonical JSON text of `data` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_identity(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """Resolved path and size of a weights file: enough to tell two files apart without hashing gigabytes."""
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size}


def model_identity(model) -> Dict[str, Any]:
    """What a model's outputs depend on (model: an sdgen ModelRef): 'demo' (its config hash) or config hash +
    checkpoint path/size."""
    config = file_sha256(find_config(model.config))
    if model.demo:
        return {"model": "demo", "config_sha256": config}
    return {"model": "checkpoint", "config_sha256": config, "ckpt": file_identity(model.ckpt), "ema": model.use_ema}
