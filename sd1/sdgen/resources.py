"""Files that ship with the package: model configs, the shapes model's weights and prompt lists (the DaTo strategies ship with datosd:
`datosd.strategy.STRATEGY_DIR`).

They live in the checkout's `configs/`, `models/shapes/` and `data/` (linked into the package as `sdgen/configs`,
`sdgen/models` and `sdgen/data`), so they are found the same way from a checkout, an editable install or a wheel.
"""
from importlib.resources import files
from pathlib import Path

from .runtime import UsageError


def packaged(*parts: str) -> Path:
    """Path of a packaged file, e.g. packaged("configs", "stable-diffusion", "v1-inference.yaml")."""
    path = files("sdgen")
    for part in parts:
        path = path / part
    return Path(str(path))


# The demo model (`--demo`): the shapes model, a small SD 1.x-structured model trained on this repository's shapes
# world (sd1/shapesworld), its weights in models/shapes (linked into the package as `sdgen/models`).
SHAPES_CONFIG = packaged("configs", "stable-diffusion", "shapes-demo.yaml")
SHAPES_WEIGHTS = packaged("models", "shapes-demo.safetensors")
# Tiny models of the SD 1.x and SDXL classes for tests and smoke runs, with seeded random weights.
TINY_CONFIG = packaged("configs", "stable-diffusion", "tiny-demo.yaml")
TINY_SDXL_CONFIG = packaged("configs", "stable-diffusion", "tiny-demo-sdxl.yaml")
IMAGENET_PROMPTS = packaged("data", "imagenet-class-prompts.txt")


def find_config(path: str) -> Path:
    """A model config given on the command line: the file itself, or, for a path relative to the checkout
    such as 'configs/stable-diffusion/v1-inference.yaml' run from elsewhere, the packaged copy."""
    given = Path(path)
    if given.is_file():
        return given
    parts = given.parts
    if not given.is_absolute() and parts and parts[0] == "configs" and packaged(*parts).is_file():
        return packaged(*parts)
    raise UsageError(f"config file not found: {path}")
