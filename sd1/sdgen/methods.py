"""The one registry of acceleration methods: every script, the benchmark, the search and the table driver
resolve method names here.

Names (components joined with '+'):

    original                         the unaccelerated model
    ddim<N>                          DDIM with N steps (the paper's few-step baseline), e.g. ddim10
    tome-<r>                         ToMeSD at merge ratio r, through the real `tomesd` package
    deepcache-n<N>[-d<d>]            uniform DeepCache: every N-th step full, the others at cache depth d (1)
    textprune-<w>-k<k> | textprune-<w>-t<t>[-dynamic]
                                     prompt-token pruning by cross-attention importance after a warm-up of
                                     the first ceil(w S) steps: keep k tokens, or those with mean attention
                                     probability >= t (frozen after the warm-up, or re-chosen: -dynamic)
    tgate-<m>[-perhalf]              T-GATE: cross-attention cached after gate step m (the CFG mean; -perhalf:
                                     each half its own) and reused
    dato[:<strategy>][@<derive>...][,<option>...]
                                     DaTo with a per-step strategy: a shipped name (b1, b1-table-order) or a
                                     YAML path (default b1); derivations last<N> (the last N steps, for
                                     img2img), every<K> (every K-th step), r<ratio> (one ratio at every
                                     step); options parity, diff_source=eps|features, cfg_reference=cond|uncond,
                                     recover_from=base|kept, align_cfg=0|1, max_downsample=N, prune_crossattn,
                                     prune_mlp, score_noise=<w_diff>/<w_noise>

e.g. `deepcache-n3+tome-0.5` (the paper's naive combination), `dato:b1`, `dato:b1@last37`,
`dato:b1@r0.5,align_cfg=0`, `dato+tgate-20`. A `Method` is a value: `apply(model, steps, seed)` patches a model and returns
an `AppliedMethod` (a context manager) that `remove()`s the patches again.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from datosd.patch import RELEASED_CODE_PARITY, DatoOptions, DatoState, apply_patch, remove_patch
from datosd.strategy import MAX_DEPTH, Strategy, StrategyError, call_kind
from datosd.text_pruning import TextPruneOptions, apply_text_pruning, remove_text_pruning
from datosd.tgate import TGateOptions, apply_tgate, remove_tgate
from datosd.utils import attention_downsample
from ldm.models.diffusion.hooks import SamplingHook

from .compiled import EAGER, CompiledUNet, Execution
from .resources import builtin_strategies, find_strategy

SAMPLERS = ("plms", "ddim")
DATO_OPTION_NAMES = ("diff_source", "cfg_reference", "recover_from", "align_cfg", "max_downsample",
                     "prune_crossattn", "prune_mlp", "score_noise")


class MethodError(ValueError):
    """A method name or setting that cannot be used (raised before any model is built)."""


@dataclass(frozen=True, eq=False)
class Method:
    """One acceleration setting: what it patches and, for DDIM-N, which sampler and step count it forces.

    Attributes:
        name: the canonical registry name (parse_method(name) gives this method back).
        sampler, steps: forced by ddim<N>; None means the caller's.
        deepcache: (interval, depth) of uniform DeepCache; its strategy is built for the run's step count.
        strategy: the DaTo strategy (fixed length), with `dato_options` (DatoOptions fields).
        tome_ratio: ToMeSD merge ratio.
    """

    name: str
    sampler: Optional[str] = None
    steps: Optional[int] = None
    deepcache: Optional[Tuple[int, int]] = None
    strategy: Optional[Strategy] = None
    dato_options: Dict[str, Any] = field(default_factory=dict)
    tome_ratio: Optional[float] = None
    text_prune: Optional[TextPruneOptions] = None
    tgate: Optional[TGateOptions] = None

    @property
    def label(self) -> str:
        """Readable description, e.g. 'DeepCache N=3 depth 1 + ToMeSD r=0.5'."""
        parts = []
        if self.steps is not None:
            parts.append(f"DDIM {self.steps} steps")
        if self.deepcache is not None:
            parts.append(f"DeepCache N={self.deepcache[0]} depth {self.deepcache[1]}")
        if self.strategy is not None:
            options = ", ".join(f"{k}={v}" for k, v in sorted(self.dato_options.items()))
            parts.append(f"DaTo [{self.strategy.describe()}]" + (f" ({options})" if options else ""))
        if self.tome_ratio is not None:
            parts.append(f"ToMeSD r={self.tome_ratio:g}")
        if self.text_prune is not None:
            t = self.text_prune
            rule = f"keep {t.keep}" if t.keep is not None else f"threshold {t.threshold:g}, {t.mode}"
            parts.append(f"prompt-token pruning (warm-up {t.warmup:g}, {rule})")
        if self.tgate is not None:
            parts.append(f"T-GATE (gate step {self.tgate.gate_step}, {self.tgate.cache.replace('_', ' ')})")
        return " + ".join(parts) if parts else "original (no acceleration)"

    @property
    def is_original(self) -> bool:
        return self.name == "original"

    def run_sampler(self, sampler: str) -> str:
        """The sampler a run of this method uses when the caller asks for `sampler`."""
        return self.sampler or sampler

    def run_steps(self, steps: int) -> int:
        """The step count a run of this method uses when the caller asks for `steps`."""
        return self.steps if self.steps is not None else steps

    def patch_strategy(self, steps: int) -> Optional[Strategy]:
        """The caching/pruning strategy for a run of `steps` sampler steps (None: nothing to patch)."""
        if self.deepcache is not None:
            interval, depth = self.deepcache
            return Strategy.uniform(steps, interval, depth)
        if self.strategy is not None:
            self.check_steps(steps)
            return self.strategy
        return None

    def check_steps(self, steps: int) -> None:
        """Raise StrategyError, with what to do, unless the DaTo strategy has exactly `steps` steps."""
        if self.strategy is None or self.strategy.steps == steps:
            return
        raise StrategyError(
            f"strategy {self.strategy.name!r} has {self.strategy.steps} steps but the sampler runs {steps}. "
            f"Sample with {self.strategy.steps} steps, or derive a {steps}-step strategy: "
            f"'dato:{self.strategy.name}@last{steps}' (its last {steps} steps, what img2img visits), "
            f"'@every<K>' for every K-th step, or search one (scripts/search_ratio.py, search_depth.py).")

    def tgate_check(self, steps: int) -> None:
        """Raise MethodError when T-GATE's gate step does not fall inside a run of `steps` steps."""
        if self.tgate is not None and self.tgate.gate_step >= steps:
            raise MethodError(f"{self.name}: the gate step {self.tgate.gate_step} is not before the run's last "
                              f"step ({steps} steps); T-GATE would change nothing")

    def call_plan(self, steps: int, sampler: str) -> List[Tuple[int, float]]:
        """(cache depth, prune ratio) of every UNet call of one run of `steps` steps (PLMS: step 0 twice)."""
        steps, sampler = self.run_steps(steps), self.run_sampler(sampler)
        strategy = self.patch_strategy(steps) or Strategy.full(steps)
        return strategy.call_plan(sampler)

    def call_counts(self, steps: int, sampler: str) -> Dict[str, int]:
        """UNet calls of one run by kind: {'full': ..., 'partial': ..., 'reused': ...}."""
        kinds = [call_kind(depth) for depth, _ in self.call_plan(steps, sampler)]
        return {kind: kinds.count(kind) for kind in ("full", "partial", "reused")}

    def apply(self, model: torch.nn.Module, steps: int, seed: int = 0,
              execution: Execution = EAGER) -> "AppliedMethod":
        """Patch `model` for runs of `steps` sampler steps; every random draw of a run comes from `seed`.
        `execution`: eager, or compiled (and / or channels-last) UNet calls (sdgen.compiled)."""
        return AppliedMethod(self, model, steps, seed, execution)


