"""ImageReward (Xu et al. 2023) as an optional extra; needs `pip install image-reward`.

Fully offline: the model is built from local files only (the package's own `load()` fetches
its med_config.json from the Hugging Face Hub, so it is not used), and Hugging Face offline
mode is switched on for this process, so BLIP's `bert-base-uncased` tokenizer must already be
in the local Hugging Face cache.
Files: ImageReward.pt and med_config.json from the THUDM/ImageReward repository on the Hub.
"""
import importlib.util
import os
from pathlib import Path

import torch

INSTALL_HINT = ("ImageReward needs the optional package `image-reward`: pip install image-reward "
                "(or pip install -e '.[imagereward]')")


def is_available() -> bool:
    """Whether the `ImageReward` package is installed (without importing it)."""
    return importlib.util.find_spec("ImageReward") is not None


def missing_file_message(path, what: str) -> str:
    return (f"ImageReward {what} not found: {path}\n"
            f"  Expected the THUDM/ImageReward file ({'ImageReward.pt' if what == 'weights' else 'med_config.json'})"
            " from the Hugging Face Hub; fetch it once on a machine with network access.")


def load_imagereward(weights, med_config, device="cpu"):
    """Build ImageReward from local `weights` (ImageReward.pt) and `med_config` (med_config.json)."""
    for path, what in ((weights, "weights"), (med_config, "med_config")):
        if not Path(path).is_file():
            raise FileNotFoundError(missing_file_message(path, what))
    os.environ["HF_HUB_OFFLINE"] = "1"  # no network, ever: BLIP's tokenizer must come from the cache
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from ImageReward.ImageReward import ImageReward
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    try:
        model = ImageReward(med_config=str(med_config), device=device)
    except OSError as e:
        raise OSError("ImageReward's BLIP text encoder needs the 'bert-base-uncased' tokenizer in the "
                      f"local Hugging Face cache (HF_HOME); it is not downloaded here. ({e})") from e
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise RuntimeError(f"{weights}: not an ImageReward checkpoint, missing {len(missing)} keys "
                           f"(first: {missing[:3]})")
    return model.to(device).eval()
