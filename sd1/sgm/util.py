"""Small helpers with generative-models' names (`sgm.util`)."""
import torch

from ldm.util import get_obj_from_str, instantiate_from_config

__all__ = ["append_dims", "append_zero", "default", "get_obj_from_str", "instantiate_from_config"]


def default(value, fallback):
    """`value` unless it is None."""
    return fallback if value is None else value


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """x: (B,) (or any shape) -> x with trailing singleton dims up to `target_dims` dims, e.g. (B, 1, 1, 1)."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"x has {x.ndim} dims, more than the target {target_dims}")
    return x[(...,) + (None,) * missing]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """x: (N,) -> (N + 1,) with a trailing 0."""
    return torch.cat([x, x.new_zeros([1])])
