"""What every method kind is: `MethodKind`, one component of a method, in the manner of diffusers' hooks (an
immutable config that knows how to apply itself, a small applied object that removes itself).

A kind is a frozen dataclass of its settings whose class owns everything about the kind: its name grammar
(`parse`, `name`), its `label`, its command-line flags (`flags`, `from_flags`), what it forces on a run (sampler,
steps) and plans for it (`strategy`, `check_steps`), how it patches a model (`apply`, returning a `Patch`) and
what it cannot be combined with (`conflicts`). A `Registry` (registry.py) is a table of kinds; everything else
goes through it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch

from datosd.state import DatoState
from datosd.strategy import Strategy

ALL_FAMILIES = frozenset({"ldm", "sgm", "diffusers"})
MODEL_FAMILIES = frozenset({"ldm", "sgm"})  # what the CompVis / generative-models samplers of sdgen sample


class MethodError(ValueError):
    """A method name or setting that cannot be used (raised before any model is built)."""


class MissingPackageError(MethodError):
    """A method needs a package that is not installed (the message says what to install)."""


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a kind: `option` ('--tome_ratio') and the keywords of `add_argument`;
    `exclusive`: the name of a mutually exclusive group it belongs to."""

    option: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    exclusive: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")

    @property
    def default(self) -> Any:
        return self.arguments.get("default", False if self.arguments.get("action") == "store_true" else None)


class Patch:
    """What applying a kind left on a model. `remove()` undoes it; `reseed(seed)` makes the following runs draw
    their random choices from `seed`; `sampling_started` is called at the start of every run of an ldm / sgm
    model. `dato_state`: the caching patch's state (compiled execution runs its blocks)."""

    dato_state: Optional[DatoState] = None

    def remove(self) -> None:
        raise NotImplementedError

    def reseed(self, seed: int) -> None:
        pass

    def sampling_started(self, num_steps: int) -> None:
        pass


class MethodKind:
    """One component of a method (subclasses: frozen dataclasses of their settings). See the module docstring.

    Class attributes:
        key: the kind's name in messages and `conflicts` ('tome').
        grammar: its name grammar, for messages and docs ('tome-<r>').
        about: what it does, in one line.
        order: where it stands in a combined name; components are applied in this order, removed in reverse.
        families: the model families it patches ('ldm', 'sgm', 'diffusers').
        conflicts: {other kind's key, or '*' for every other kind: why the two do not combine}.
        title, flag_group: how its flags present it ('ToMeSD'; the argparse group they go in).
        flags: its flags; `switch` (the dest of one of them) turns the kind on.
        changes_call_cost: its runs' cost table is measured with it applied (the cost table of the others
            depends only on the cache depth and prune ratio of each call).
        cost_key: what it adds to a cost table's key, with the values of a run without it.
        predicted: the per-call cost table predicts its runs (False: it changes calls the table does not time).
        compile_fullgraph: compiled DaTo blocks still have no graph break with it applied.
    """

    key: ClassVar[str]
    grammar: ClassVar[str]
    about: ClassVar[str] = ""
    order: ClassVar[int] = 50
    families: ClassVar[FrozenSet[str]] = MODEL_FAMILIES
    conflicts: ClassVar[Mapping[str, str]] = {}
    title: ClassVar[str] = ""
    flag_group: ClassVar[str] = "acceleration (DaTo and the paper's baselines)"
    flags: ClassVar[Tuple[Flag, ...]] = ()
    switch: ClassVar[Optional[str]] = None
    changes_call_cost: ClassVar[bool] = False
    cost_key: ClassVar[Mapping[str, Any]] = {}
    predicted: ClassVar[bool] = True
    compile_fullgraph: ClassVar[bool] = True

    # --- the name --------------------------------------------------------------------------------------------
    pattern: ClassVar[Optional["re.Pattern"]] = None  # its tokens (the grammar as a regular expression)

    @classmethod
    def parse(cls, token: str) -> Optional["MethodKind"]:
        """The component a name token describes; None when the token is not of this kind, MethodError when it
        is but cannot be used. By default: `from_match` of a full match of `pattern`."""
        match = cls.pattern.fullmatch(token) if cls.pattern is not None else None
        return None if match is None else cls.from_match(match, token)

    @classmethod
    def from_match(cls, match: "re.Match", token: str) -> "MethodKind":
        """The component of a token that matched `pattern` (MethodError when its values cannot be used)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The canonical token (parse(name) gives this component back)."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        raise NotImplementedError

    # --- flags -----------------------------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, values: Dict[str, Any]) -> "MethodKind":
        """The component the kind's flags describe, the switch being on. values: {dest: value} of its flags.
        Raises UsageError (a flag's value) or MethodError."""
        raise NotImplementedError

    # --- the run ---------------------------------------------------------------------------------------------
    def forced_sampler(self) -> Optional[str]:
        """The sampler every run of the component uses (None: the caller's)."""
        return None

    def forced_steps(self) -> Optional[int]:
        """The step count every run of the component uses (None: the caller's)."""
        return None

    def strategy(self, steps: int) -> Optional[Strategy]:
        """The caching / pruning strategy of a run of `steps` sampler steps (None: it caches nothing)."""
        return None

    def check_steps(self, steps: int) -> None:
        """Raise StrategyError / MethodError, saying what to do, when a run of `steps` sampler steps cannot use it."""

    def for_last_steps(self, steps: int) -> "MethodKind":
        """The component for a run of a schedule's last `steps` steps (img2img); itself unless it can adapt."""
        return self

    def notes(self) -> List[str]:
        """What a reader of a results table must know about the component (e.g. a derived strategy)."""
        return []

    def cost_values(self) -> Dict[str, Any]:
        """Its values of the fields it adds to a cost table's key (`cost_key`)."""
        return {}

    # --- the model -------------------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Optional[Patch]:
        """Patch `model` for runs of `steps` sampler steps, random draws from `seed`; None when it patches nothing."""
        return None