class AppliedMethod(SamplingHook):
    """A method patched into one model. Use as a context manager, or call `remove()`.

    It re-seeds every random draw of the method at the start of each sampling run (DaTo's base tokens and
    score noise, tomesd's random partition), so one seed gives the same images run after run.
    """

    def __init__(self, method: Method, model: torch.nn.Module, steps: int, seed: int = 0,
                 execution: Execution = EAGER):
        self.method = method
        self.model = model
        self.seed = seed
        self.dato_state: Optional[DatoState] = None
        self._tome_unet: Optional[torch.nn.Module] = None
        if method.tgate is not None:
            method.tgate_check(steps)
        strategy = method.patch_strategy(steps)
        if strategy is not None:
            self.dato_state = apply_patch(model, strategy, seed=seed, **method.dato_options)
        if method.tome_ratio is not None:
            tomesd = import_tomesd()
            # tomesd merges in blocks down to max_downsample: reach the first level with attention (SDXL: 2).
            tomesd.apply_patch(model, ratio=method.tome_ratio, max_downsample=attention_downsample(model))
            self._tome_unet = model.model.diffusion_model
        if method.text_prune is not None:
            apply_text_pruning(model, method.text_prune)
        if method.tgate is not None:
            apply_tgate(model, method.tgate)
        only_dato = method.tome_ratio is None and method.text_prune is None and method.tgate is None
        self.compiled = CompiledUNet(model, execution, self.dato_state,
                                     fullgraph=self.dato_state is not None and only_dato)
        model.sampling_hooks.add(self)

    def reseed(self, seed: int) -> None:
        """Draw the following runs' random choices from `seed`."""
        self.seed = seed
        if self.dato_state is not None:
            self.dato_state.reseed(seed)

    def sampling_started(self, num_steps: int) -> None:
        if self._tome_unet is not None:
            device = next(self._tome_unet.parameters()).device
            self._tome_unet._tome_info["args"]["generator"] = torch.Generator(device=device).manual_seed(self.seed)

    def call_counts(self) -> Optional[Dict[str, int]]:
        """UNet calls of the last run by kind, as the patch recorded them (None when nothing caches)."""
        if self.dato_state is None:
            return None
        kinds = [call.kind for call in self.dato_state.calls]
        return {kind: kinds.count(kind) for kind in ("full", "partial", "reused")}

    def remove(self) -> None:
        self.model.sampling_hooks.remove(self)
        self.compiled.remove()
        if self.method.tgate is not None:
            remove_tgate(self.model)
        if self.method.text_prune is not None:
            remove_text_pruning(self.model)
        if self._tome_unet is not None:
            import_tomesd().remove_patch(self.model)
            self._tome_unet = None
        if self.dato_state is not None:
            remove_patch(self.model)
            self.dato_state = None

    def __enter__(self) -> "AppliedMethod":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def import_tomesd():
    try:
        import tomesd
    except ImportError:
        raise MethodError("ToMeSD needs the tomesd package: pip install tomesd") from None
    return tomesd


