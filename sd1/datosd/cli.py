"""Command-line acceleration flags shared by txt2img, img2img and the evaluation scripts.

--dato [--strategy FILE]                     DaTo with a per-step strategy (default configs/dato/b1.yaml)
--deepcache --cache_interval N --cache_depth d   uniform DeepCache (every N-th step full, the others at depth d)
--tome --tome_ratio r                        ToMeSD through the real `tomesd` package
--deepcache --tome                           the paper's naive combination
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .patch import RELEASED_CODE_PARITY, apply_patch, remove_patch
from .strategy import MAX_DEPTH, Strategy, StrategyError

DEFAULT_STRATEGY = Path(__file__).resolve().parents[2] / "configs" / "dato" / "b1.yaml"


def add_acceleration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("acceleration (DaTo and the paper's baselines)")
    group.add_argument("--dato", action="store_true", help="DaTo: per-step token pruning + feature caching")
    group.add_argument("--strategy", type=str, default=None,
                       help=f"DaTo strategy YAML (default {DEFAULT_STRATEGY.name} when the step count fits)")
    group.add_argument("--dato_parity", action="store_true",
                       help="reproduce the released code's choices (eps DiffScore, uncond CFG reference, "
                            "recover from kept tokens) instead of the paper's")
    group.add_argument("--diff_source", choices=["features", "eps"], default=None,
                       help="DiffScore source (default features, the paper's)")
    group.add_argument("--cfg_reference", choices=["cond", "uncond"], default=None,
                       help="CFG half that chooses the base tokens (default cond)")
    group.add_argument("--recover_from", choices=["base", "kept"], default=None,
                       help="pruned tokens copy their most similar base token (default) or kept token")
    group.add_argument("--no_align_cfg", action="store_true", help="choose base tokens per CFG half")
    group.add_argument("--max_downsample", type=int, default=1, choices=[1, 2, 4, 8],
                       help="prune transformer blocks down to this downsampling (1: highest resolution only)")
    group.add_argument("--prune_crossattn", action="store_true", help="also prune around cross-attention")
    group.add_argument("--prune_mlp", action="store_true", help="also prune around the feed-forward")
    group.add_argument("--deepcache", action="store_true", help="uniform DeepCache feature caching")
    group.add_argument("--cache_interval", type=int, default=3, help="DeepCache: every N-th step is full")
    group.add_argument("--cache_depth", type=int, default=1,
                       help="DeepCache: blocks computed at the cached steps (1 = shallowest branch, 0..12)")
    group.add_argument("--tome", action="store_true", help="ToMeSD token merging (tomesd package)")
    group.add_argument("--tome_ratio", type=float, default=0.5, help="ToMeSD merge ratio in [0, 1)")


@dataclass
class Acceleration:
    """A resolved, validated acceleration choice; `apply` patches a model, `remove` undoes it."""

    strategy: Optional[Strategy] = None
    dato_options: Optional[dict] = None
    tome_ratio: Optional[float] = None

    @property
    def label(self) -> str:
        parts = []
        if self.strategy is not None:
            kind = "DaTo" if self.dato_options is not None else "DeepCache"
            parts.append(f"{kind} [{self.strategy.describe()}]")
        if self.tome_ratio is not None:
            parts.append(f"ToMeSD r={self.tome_ratio:g}")
        return " + ".join(parts) if parts else "original (no acceleration)"

    def apply(self, model: torch.nn.Module, seed: int = 0) -> str:
        if self.strategy is not None:
            apply_patch(model, self.strategy, seed=seed, **(self.dato_options or {}))
        if self.tome_ratio is not None:
            import tomesd

            tomesd.apply_patch(model, ratio=self.tome_ratio)
        return self.label

    def remove(self, model: torch.nn.Module) -> None:
        if self.tome_ratio is not None:
            import tomesd

            tomesd.remove_patch(model)
        remove_patch(model)


def resolve_acceleration(opt: argparse.Namespace, steps: int) -> Acceleration:
    """Check the acceleration flags against the sampler's real step count; raise ValueError before sampling."""
    if opt.dato and (opt.deepcache or opt.tome):
        raise ValueError("--dato already caches and prunes; do not combine it with --deepcache or --tome")
    if opt.strategy and not opt.dato:
        raise ValueError("--strategy is a DaTo strategy: add --dato")
    acceleration = Acceleration()
    if opt.tome:
        if not 0.0 <= opt.tome_ratio < 1.0:
            raise ValueError(f"--tome_ratio must be in [0, 1), got {opt.tome_ratio}")
        try:
            import tomesd  # noqa: F401
        except ImportError:
            raise ValueError("--tome needs the tomesd package: pip install tomesd") from None
        acceleration.tome_ratio = opt.tome_ratio
    if opt.deepcache:
        if opt.cache_interval < 1:
            raise ValueError(f"--cache_interval must be at least 1, got {opt.cache_interval}")
        if not 0 <= opt.cache_depth <= MAX_DEPTH:
            raise ValueError(f"--cache_depth must be in 0..{MAX_DEPTH}, got {opt.cache_depth}")
        acceleration.strategy = Strategy.uniform(steps, opt.cache_interval, opt.cache_depth)
    if opt.dato:
        path = Path(opt.strategy) if opt.strategy else DEFAULT_STRATEGY
        if not path.is_file():
            raise ValueError(f"strategy file not found: {path}")
        strategy = Strategy.load(path)
        if strategy.steps != steps:
            hint = ("" if opt.strategy else
                    f" The default strategy {DEFAULT_STRATEGY.name} is the paper's b1 for 50 steps: sample with "
                    f"--ddim_steps {strategy.steps} or give a --strategy made for {steps} steps "
                    f"(scripts/search_ratio.py and search_depth.py find one).")
            raise StrategyError(f"strategy {path} has {strategy.steps} steps but the sampler runs {steps}.{hint}")
        options = dict(RELEASED_CODE_PARITY) if opt.dato_parity else {}
        for name in ("diff_source", "cfg_reference", "recover_from"):
            if getattr(opt, name) is not None:
                options[name] = getattr(opt, name)
        options.update(align_cfg=not opt.no_align_cfg, max_downsample=opt.max_downsample,
                       prune_crossattn=opt.prune_crossattn, prune_mlp=opt.prune_mlp)
        acceleration.strategy = strategy
        acceleration.dato_options = options
    return acceleration
