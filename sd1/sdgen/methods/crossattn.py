"""The cross-attention method kinds: prompt-token pruning (`textprune-...`) and T-GATE (`tgate-<m>[-sa...][-perhalf]`),
both run by `datosd` (they replace every `attn2`, so they compose with the caching kinds and ToMeSD; T-GATE's
self-attention schedule also replaces every `attn1` and so needs every token: no DaTo, no ToMeSD)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch

from datosd.text_pruning import MODES, TextPruneOptions, apply_text_pruning, remove_text_pruning
from datosd.tgate import CACHE_MODES, SelfAttentionSchedule, TGateOptions, apply_tgate, remove_tgate

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


SCHEDULE_FLAGS = {"tgate_warm_up": "warm_up", "tgate_sp_interval": "sp_interval", "tgate_fi_interval": "fi_interval"}
SCHEDULE_TOKENS = {"warm_up": "w", "sp_interval": "p", "fi_interval": "f"}
RELEASED_SCHEDULE = SelfAttentionSchedule()


@dataclass(frozen=True)
class TGate(MethodKind):
    """T-GATE: cross-attention cached after the gate step and reused; with `-sa`, self-attention cached and reused on
    the released code's schedule too (`datosd.tgate`)."""

    options: TGateOptions

    key = "tgate"
    grammar = "tgate-<m>[-sa[-w<w>][-p<p>][-f<f>]][-perhalf]"
    about = ("T-GATE: cross-attention cached after gate step m (the CFG mean; -perhalf: each half its own) and "
             "reused; -sa: self-attention cached and reused too, on the released code's schedule (warm-up w = 2 "
             "steps, then cached every p = 5 steps before the gate and every f = 1 after)")
    order = 30
    title = "T-GATE"
    flag_group = GROUP
    flags = (Flag("--tgate_step", dict(type=int, default=None, metavar="M",
                                       help="T-GATE: from this step on, reuse the cached cross-attention output")),
             Flag("--tgate_cache", dict(choices=list(CACHE_MODES), default="cfg_mean",
                                        help="T-GATE cache: the CFG halves' mean (the paper's) or each half its own")),
             Flag("--tgate_self_attn", dict(action="store_true",
                                            help="T-GATE: also cache and reuse self-attention on the released code's "
                                                 "schedule (TGATE-V2)")),
             Flag("--tgate_warm_up", dict(type=int, default=RELEASED_SCHEDULE.warm_up,
                                          help=f"T-GATE self-attention: steps that compute before the first cache "
                                               f"(default {RELEASED_SCHEDULE.warm_up})")),
             Flag("--tgate_sp_interval", dict(type=int, default=RELEASED_SCHEDULE.sp_interval,
                                              help=f"T-GATE self-attention: cache every this many steps before the "
                                                   f"gate, reuse between (default {RELEASED_SCHEDULE.sp_interval})")),
             Flag("--tgate_fi_interval", dict(type=int, default=RELEASED_SCHEDULE.fi_interval,
                                              help=f"T-GATE self-attention: cache every this many steps after the "
                                                   f"gate, reuse between (default {RELEASED_SCHEDULE.fi_interval})")))
    switch = "tgate_step"
    predicted = False  # the cost table times calls that compute their cross-attention
    compile_fullgraph = False
    pattern = re.compile(r"tgate-(\d+)(-sa(?:-w(\d+))?(?:-p(\d+))?(?:-f(\d+))?)?(-perhalf)?")

    @classmethod
    def make(cls, gate_step: int, cache: str, schedule: Optional[Dict[str, int]], token: str) -> "TGate":
        """schedule: None (no self-attention schedule) or the SelfAttentionSchedule fields that differ from the
        released defaults."""
        try:
            self_attention = None if schedule is None else SelfAttentionSchedule(**schedule)
            return cls(TGateOptions(gate_step=gate_step, cache=cache, self_attention=self_attention))
        except ValueError as err:
            raise MethodError(f"{token}: {err}") from None

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "TGate":
        gate, self_attention, warm_up, sp_interval, fi_interval, per_half = match.groups()
        schedule = None
        if self_attention:
            values = {"warm_up": warm_up, "sp_interval": sp_interval, "fi_interval": fi_interval}
            schedule = {field: int(value) for field, value in values.items() if value is not None}
        return cls.make(int(gate), "per_half" if per_half else "cfg_mean", schedule, token)

    @classmethod
    def from_flags(cls, values: Dict[str, Any]) -> "TGate":
        schedule = {field: values[dest] for dest, field in SCHEDULE_FLAGS.items()}
        if not values["tgate_self_attn"]:
            changed = [f"--{dest}" for dest, field in SCHEDULE_FLAGS.items()
                       if schedule[field] != getattr(RELEASED_SCHEDULE, field)]
            if changed:
                raise UsageError(f"{', '.join(changed)} set(s) T-GATE's self-attention schedule: add --tgate_self_attn")
            schedule = None
        return cls.make(values["tgate_step"], values["tgate_cache"], schedule, "--tgate_step")

    @property
    def conflicts(self) -> Mapping[str, str]:  # type: ignore[override]
        """With the self-attention schedule: the kinds that change the tokens self-attention sees."""
        if self.options.self_attention is None:
            return {}
        return {"dato": "T-GATE's self-attention schedule (-sa) reuses self-attention outputs, which DaTo's pruned "
                        "tokens would not match; use T-GATE without -sa, or DeepCache (deepcache-n<N>)",
                "tome": "T-GATE's self-attention schedule (-sa) reuses self-attention outputs, which ToMeSD's merged "
                        "tokens would not match; use T-GATE without -sa"}

    @property
    def name(self) -> str:
        options, schedule = self.options, self.options.self_attention
        name = f"tgate-{options.gate_step}"
        if schedule is not None:
            name += "-sa" + "".join(f"-{token}{getattr(schedule, field)}" for field, token in SCHEDULE_TOKENS.items()
                                    if getattr(schedule, field) != getattr(RELEASED_SCHEDULE, field))
        return name + ("-perhalf" if options.cache == "per_half" else "")

    @property
    def label(self) -> str:
        options, schedule = self.options, self.options.self_attention
        label = f"T-GATE (gate step {options.gate_step}, {options.cache.replace('_', ' ')}"
        if schedule is not None:
            label += (f"; self-attention cached on the released schedule: warm-up {schedule.warm_up}, intervals "
                      f"{schedule.sp_interval} before / {schedule.fi_interval} after the gate")
        return label + ")"

    def check_steps(self, steps: int) -> None:
        if self.options.gate_step >= steps:
            raise MethodError(f"{self.name}: the gate step {self.options.gate_step} is not before the run's last "
                              f"step ({steps} steps); T-GATE would change nothing")

    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Patch:
        apply_tgate(model, self.options)
        return RemovingPatch(model, remove_tgate)
