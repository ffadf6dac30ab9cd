"""The caching method kinds, both run by the `datosd` patch: uniform DeepCache (`deepcache-n<N>[-d<d>]`) and DaTo
(`dato[:<strategy>][@<derivation>...][,<option>...]`). DaTo's options, as flags and as name tokens, are made from
the fields of `datosd.DatoOptions` (their metadata): one definition."""
from __future__ import annotations

import re
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

import datosd
from datosd.state import RELEASED_CODE_PARITY, DatoOptions
from datosd.strategy import MAX_DEPTH, Strategy, StrategyError, load_strategy

from ..runtime import UsageError
from .kind import ALL_FAMILIES, Flag, MethodError, MethodKind, Patch

_DERIVE = re.compile(r"(last|every|r)(\d*\.?\d+)")
NAME_CHARACTERS = ",@+"  # what a strategy path in a name may not contain


class DatoPatch(Patch):
    """The datosd patch on a model (ldm, sgm or a diffusers pipeline)."""

    def __init__(self, model: torch.nn.Module, strategy: Strategy, seed: int, options: Dict[str, Any]):
        self.model = model
        self.dato_state = datosd.apply_patch(model, strategy, seed=seed, **options)

    def reseed(self, seed: int) -> None:
        self.dato_state.reseed(seed)

    def remove(self) -> None:
        datosd.remove_patch(self.model)


@dataclass(frozen=True)
class DeepCache(MethodKind):
    """Uniform DeepCache: every `interval`-th step full, the others at cache depth `depth` (spec 2)."""

    interval: int
    depth: int = 1

    key = "deepcache"
    grammar = "deepcache-n<N>[-d<d>]"
    about = "uniform DeepCache: every N-th step full, the others at cache depth d (1)"
    order = 20
    families = ALL_FAMILIES
    title = "uniform DeepCache"
    flags = (Flag("--deepcache", dict(action="store_true", help="uniform DeepCache feature caching")),
             Flag("--cache_interval", dict(type=int, default=3, help="DeepCache: every N-th step is full")),
             Flag("--cache_depth", dict(type=int, default=1, help="DeepCache: blocks computed at the cached steps "
                                                                   "(1 = shallowest branch, 0..12)")))
    switch = "deepcache"
    pattern = re.compile(r"deepcache-n(\d+)(?:-d(\d+))?")

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "DeepCache":
        interval = int(match.group(1))
        depth = int(match.group(2)) if match.group(2) is not None else 1
        if interval < 1 or not 0 <= depth <= MAX_DEPTH:
            raise MethodError(f"{token}: DeepCache needs an interval >= 1 and a depth in 0..{MAX_DEPTH}")
        return cls(interval, depth)

    @classmethod
    def from_flags(cls, values: Dict[str, Any]) -> "DeepCache":
        if values["cache_interval"] < 1:
            raise UsageError(f"--cache_interval must be at least 1, got {values['cache_interval']}")
        if not 0 <= values["cache_depth"] <= MAX_DEPTH:
            raise UsageError(f"--cache_depth must be in 0..{MAX_DEPTH}, got {values['cache_depth']}")
        return cls(values["cache_interval"], values["cache_depth"])

    @property
    def name(self) -> str:
        return f"deepcache-n{self.interval}" + (f"-d{self.depth}" if self.depth != 1 else "")

    @property
    def label(self) -> str:
        return f"DeepCache N={self.interval} depth {self.depth}"

    def strategy(self, steps: int) -> Strategy:
        return Strategy.uniform(steps, self.interval, self.depth)

    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Patch:
        return DatoPatch(model, self.strategy(steps), seed, {})


# --- DaTo's options: flags and name tokens from the fields of DatoOptions -------------------------------------------
def user_options() -> List[Field]:
    """The user-facing fields of DatoOptions (those with help metadata), in their order."""
    return [f for f in fields(DatoOptions) if "help" in f.metadata]


def _option_flag(option: Field) -> Flag:
    about = option.metadata["help"]
    if isinstance(option.default, bool):
        if option.default:
            return Flag(f"--no_{option.name}", dict(action="store_true", help=f"turn off: {about}"))
        return Flag(f"--{option.name}", dict(action="store_true", help=about))
    if "names" in option.metadata:
        names = option.metadata["names"]
        return Flag(f"--{option.name}", dict(type=float, nargs=len(names), default=None, metavar=names, help=about))
    choices = option.metadata["choices"]
    return Flag(f"--{option.name}", dict(type=type(choices[0]), choices=choices, default=None,
                                         help=f"{about} (default {option.default})"))


