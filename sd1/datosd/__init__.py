"""datosd: DaTo (dynamics-aware token pruning + timestep-aware feature caching) for CompVis Stable Diffusion."""
from .dato import TokenSelection, diff_score, pool_score, select_tokens
from .patch import RELEASED_CODE_PARITY, DatoOptions, DatoState, apply_patch, remove_patch
from .strategy import Strategy, StrategyError, StrategySummary

__all__ = [
    "apply_patch",
    "remove_patch",
    "DatoOptions",
    "DatoState",
    "RELEASED_CODE_PARITY",
    "select_tokens",
    "TokenSelection",
    "diff_score",
    "pool_score",
    "Strategy",
    "StrategyError",
    "StrategySummary",
]
