"""Shared fixtures: the golden tiny model's config, weights and CompVis reference tensors."""
from pathlib import Path

import pytest
import torch

from golden_weights import ensure_golden_weights

DATA_DIR = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_CONFIG = DATA_DIR / "golden-tiny.yaml"
GOLDEN_IO = DATA_DIR / "golden-tiny-io.safetensors"
# Regenerated from its seed on first use and checked against the reference file's digest (golden_weights.py).
GOLDEN_WEIGHTS = ensure_golden_weights(GOLDEN_CONFIG, DATA_DIR / "generated" / "golden-tiny-model.safetensors")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def golden_io():
    """Reference inputs/outputs computed with the original CompVis code (see tests/data/README.md)."""
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_IO))


@pytest.fixture(scope="session")
def golden_state_dict():
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_WEIGHTS))


@pytest.fixture(scope="session")
def golden_config():
    from omegaconf import OmegaConf

    return OmegaConf.load(str(GOLDEN_CONFIG))
