"""Process-level settings of a generation run: device, precision, CPU threads, seeds, timing."""
import os
import random
import time
from contextlib import nullcontext
from typing import Callable, Optional, Tuple, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class UsageError(ValueError):
    """Bad input (a flag, a file, a size), reported in one line before any work starts."""


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto.")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def autocast_dtype(device) -> torch.dtype:
    """The autocast dtype of --precision autocast: float16 on CUDA, bfloat16 on CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def precision_name(precision: str, device) -> str:
    """'float32', 'float16' or 'bfloat16': what the model calls compute in under `precision`."""
    return "float32" if precision == "full" else str(autocast_dtype(device)).replace("torch.", "")


def precision_scope(precision: str, device):
    """Context for the model calls: torch.autocast for 'autocast', nothing for 'full' (float32)."""
    if precision == "autocast":
        device = torch.device(device)
        return torch.autocast(device.type, dtype=autocast_dtype(device))
    if precision != "full":
        raise UsageError(f"--precision must be 'full' or 'autocast', got {precision!r}")
    return nullcontext()


def set_threads(threads: Optional[int]) -> int:
    """Set the torch CPU thread count of this process (the one place that does); None keeps the default.
    Returns the count in effect."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"the thread count must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) global generators, as CompVis does. The library's own
    random draws use explicit generators; this only covers third-party code that uses the global RNG."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed % (2 ** 32)))  # Python refuses to start beyond 32 bits


def synchronize(device) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so that a clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def timed(fn: Callable[[], T], device) -> Tuple[T, float]:
    """Run fn() and return (result, seconds), synchronising CUDA around it."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started
