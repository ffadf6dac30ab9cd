"""CLIP score: 100 * max(cos(E_image(x), E_text(prompt)), 0), averaged over images.

This is the usual definition (torchmetrics' CLIPScore; Hessel et al. 2021 use weight 2.5
instead of 100). The model is an open_clip architecture built with `pretrained=None`
and filled from a local checkpoint: nothing is downloaded.

Default architecture: ViT-g-14 with the LAION-2B `laion2b_s12b_b42k` weights, the CLIP
model commonly used for Stable Diffusion compression/acceleration results (e.g. BK-SDM).
The DaTo paper does not say which CLIP model it used, so scores are comparable to the
paper's only if that choice matches; the architecture is recorded with every result.
"""
import logging
import zipfile
from pathlib import Path

DEFAULT_ARCH = "ViT-g-14"
DEFAULT_WEIGHTS_HINT = ("open_clip_pytorch_model.bin of laion/CLIP-ViT-g-14-laion2B-s12B-b42K "
                        "on the Hugging Face Hub (open_clip pretrained tag 'laion2b_s12b_b42k')")


def missing_weights_message(path, arch: str) -> str:
    hint = DEFAULT_WEIGHTS_HINT if arch == DEFAULT_ARCH else f"an open_clip checkpoint for {arch}"
    return (f"CLIP weights not found: {path}\n"
            f"  Expected {hint}. Nothing is downloaded at run time: fetch it once on a machine\n"
            f"  with network access and pass its path with --clip-weights.")


def check_weights_file(path) -> None:
    """Raise ValueError unless `path` reads as a checkpoint the way open_clip loads one: a .safetensors file,
    or a torch.save file (weights_only; a zip archive is memory-mapped, not read) holding a dict. Cheap: the
    model is not built, so a checkpoint of another architecture shows only when it is loaded."""
    import torch

    path = Path(path)
    not_it = f"CLIP weights {path} are not a checkpoint open_clip can load"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                state = {key: None for key in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch.load / safetensors raise many types for a file that is not a checkpoint
        raise ValueError(f"{not_it} ({type(err).__name__})") from None  # torch's text suggests the unsafe load
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{not_it}: it holds a {type(state).__name__}, not a state dict")


def resolve_arch(arch: str) -> str:
    """An open_clip model name, or the path of a model-config .json (registered under its file stem).

    Raises:
        ValueError: a hub/remote name, or an unknown architecture.
    """
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"--clip-arch {arch!r}: give a built-in open_clip name (e.g. {DEFAULT_ARCH}) "
                         "or a model-config .json path; hub/dir schemas are not supported here")
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise ValueError(f"open_clip model config not found: {path}")
        open_clip.add_model_config(path)
        arch = path.stem
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models() "
                         f"(e.g. {DEFAULT_ARCH}, ViT-L-14, ViT-H-14)")
    return arch


def load_open_clip(arch: str, weights, device="cpu"):
    """Build `arch` with pretrained=None and load `weights` (strict).

    Returns: (model in eval mode, image preprocess transform, tokenizer).
    """
    import open_clip

    arch = resolve_arch(arch)
    if not Path(weights).is_file():
        raise FileNotFoundError(missing_weights_message(weights, arch))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # hide open_clip's "initialized randomly" warning: weights come next
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    finally:
        root.setLevel(level)
    open_clip.load_checkpoint(model, str(weights), strict=True)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(arch)
