"""The registry: a table of method kinds that every front end goes through, for names (`parse`), flags
(`add_flags`, `from_flags`) and the rule of what combines (`combine`). Adding a kind is one class and one entry in
KINDS. A registry is a value: `with_kind(cls)` gives a new one with another kind (tests, extensions); a parser
built by `add_flags` carries its registry, so `from_flags` reads the kinds it was built with."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from datosd.strategy import Strategy

from ..runtime import UsageError
from .baselines import DeepCacheHelper, Ddim, Original, Tome
from .caching import Dato, DeepCache
from .crossattn import TextPrune, TGate
from .kind import MethodError, MethodKind
from .method import Method

KINDS: Tuple[Type[MethodKind], ...] = (Original, Ddim, Tome, DeepCache, Dato, TextPrune, TGate, DeepCacheHelper)
EXAMPLE = "deepcache-n3+tome-0.5"
REGISTRY_DEST = "_method_registry"  # where a parser built by add_flags keeps its registry


class Registry:
    """The method kinds, by key, in registration order."""

    def __init__(self, kinds: Sequence[Type[MethodKind]]):
        keys = [kind.key for kind in kinds]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two method kinds with one key in {keys}")
        dests = [flag.dest for kind in kinds for flag in kind.flags]
        if len(set(dests)) != len(dests):
            raise ValueError(f"two method flags with one name in {dests}")
        self.kinds: Tuple[Type[MethodKind], ...] = tuple(kinds)

    def with_kind(self, kind: Type[MethodKind]) -> "Registry":
        """This registry with one kind more."""
        return Registry(self.kinds + (kind,))

    # --- names -----------------------------------------------------------------------------------------------
    def grammar(self) -> str:
        """One line per kind: its grammar and what it does."""
        return "\n".join(f"{kind.grammar}: {kind.about}" for kind in self.kinds)

    def component(self, token: str) -> MethodKind:
        """The component one name token describes (MethodError / StrategyError when none or a bad one)."""
        for kind in self.kinds:
            component = kind.parse(token)
            if component is not None:
                return component
        raise MethodError(f"unknown method {token!r}; known: {', '.join(kind.grammar for kind in self.kinds)} and "
                          f"combinations with '+' (e.g. {EXAMPLE})")

    def parse(self, name: str) -> Method:
        """The method a registry name describes (components joined with '+'). Raises MethodError / StrategyError."""
        tokens = [token.strip() for token in name.split("+") if token.strip()]
        if not tokens:
            raise MethodError("empty method name")
        return self.combine([self.component(token) for token in tokens], name)

    def combine(self, components: Sequence[MethodKind], name: str) -> Method:
        """The method of `components` (in name order), or MethodError '<name>: <why>' for a pair that does not
        combine: two of one kind, or a pair a kind's `conflicts` names (pairs checked in name order, so the
        reason does not depend on the order they were given in)."""
        ordered = sorted(components, key=lambda c: c.order)
        for i, first in enumerate(ordered):
            for second in ordered[i + 1:]:
                reason = conflict(first, second)
                if reason is not None:
                    raise MethodError(f"{name}: {reason}")
        return Method(tuple(ordered))

    def cost_key(self, method: Method) -> Dict[str, Any]:
        """What a cost table of `method`'s calls adds to its key: every kind's `cost_key` fields, at the
        values of `method`'s cost-changing components (the others' values when it has none of that kind)."""
        key: Dict[str, Any] = {}
        for kind in self.kinds:
            key.update(kind.cost_key)
        for component in method.cost_components:
            key.update(component.cost_values())
        return key

    # --- flags -----------------------------------------------------------------------------------------------
    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """--method NAME, and every kind's flags in its group; the parser remembers this registry."""
        groups: Dict[str, Any] = {}

        def group(title: str):
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            return groups[title]

        group(MethodKind.flag_group).add_argument("--method", type=str, default=None,
                                  help=f"any method of the registry by name, e.g. 'dato:b1', '{EXAMPLE}', "
                                       f"'dato@last37' (see sdgen.methods); instead of the flags below")
        for kind in self.kinds:
            exclusive: Dict[str, Any] = {}
            for flag in kind.flags:
                target = group(kind.flag_group)
                if flag.exclusive is not None:
                    if flag.exclusive not in exclusive:
                        exclusive[flag.exclusive] = target.add_mutually_exclusive_group()
                    target = exclusive[flag.exclusive]
                target.add_argument(flag.option, **flag.arguments)
        parser.set_defaults(**{REGISTRY_DEST: self})

    def given_flags(self, opt: argparse.Namespace) -> Dict[Type[MethodKind], List[str]]:
        """{kind: its flags whose value is not the default}."""
        given = {}
        for kind in self.kinds:
            options = [flag.option for flag in kind.flags if getattr(opt, flag.dest) != flag.default]
            if options:
                given[kind] = options
        return given

    def from_flags(self, opt: argparse.Namespace) -> Method:
        """The method the flags describe: --method NAME, or every kind whose switch is on. UsageError for
        contradicting flags; the combination is checked as `combine` checks a name (the same message)."""
        given = self.given_flags(opt)
        if opt.method is not None:
            if given:
                flags = [option for options in given.values() for option in options]
                raise UsageError(f"--method {opt.method} names the whole method; drop {', '.join(flags)}")
            return self.parse(opt.method)
        components = []
        for kind, options in given.items():
            switch = next(flag for flag in kind.flags if flag.dest == kind.switch)
            if switch.option not in options:
                metavar = switch.arguments.get("metavar")
                add = switch.option + (f" {metavar}" if metavar else "")
                raise UsageError(f"{', '.join(options)} set(s) {kind.title}: add {add}")
            components.append(kind.from_flags({flag.dest: getattr(opt, flag.dest) for flag in kind.flags}))
        if not components:
            return self.parse("original")
        return self.combine(components, "+".join(c.name for c in sorted(components, key=lambda c: c.order)))


def conflict(first: MethodKind, second: MethodKind) -> Optional[str]:
    """Why two components do not combine, or None."""
    if first.key == second.key:
        return f"at most one {first.grammar}"
    for a, b in ((first, second), (second, first)):
        reason = a.conflicts.get(b.key) or a.conflicts.get("*")
        if reason is not None:
            return reason
    return None


REGISTRY = Registry(KINDS)


def parse_method(name: str, registry: Registry = REGISTRY) -> Method:
    """The method a registry name describes (`Registry.parse`). Raises MethodError / StrategyError."""
    return registry.parse(name)


def registry_of(opt: argparse.Namespace) -> Registry:
    """The registry a parser was built with (`Registry.add_flags`)."""
    return getattr(opt, REGISTRY_DEST, REGISTRY)


def dato_method(strategy: Strategy, **dato_options) -> Method:
    """A DaTo method for a strategy held in memory (e.g. a search candidate); its name says 'dato:<name>' and
    records the options, but only a strategy file or a shipped name can be parsed back."""
    return Method((Dato.make(strategy.name or "strategy", (), dict(dato_options), spelled=True, plan=strategy),))
