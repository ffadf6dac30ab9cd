"""The cross-attention method kinds: prompt-token pruning (`textprune-...`) and T-GATE (`tgate-<m>[-perhalf]`),
both run by `datosd` (they replace every `attn2`, so they compose with the caching kinds and ToMeSD)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from datosd.text_pruning import MODES, TextPruneOptions, apply_text_pruning, remove_text_pruning
from datosd.tgate import CACHE_MODES, TGateOptions, apply_tgate, remove_tgate

from ..runtime import UsageError
from .kind import Flag, MethodError, MethodKind, Patch

GROUP = "cross-attention (prompt-token pruning, T-GATE; combine with the above)"


class RemovingPatch(Patch):
    """A patch that `remove(model)` undoes."""

    def __init__(self, model: torch.nn.Module, remove):
        self.model = model
        self._remove = remove

    def remove(self) -> None:
        self._remove(self.model)


@dataclass(frozen=True)
class TextPrune(MethodKind):
    """Prompt-token pruning by cross-attention importance after a warm-up (`datosd.text_pruning`)."""

    options: TextPruneOptions

    key = "textprune"
    grammar = "textprune-<w>-k<k>|textprune-<w>-t<t>[-dynamic]"
    about = ("prompt-token pruning by cross-attention importance after a warm-up of the first ceil(w S) steps: "
             "keep k tokens, or those with mean attention probability >= t (frozen after the warm-up, or "
             "re-chosen: -dynamic)")
    order = 30
    conflicts = {"tgate": "prompt-token pruning and T-GATE both replace the cross-attention; use one of them"}
    title = "prompt-token pruning"
    flag_group = GROUP
    flags = (Flag("--prune_text", dict(action="store_true",
                                       help="prune prompt tokens by their cross-attention importance after a warm-up")),
             Flag("--text_warmup", dict(type=float, default=0.2,
                                        help="share of the steps that see every prompt token (default 0.2)")),
             Flag("--text_threshold", dict(type=float, default=None, help="keep tokens whose mean cross-attention "
                                                                           "probability is at least this"),
                  exclusive="text_rule"),
             Flag("--text_keep", dict(type=int, default=None, help="keep this many tokens (BOS and EOS included)"),
                  exclusive="text_rule"),
             Flag("--text_mode", dict(choices=list(MODES), default="static",
                                      help="kept set frozen after the warm-up (static) or re-chosen each step "
                                           "(dynamic, threshold)")))
    switch = "prune_text"
    predicted = False  # the cost table times calls with every prompt token
    compile_fullgraph = False
    pattern = re.compile(r"textprune-(\d*\.?\d+)-(?:k(\d+)|t(\d*\.?\d+(?:e-?\d+)?))(-dynamic)?")

    @classmethod
    def make(cls, warmup: float, keep: Optional[int], threshold: Optional[float], dynamic: bool,
             token: str) -> "TextPrune":
        try:
            return cls(TextPruneOptions(warmup=warmup, keep=keep, threshold=threshold,
                                        mode="dynamic" if dynamic else "static"))
        except ValueError as err:
            raise MethodError(f"{token}: {err}") from None

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "TextPrune":
        warmup, keep, threshold, dynamic = match.groups()
        return cls.make(float(warmup), int(keep) if keep else None, float(threshold) if threshold else None,
                        bool(dynamic), token)

    @classmethod
    def from_flags(cls, values: Dict[str, Any]) -> "TextPrune":
        if values["text_threshold"] is None and values["text_keep"] is None:
            raise UsageError("--prune_text needs --text_threshold T or --text_keep K")
        return cls.make(values["text_warmup"], values["text_keep"], values["text_threshold"],
                        values["text_mode"] == "dynamic", "--prune_text")

    @property
    def rule(self) -> str:
        o = self.options
        return f"k{o.keep}" if o.keep is not None else f"t{o.threshold:g}"

    @property
    def name(self) -> str:
        return f"textprune-{self.options.warmup:g}-{self.rule}" + ("-dynamic" if self.options.mode == "dynamic" else "")

    @property
    def label(self) -> str:
        o = self.options
        rule = f"keep {o.keep}" if o.keep is not None else f"threshold {o.threshold:g}, {o.mode}"
        return f"prompt-token pruning (warm-up {o.warmup:g}, {rule})"

    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Patch:
        apply_text_pruning(model, self.options)
        return RemovingPatch(model, remove_text_pruning)


@dataclass(frozen=True)
class TGate(MethodKind):
    """T-GATE: cross-attention cached after the gate step and reused (`datosd.tgate`)."""

    options: TGateOptions

    key = "tgate"
    grammar = "tgate-<m>[-perhalf]"
    about = ("T-GATE: cross-attention cached after gate step m (the CFG mean; -perhalf: each half its own) and "
             "reused")
    order = 30
    title = "T-GATE"
    flag_group = GROUP
    flags = (Flag("--tgate_step", dict(type=int, default=None, metavar="M",
                                       help="T-GATE: from this step on, reuse the cached cross-attention output")),
             Flag("--tgate_cache", dict(choices=list(CACHE_MODES), default="cfg_mean",
                                        help="T-GATE cache: the CFG halves' mean (the paper's) or each half its own")))
    switch = "tgate_step"
    predicted = False  # the cost table times calls that compute their cross-attention
    compile_fullgraph = False
    pattern = re.compile(r"tgate-(\d+)(-perhalf)?")

    @classmethod
    def make(cls, gate_step: int, cache: str, token: str) -> "TGate":
        try:
            return cls(TGateOptions(gate_step=gate_step, cache=cache))
        except ValueError as err:
            raise MethodError(f"{token}: {err}") from None

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "TGate":
        return cls.make(int(match.group(1)), "per_half" if match.group(2) else "cfg_mean", token)

    @classmethod
    def from_flags(cls, values: Dict[str, Any]) -> "TGate":
        return cls.make(values["tgate_step"], values["tgate_cache"], "--tgate_step")

    @property
    def name(self) -> str:
        return f"tgate-{self.options.gate_step}" + ("-perhalf" if self.options.cache == "per_half" else "")

    @property
    def label(self) -> str:
        return f"T-GATE (gate step {self.options.gate_step}, {self.options.cache.replace('_', ' ')})"

    def check_steps(self, steps: int) -> None:
        if self.options.gate_step >= steps:
            raise MethodError(f"{self.name}: the gate step {self.options.gate_step} is not before the run's last "
                              f"step ({steps} steps); T-GATE would change nothing")

    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Patch:
        apply_tgate(model, self.options)
        return RemovingPatch(model, remove_tgate)