# --- names ------------------------------------------------------------------------------------------------

_DDIM = re.compile(r"ddim(\d+)")
_TOME = re.compile(r"tome-(\d*\.?\d+)")
_DEEPCACHE = re.compile(r"deepcache-n(\d+)(?:-d(\d+))?")
_DERIVE = re.compile(r"(last|every|r)(\d*\.?\d+)")
_TEXTPRUNE = re.compile(r"textprune-(\d*\.?\d+)-(?:k(\d+)|t(\d*\.?\d+(?:e-?\d+)?))(-dynamic)?")
_TGATE = re.compile(r"tgate-(\d+)(-perhalf)?")


def _fmt(value: float) -> str:
    return f"{value:g}"


def _parse_dato_option(token: str, options: Dict[str, Any]) -> None:
    key, _, value = token.partition("=")
    if key == "parity":
        options.update(RELEASED_CODE_PARITY)
        return
    if key in ("prune_crossattn", "prune_mlp") and not value:
        options[key] = True
        return
    if key not in DATO_OPTION_NAMES or not value:
        raise MethodError(f"unknown DaTo option {token!r}; options: parity, " + ", ".join(
            f"{name}=..." for name in DATO_OPTION_NAMES))
    if key in ("align_cfg", "prune_crossattn", "prune_mlp"):
        if value not in ("0", "1"):
            raise MethodError(f"DaTo option {key} takes 0 or 1, got {value!r}")
        options[key] = value == "1"
    elif key == "max_downsample":
        options[key] = int(value) if value.isdigit() else value
    elif key == "score_noise":
        try:
            w_diff, w_noise = (float(v) for v in value.split("/"))
        except ValueError:
            raise MethodError(f"score_noise takes <w_diff>/<w_noise>, e.g. 0.1/0.1, got {value!r}") from None
        options[key] = (w_diff, w_noise)
    else:
        options[key] = value


