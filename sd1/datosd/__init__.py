"""datosd: DaTo (dynamics-aware token pruning + timestep-aware feature caching) for CompVis Stable Diffusion."""
from .dato import TokenSelection, diff_score, pool_score, select_tokens
from .strategy import Strategy, StrategyError, StrategySummary

__all__ = [
    "select_tokens",
    "TokenSelection",
    "diff_score",
    "pool_score",
    "Strategy",
    "StrategyError",
    "StrategySummary",
]
