"""datosd: DaTo (dynamics-aware token pruning + timestep-aware feature caching) for CompVis Stable Diffusion."""
from .dato import TokenSelection, diff_score, pool_score, select_tokens
from .patch import RELEASED_CODE_PARITY, DatoOptions, DatoState, apply_patch, remove_patch
from .strategy import Strategy, StrategyError, StrategySummary
from .text_pruning import TextPruneOptions, TextPruneState, apply_text_pruning, remove_text_pruning
from .tgate import TGateOptions, TGateState, apply_tgate, remove_tgate

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
    "apply_text_pruning",
    "remove_text_pruning",
    "TextPruneOptions",
    "TextPruneState",
    "apply_tgate",
    "remove_tgate",
    "TGateOptions",
    "TGateState",
]
