"""The trained shapes model as a CompVis-layout checkpoint (.safetensors) with a JSON record of how it was made."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, Mapping

import torch

from sdgen.image_jobs import file_sha256

TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = TEXT_PREFIX + "text_model."


def compvis_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's weights in the CompVis key layout: text-encoder keys under `...transformer.text_model.` (as
    SD 1.x checkpoints hold them, whatever the installed transformers names them); parameters in float16 (half the
    file, far below the model's error), buffers (noise schedule, scale factor, position ids) in their own dtype."""
    parameters = {name for name, _ in model.named_parameters()}
    out = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().contiguous()
        if key in parameters and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_MODEL_PREFIX):
            key = TEXT_MODEL_PREFIX + key[len(TEXT_PREFIX):]
        out[key] = tensor
    return out


def git_commit(repo: Path) -> str:
    """The commit of the checkout holding the folder `repo` (with '+changes' when its work tree differs), or
    'unknown' outside git (an installed, non-editable package)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def write_checkpoint(model: torch.nn.Module, path: Path, record: Mapping[str, object]) -> Dict[str, object]:
    """Write `path` (.safetensors) and `path` with .json (the record plus the file's size and sha256), each
    atomically; returns the record written."""
    from safetensors.torch import save_file

    path = Path(path).resolve()  # through a link such as sd1/sdgen/models whose folder does not exist yet
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(compvis_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    full = dict(record, file=path.name, bytes=path.stat().st_size, sha256=file_sha256(path))
    record_path = path.with_suffix(".json")
    tmp = record_path.with_name(record_path.name + ".tmp")
    tmp.write_text(json.dumps(full, indent=1) + "\n")
    os.replace(tmp, record_path)
    return full
