"""datosd: DaTo (dynamics-aware token pruning + timestep-aware feature caching) for CompVis Stable Diffusion,
SDXL and diffusers pipelines; plus prompt-token pruning and T-GATE. The method only: the benchmarks that time
it live in sdgen."""
from .dato import TokenSelection, diff_score, pool_score, select_tokens
from .patch import apply_patch, remove_patch
from .state import RELEASED_CODE_PARITY, DatoConfig, DatoOptions, DatoState
from .strategy import Strategy, StrategyError, StrategySummary, load_strategy, shipped_strategies
from .text_pruning import TextPruneOptions, TextPruneState, apply_text_pruning, remove_text_pruning
from .tgate import SelfAttentionSchedule, TGateOptions, TGateState, apply_tgate, attention_plan, remove_tgate

__all__ = [
    "apply_patch",
    "remove_patch",
    "DatoConfig",
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
    "load_strategy",
    "shipped_strategies",
    "apply_text_pruning",
    "remove_text_pruning",
    "TextPruneOptions",
    "TextPruneState",
    "apply_tgate",
    "remove_tgate",
    "TGateOptions",
    "TGateState",
    "SelfAttentionSchedule",
    "attention_plan",
]