def _flag_value(option: Field, values: Dict[str, Any]) -> Any:
    """The option a flag gives (None: not given)."""
    flag = _option_flag(option)
    value = values[flag.dest]
    if isinstance(option.default, bool):
        return (not option.default) if value else None
    return tuple(value) if isinstance(value, list) else value


def _parse_option(token: str, options: Dict[str, Any]) -> None:
    """Read one name token (parity, <option>=<value>, or a switch option alone) into `options`."""
    key, _, value = token.partition("=")
    if key == "parity":
        options.update(RELEASED_CODE_PARITY)
        return
    known = {option.name: option for option in user_options()}
    option = known.get(key)
    if option is not None and isinstance(option.default, bool) and not value:
        options[key] = True
        return
    if option is None or not value:
        raise MethodError(f"unknown DaTo option {token!r}; options: parity, " + ", ".join(
            f"{name}=..." for name in known))
    if isinstance(option.default, bool):
        if value not in ("0", "1"):
            raise MethodError(f"DaTo option {key} takes 0 or 1, got {value!r}")
        options[key] = value == "1"
    elif "names" in option.metadata:
        try:
            weights = tuple(float(v) for v in value.split("/"))
        except ValueError:
            weights = ()
        if len(weights) != len(option.metadata["names"]):
            raise MethodError(f"{key} takes <w_diff>/<w_noise>, e.g. 0.1/0.1, got {value!r}")
        options[key] = weights
    elif isinstance(option.metadata["choices"][0], int):
        options[key] = int(value) if value.isdigit() else value
    else:
        options[key] = value


def _option_tokens(options: Dict[str, Any]) -> List[str]:
    """The name tokens of `options` (parity when the preset is all there), in the fields' order."""
    parity = all(options.get(key) == value for key, value in RELEASED_CODE_PARITY.items())
    tokens = ["parity"] if parity else []
    for option in user_options():
        key = option.name
        if key not in options or (parity and key in RELEASED_CODE_PARITY):
            continue
        value = options[key]
        if isinstance(value, bool):
            tokens.append(f"{key}={int(value)}")
        elif isinstance(value, tuple):
            tokens.append(f"{key}={'/'.join(f'{v:g}' for v in value)}")
        else:
            tokens.append(f"{key}={value}")
    return tokens


def check_source(source: str, flag: str) -> None:
    """Refuse a strategy path that a method name cannot hold (UsageError naming `flag`)."""
    if any(c in source for c in NAME_CHARACTERS):
        raise UsageError(f"{flag} {source}: the path may not contain ',', '@' or '+'; rename it")