def _dato_name(source: str, derivations: List[str], options: Dict[str, Any]) -> str:
    name = "dato" + ("" if source == "b1" else f":{source}") + "".join(f"@{d}" for d in derivations)
    if options:
        parity = all(options.get(key) == value for key, value in RELEASED_CODE_PARITY.items())
        tokens = ["parity"] if parity else []
        for key in DATO_OPTION_NAMES:
            if key not in options or (parity and key in RELEASED_CODE_PARITY):
                continue
            value = options[key]
            if isinstance(value, bool):
                tokens.append(f"{key}={int(value)}")
            elif isinstance(value, tuple):
                tokens.append(f"{key}={'/'.join(_fmt(v) for v in value)}")
            else:
                tokens.append(f"{key}={value}")
        name += "," + ",".join(tokens)
    return name


def _parse_dato(spec: str) -> Method:
    head, *option_tokens = spec.split(",")
    head = head[len("dato"):]
    if head and not head.startswith((":", "@")):
        raise MethodError(f"cannot read DaTo method {spec!r}: write dato, dato:<strategy>, dato@<derivation>")
    source_part, *derivations = head.lstrip(":").split("@") if head else ("",)
    source = source_part or "b1"
    strategy = Strategy.load(find_strategy(source))
    if source in builtin_strategies():
        strategy.name = source
    for derivation in derivations:
        match = _DERIVE.fullmatch(derivation)
        if match is None:
            raise MethodError(f"unknown strategy derivation @{derivation!r}; use last<N>, every<K> or r<ratio>")
        kind, number = match.groups()
        if kind == "last":
            strategy = strategy.last(int(number))
        elif kind == "every":
            strategy = strategy.every(int(number))
        else:
            strategy = strategy.with_ratio(float(number))
    options: Dict[str, Any] = {}
    for token in option_tokens:
        _parse_dato_option(token.strip(), options)
    try:
        DatoOptions(**options)
    except (TypeError, ValueError) as err:
        raise MethodError(f"DaTo options of {spec!r}: {err}") from None
    return Method(name=_dato_name(source, derivations, options), strategy=strategy, dato_options=options)


