"""Files that ship with the package: model configs, DaTo strategies and prompt lists.

They live in the checkout's `configs/` and `data/` (linked into the package as `sdgen/configs` and
`sdgen/data`), so they are found the same way from a checkout, an editable install or a wheel.
"""
from importlib.resources import files
from pathlib import Path

from .runtime import UsageError


def packaged(*parts: str) -> Path:
    """Path of a packaged file, e.g. packaged("configs", "dato", "b1.yaml")."""
    path = files("sdgen")
    for part in parts:
        path = path / part
    return Path(str(path))


DEMO_CONFIG = packaged("configs", "stable-diffusion", "tiny-demo.yaml")
DEMO_SDXL_CONFIG = packaged("configs", "stable-diffusion", "tiny-demo-sdxl.yaml")
STRATEGY_DIR = packaged("configs", "dato")
DEFAULT_STRATEGY = STRATEGY_DIR / "b1.yaml"
IMAGENET_PROMPTS = packaged("data", "imagenet-class-prompts.txt")
COCO_PROMPTS = packaged("data", "coco30k-prompts.txt")


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


def builtin_strategies() -> list:
    """Names of the strategies shipped in configs/dato (e.g. 'b1')."""
    return sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))


def find_strategy(name_or_path: str) -> Path:
    """A DaTo strategy: a YAML file path, or the name of a shipped one ('b1', 'b1-table-order')."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    if given.suffix == "" and (STRATEGY_DIR / f"{name_or_path}.yaml").is_file():
        return STRATEGY_DIR / f"{name_or_path}.yaml"
    raise UsageError(f"strategy file not found: {name_or_path} (give a YAML file or one of the shipped "
                     f"strategies: {', '.join(builtin_strategies())})")
