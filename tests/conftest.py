"""Shared fixtures: the golden tiny model's config, weights and CompVis reference tensors."""
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads slow every small
# kernel down many times. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdgen.runtime import set_threads  # noqa: E402

from golden_weights import ensure_golden_weights  # noqa: E402

DATA_DIR = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_CONFIG = DATA_DIR / "golden-tiny.yaml"
GOLDEN_IO = DATA_DIR / "golden-tiny-io.safetensors"
# Regenerated from its seed on first use and checked against the reference file's digest (golden_weights.py).
GOLDEN_WEIGHTS = ensure_golden_weights(GOLDEN_CONFIG, DATA_DIR / "generated" / "golden-tiny-model.safetensors")

# The golden tiny SDXL model (generative-models code paths); its weights are regenerated when first needed.
SDXL_CONFIG = DATA_DIR / "golden-sdxl-tiny.yaml"
SDXL_IO = DATA_DIR / "golden-sdxl-tiny-io.safetensors"
SDXL_WEIGHTS = DATA_DIR / "generated" / "golden-sdxl-tiny-model.safetensors"

# Two cores: two threads, or one in each of pytest-xdist's two workers (pytest.ini runs -n 2).
set_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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


@pytest.fixture(scope="session")
def sdxl_weights():
    """Path of the golden tiny SDXL weights, rebuilt from their seed rule (golden_sdxl_weights.py)."""
    from golden_sdxl_weights import ensure_golden_sdxl_weights

    return ensure_golden_sdxl_weights(SDXL_CONFIG, GOLDEN_CONFIG, GOLDEN_WEIGHTS, SDXL_WEIGHTS)


@pytest.fixture(scope="session")
def sdxl_io():
    """Reference inputs/outputs of the golden tiny SDXL, computed with generative-models (tests/data/README.md)."""
    from safetensors.torch import load_file

    return load_file(str(SDXL_IO))