def _parse_component(token: str) -> Method:
    if token == "original":
        return Method("original")
    if match := _DDIM.fullmatch(token):
        steps = int(match.group(1))
        if not 1 <= steps <= 1000:
            raise MethodError(f"{token}: the step count must be 1..1000")
        return Method(token, sampler="ddim", steps=steps)
    if match := _TOME.fullmatch(token):
        ratio = float(match.group(1))
        if not 0.0 <= ratio < 1.0:
            raise MethodError(f"{token}: the ToMeSD ratio must be in [0, 1)")
        return Method(f"tome-{_fmt(ratio)}", tome_ratio=ratio)
    if match := _DEEPCACHE.fullmatch(token):
        interval = int(match.group(1))
        depth = int(match.group(2)) if match.group(2) is not None else 1
        if interval < 1 or not 0 <= depth <= MAX_DEPTH:
            raise MethodError(f"{token}: DeepCache needs an interval >= 1 and a depth in 0..{MAX_DEPTH}")
        return Method(f"deepcache-n{interval}" + (f"-d{depth}" if depth != 1 else ""), deepcache=(interval, depth))
    if match := _TEXTPRUNE.fullmatch(token):
        warmup, keep, threshold, dynamic = match.groups()
        try:
            options = TextPruneOptions(warmup=float(warmup), keep=int(keep) if keep else None,
                                       threshold=float(threshold) if threshold else None,
                                       mode="dynamic" if dynamic else "static")
        except ValueError as err:
            raise MethodError(f"{token}: {err}") from None
        rule = f"k{options.keep}" if options.keep is not None else f"t{options.threshold:g}"
        return Method(f"textprune-{options.warmup:g}-{rule}" + ("-dynamic" if dynamic else ""), text_prune=options)
    if match := _TGATE.fullmatch(token):
        try:
            options = TGateOptions(gate_step=int(match.group(1)), cache="per_half" if match.group(2) else "cfg_mean")
        except ValueError as err:
            raise MethodError(f"{token}: {err}") from None
        return Method(token, tgate=options)
    if token == "dato" or token.startswith(("dato:", "dato@", "dato,")):
        return _parse_dato(token)
    raise MethodError(f"unknown method {token!r}; known: original, ddim<N>, tome-<r>, deepcache-n<N>[-d<d>], "
                      f"dato[:<strategy>], textprune-<w>-k<k>|-t<t>, tgate-<m> and combinations with '+' "
                      f"(e.g. deepcache-n3+tome-0.5)")


def parse_method(name: str) -> Method:
    """The method a registry name describes (see the module docstring). Raises MethodError / StrategyError."""
    tokens = [token.strip() for token in name.split("+") if token.strip()]
    if not tokens:
        raise MethodError("empty method name")
    parts = [_parse_component(token) for token in tokens]
    if len(parts) == 1:
        return parts[0]
    if any(p.is_original for p in parts):
        raise MethodError(f"{name}: 'original' does not combine with other methods")
    if sum(p.steps is not None for p in parts) > 1:
        raise MethodError(f"{name}: at most one ddim<N>")
    if sum(p.deepcache is not None or p.strategy is not None for p in parts) > 1:
        raise MethodError(f"{name}: DaTo and DeepCache both patch the UNet forward; use one of them")
    if sum(p.tome_ratio is not None for p in parts) > 1:
        raise MethodError(f"{name}: at most one tome-<r>")
    if sum(p.text_prune is not None or p.tgate is not None for p in parts) > 1:
        raise MethodError(f"{name}: prompt-token pruning and T-GATE both replace the cross-attention; use one")
    merged: Dict[str, Any] = {}
    for part in parts:
        for key in ("sampler", "steps", "deepcache", "strategy", "tome_ratio", "text_prune", "tgate"):
            if getattr(part, key) is not None:
                merged[key] = getattr(part, key)
        merged["dato_options"] = {**merged.get("dato_options", {}), **part.dato_options}
    order = sorted(parts, key=lambda p: (p.steps is None, p.tome_ratio is not None,
                                         p.text_prune is not None or p.tgate is not None))
    return Method(name="+".join(p.name for p in order), **merged)


def dato_method(strategy: Strategy, **dato_options) -> Method:
    """A DaTo method for a strategy held in memory (e.g. a search candidate); its name says 'dato:<name>' and
    records the options, but only a strategy file or a shipped name can be parsed back."""
    try:
        DatoOptions(**dato_options)
    except (TypeError, ValueError) as err:
        raise MethodError(f"DaTo options: {err}") from None
    name = _dato_name(strategy.name or "strategy", [], dict(dato_options))
    if not name.startswith("dato:"):  # a strategy named b1: spell it out, it need not be the shipped one
        name = "dato:b1" + name[len("dato"):]
    return Method(name=name, strategy=strategy, dato_options=dict(dato_options))