@dataclass(frozen=True)
class Dato(MethodKind):
    """DaTo with a per-step strategy (`plan`, read from `source` and its `derivations`) and options.

    spelled: the name says dato:<source> even for b1 (a strategy held in memory, which the name cannot hold);
    default_strategy: the flags named no strategy (`for_last_steps` may then derive one).
    """

    source: str
    derivations: Tuple[str, ...]
    options: Tuple[Tuple[str, Any], ...]
    plan: Strategy = field(compare=False)
    spelled: bool = field(default=False, compare=False)
    default_strategy: bool = field(default=False, compare=False)

    key = "dato"
    grammar = "dato[:<strategy>][@<derivation>...][,<option>...]"
    about = ("DaTo with a per-step strategy: a shipped name (b1, b1-table-order) or a YAML path (default b1); "
             "derivations last<N> (the last N steps, for img2img), every<K> (every K-th step), r<ratio> (one ratio "
             "at every step); options parity, " + ", ".join(f"{o.name}=..." for o in user_options()))
    order = 20
    families = ALL_FAMILIES
    conflicts = {"deepcache": "DaTo and DeepCache both patch the UNet forward; use one of them",
                 "tome": "DaTo and ToMeSD do not combine: tomesd's transformer block forward replaces the one DaTo "
                         "prunes in, so DaTo's pruning would be lost; use one of them"}
    title = "DaTo"
    flags = (Flag("--dato", dict(action="store_true", help="DaTo: per-step token pruning + feature caching")),
             Flag("--strategy", dict(type=str, default=None, help="DaTo strategy: a YAML file or a shipped name "
                                                                  "(default b1, the paper's Table 6)")),
             Flag("--dato_parity", dict(action="store_true", help="the released-code parity preset: eps DiffScore, "
                                        "score noise, uncond CFG reference, recovery from kept tokens "
                                        "(docs/methods.md lists what it still does differently)")),
             *(_option_flag(option) for option in user_options()))
    switch = "dato"

    @classmethod
    def make(cls, source: str, derivations: Tuple[str, ...], options: Dict[str, Any], spelled: bool = False,
             default_strategy: bool = False, plan: Optional[Strategy] = None) -> "Dato":
        """The component of a strategy source (or a `plan` held in memory), derived, with checked options."""
        try:
            DatoOptions(**options)
        except (TypeError, ValueError) as err:
            raise MethodError(f"DaTo options: {err}") from None
        strategy = plan if plan is not None else load_strategy(source)
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
        ordered = tuple((o.name, options[o.name]) for o in user_options() if o.name in options)
        return cls(source, tuple(derivations), ordered, strategy, spelled, default_strategy)

    @classmethod
    def parse(cls, token: str) -> Optional["Dato"]:
        if not (token == "dato" or token.startswith(("dato:", "dato@", "dato,"))):
            return None
        head, *option_tokens = token.split(",")
        head = head[len("dato"):]
        if head and not head.startswith((":", "@")):
            raise MethodError(f"cannot read DaTo method {token!r}: write dato, dato:<strategy>, dato@<derivation>")
        source, *derivations = head.lstrip(":").split("@") if head else ("",)
        options: Dict[str, Any] = {}
        for option_token in option_tokens:
            _parse_option(option_token.strip(), options)
        try:
            return cls.make(source or "b1", tuple(derivations), options)
        except MethodError as err:
            raise MethodError(f"{token}: {err}") from None

    @classmethod
    def from_flags(cls, values: Dict[str, Any]) -> "Dato":
        source = values["strategy"]
        if source is not None:
            check_source(source, "--strategy")
        options = dict(RELEASED_CODE_PARITY) if values["dato_parity"] else {}
        for option in user_options():
            value = _flag_value(option, values)
            if value is not None:
                options[option.name] = value
        return cls.make(source or "b1", (), options, default_strategy=source is None)

    @property
    def dato_options(self) -> Dict[str, Any]:
        return dict(self.options)

    @property
    def name(self) -> str:
        source = f":{self.source}" if self.spelled or self.source != "b1" else ""
        tokens = _option_tokens(self.dato_options) if self.options else []
        return "dato" + source + "".join(f"@{d}" for d in self.derivations) + "".join(f",{t}" for t in tokens)

    @property
    def label(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in sorted(self.options))
        return f"DaTo [{self.plan.describe()}]" + (f" ({options})" if options else "")

    def strategy(self, steps: int) -> Strategy:
        self.check_steps(steps)
        return self.plan

    def check_steps(self, steps: int) -> None:
        """Raise StrategyError, with what to do, unless the strategy has exactly `steps` steps."""
        plan = self.plan
        if plan.steps == steps:
            return
        raise StrategyError(
            f"strategy {plan.name!r} has {plan.steps} steps but the sampler runs {steps}. "
            f"Sample with {plan.steps} steps, or derive a {steps}-step strategy: "
            f"'dato:{plan.name}@last{steps}' (its last {steps} steps, what img2img visits), "
            f"'@every<K>' for every K-th step, or search one (scripts/search_ratio.py, search_depth.py).")

    def notes(self) -> List[str]:
        meta = self.plan.meta
        if "derivation" not in meta:
            return []
        return [f"strategy {self.plan.name}: {meta.get('derived_from')}'s {meta['derivation']}, "
                f"a {self.plan.steps}-step stand-in"]

    def for_last_steps(self, steps: int) -> "Dato":
        """For a run of the schedule's last `steps` steps (img2img): the default strategy's last steps when no
        strategy was named, else itself."""
        if not self.default_strategy or self.plan.steps == steps:
            return self
        return replace(self, derivations=self.derivations + (f"last{steps}",), plan=self.plan.last(steps),
                       default_strategy=False)

    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Patch:
        return DatoPatch(model, self.strategy(steps), seed, self.dato_options)
