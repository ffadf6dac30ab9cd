"""The per-step DaTo strategy F: a cache depth and a prune ratio for every sampler step (spec 1).

A strategy is stored as YAML (the shipped ones in ``datosd/strategies/``, linked as ``configs/dato/``)::

    name: b1
    steps: 50
    cache_depth: [1, 1, ..., 0]      # one int in 0..12 per step, in sampler order (i = 0 noisiest)
    prune_ratio: [0.7, 0.5, ..., 0.5]  # one float in [0, 1) per step

Besides those, a file may hold the metadata keys of ``METADATA_KEYS`` (``sampler``, ``model``, ``source``, ...),
kept in ``Strategy.meta``; any other key is refused (a misspelt ``cache_dept`` would otherwise be kept as
metadata while the step lists it meant to set are missing or wrong).
Every ``Strategy`` is validated on construction (spec 7.9); a bad one raises
``StrategyError`` before any sampling starts.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import yaml

__all__ = ["DEFAULT_STRATEGY", "MAX_DEPTH", "METADATA_KEYS", "STRATEGY_DIR", "Strategy", "StrategyError", "StrategyLike",
           "StrategySummary", "call_kind", "find_strategy", "load_strategy", "shipped_strategies"]

# spec 1/2: the largest depth a strategy holds; it computes every block of any UNet (SD 1.x has 12 input
# blocks, SDXL 9: a depth at or above the model's block count is a full step, `n_blocks` below)
MAX_DEPTH = 12
_RESERVED_KEYS = ("name", "steps", "cache_depth", "prune_ratio")
# What a strategy file may say about itself (kept in Strategy.meta): the shipped files' keys, those the search
# writes into best.yaml, and those the derived strategies (last, every, with_ratio) record.
METADATA_KEYS = ("sampler", "model", "source", "derived_from", "derivation", "sampler_steps_arg", "quality",
                 "latency_ms", "w_M", "select")
STRATEGY_DIR = Path(__file__).resolve().parent / "strategies"  # the shipped strategies (package data)
DEFAULT_STRATEGY = STRATEGY_DIR / "b1.yaml"

PathLike = Union[str, Path]


class StrategyError(ValueError):
    """A strategy that cannot be used: wrong lengths or values, or a step-count mismatch."""


def call_kind(depth: int, n_blocks: int = MAX_DEPTH) -> str:
    """'full' (depth >= n_blocks, the UNet's input-block count), 'reused' (depth 0: the last prediction is
    returned) or 'partial'."""
    return "full" if depth >= n_blocks else ("reused" if depth == 0 else "partial")


def _fail(name: Optional[str], problem: str, expected: str, todo: str) -> StrategyError:
    """Build an error that says what was wrong, what was expected and what to do."""
    where = f"strategy {name!r}" if name else "strategy"
    return StrategyError(f"{where}: {problem}; expected {expected}. {todo}")


def _as_depth(value: Any, i: int, name: Optional[str]) -> int:
    """cache_depth[i] as an int in 0..12; integral floats (1.0, from a search) are accepted."""
    todo = "Fix that entry of cache_depth."
    expected = f"an integer from 0 to {MAX_DEPTH}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, f"cache_depth[{i}] = {value!r} is not a number", expected, todo)
    if isinstance(value, numbers.Integral):
        depth = int(value)
    else:
        v = float(value)
        if not math.isfinite(v) or v != int(v):
            raise _fail(name, f"cache_depth[{i}] = {value!r} is not an integer", expected, todo)
        depth = int(v)
    if not 0 <= depth <= MAX_DEPTH:
        raise _fail(name, f"cache_depth[{i}] = {depth} is outside 0..{MAX_DEPTH}", expected, todo)
    return depth


def _as_ratio(value: Any, i: int, name: Optional[str]) -> float:
    """prune_ratio[i] as a float in [0, 1)."""
    todo = "Fix that entry of prune_ratio (0 means no pruning at that step)."
    expected = "a fraction of tokens in [0, 1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, f"prune_ratio[{i}] = {value!r} is not a number", expected, todo)
    ratio = float(value)
    if math.isnan(ratio):
        raise _fail(name, f"prune_ratio[{i}] is NaN", expected, todo)
    if not 0.0 <= ratio < 1.0:
        raise _fail(name, f"prune_ratio[{i}] = {ratio} is outside [0, 1)", expected, todo)
    return ratio


@dataclass(frozen=True)
class StrategySummary:
    """Step counts of a strategy: full (depth >= the UNet's block count), partial, reused (d == 0)."""

    steps: int
    full: int
    partial: int
    reused: int
    mean_ratio: float


@dataclass
class Strategy:
    """Per-step cache depth and prune ratio, in sampler step order (spec 1).

    Attributes:
        cache_depth: one int in 0..12 per step (12: compute everything, 0: reuse everything).
        prune_ratio: one float in [0, 1) per step (0: no pruning).
        name: optional label, shown in messages and ``describe()``.
        meta: extra YAML keys (sampler, model, source, ...), saved back unchanged.
    """

    cache_depth: List[int]
    prune_ratio: List[float]
    name: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # --- validation (spec 7.9) ---------------------------------------------------
    def validate(self) -> None:
        """Check lengths and values; normalise entries to int / float. Raises StrategyError."""
        name = self.name
        for key in ("cache_depth", "prune_ratio"):
            values = getattr(self, key)
            if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
                raise _fail(
                    name, f"{key} is a {type(values).__name__}, not a list",
                    "a list with one entry per step", f"Write {key} as a list.",
                )
            values = list(values)  # tuples, numpy arrays (e.g. from the search) become lists
            setattr(self, key, values)
            if len(values) == 0:
                raise _fail(
                    name, f"{key} is empty", "one entry per sampler step (at least one)", "Give every step a value."
                )
        if len(self.cache_depth) != len(self.prune_ratio):
            raise _fail(
                name,
                f"cache_depth has {len(self.cache_depth)} entries but prune_ratio has {len(self.prune_ratio)}",
                "both lists to have one entry per sampler step",
                "Make the two lists the same length.",
            )
        self.cache_depth = [_as_depth(v, i, name) for i, v in enumerate(self.cache_depth)]
        self.prune_ratio = [_as_ratio(v, i, name) for i, v in enumerate(self.prune_ratio)]

    @property
    def steps(self) -> int:
        """Number of sampler steps the strategy covers."""
        return len(self.cache_depth)

    def check_steps(self, n: int) -> None:
        """Raise StrategyError unless the sampler runs exactly ``n`` == ``steps`` steps (never stretched or cut)."""
        if n != self.steps:
            raise _fail(
                self.name,
                f"it has {self.steps} steps but the sampler runs {n}",
                "a strategy with exactly one entry per sampler step (it is never stretched or cut)",
                f"Run the sampler with {self.steps} steps, or use a {n}-step strategy"
                f" (e.g. Strategy.uniform({n}, interval, depth)).",
            )

    def step_setting(self, step: int, n_blocks: int = MAX_DEPTH) -> Tuple[int, float]:
        """(cache depth, prune ratio) that step `step` runs with on a UNet of `n_blocks` input blocks: the
        stored entry, except that step 0 and any depth >= n_blocks compute everything (spec 2), given as
        MAX_DEPTH."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside the strategy's {self.steps} steps")
        depth = self.cache_depth[step]
        return (MAX_DEPTH if step == 0 or depth >= n_blocks else depth), self.prune_ratio[step]

    def call_plan(self, first_step_calls: int = 1, n_blocks: int = MAX_DEPTH) -> List[Tuple[int, float]]:
        """(cache depth, prune ratio) of every UNet call of one run, in order, on a UNet of `n_blocks` input
        blocks. first_step_calls: the sampler's UNet calls in step 0 (CompVis PLMS: 2), one in every other."""
        return [self.step_setting(step, n_blocks) for step in range(self.steps)
                for _ in range(first_step_calls if step == 0 else 1)]

    # --- constructors ------------------------------------------------------------
    @classmethod
    def full(cls, steps: int, name: Optional[str] = "full") -> "Strategy":
        """Every step computes every block, no pruning: the unpatched model (spec 7.1)."""
        return cls([MAX_DEPTH] * steps, [0.0] * steps, name=name)

    @classmethod
    def uniform(
        cls, steps: int, interval: int, depth: int, ratio: float = 0.0, name: Optional[str] = None
    ) -> "Strategy":
        """Uniform DeepCache (spec 2): step i is full when i % interval == 0, else at ``depth``.

        ``ratio`` is the prune ratio of every step.
        """
        if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
            raise _fail(name, f"interval = {interval!r}", "an integer >= 1", "Pass the full-step period, e.g. 3.")
        depths = [MAX_DEPTH if i % interval == 0 else depth for i in range(steps)]
        if name is None:
            name = f"uniform-N{interval}-d{depth}" + (f"-r{ratio:g}" if ratio else "")
        return cls(depths, [ratio] * steps, name=name)

    @classmethod
    def constant_ratio(
        cls, steps: int, ratio: float, depth: int = MAX_DEPTH, name: Optional[str] = None
    ) -> "Strategy":
        """The same depth and prune ratio at every step (default: no caching, pruning only)."""
        if name is None:
            name = f"constant-d{depth}-r{ratio:g}"
        return cls([depth] * steps, [ratio] * steps, name=name)

    # --- derived strategies ------------------------------------------------------
    def last(self, n: int) -> "Strategy":
        """The last ``n`` steps: what an img2img run of ``n`` steps visits of this schedule (CompVis img2img
        runs the low-noise end of the DDIM schedule)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= self.steps:
            raise _fail(self.name, f"last({n!r})", f"a step count from 1 to {self.steps}",
                        "Ask for at most as many steps as the strategy has.")
        return Strategy(self.cache_depth[-n:], self.prune_ratio[-n:], name=f"{self.name or 'strategy'}-last{n}",
                        meta=dict(self.meta, derived_from=self.name, derivation=f"last {n} steps"))

    def every(self, stride: int) -> "Strategy":
        """Every ``stride``-th step from step 0: a shorter stand-in of this strategy for fewer sampler steps."""
        if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride < 1:
            raise _fail(self.name, f"every({stride!r})", "a stride >= 1", "Pass a positive integer stride.")
        return Strategy(self.cache_depth[::stride], self.prune_ratio[::stride],
                        name=f"{self.name or 'strategy'}-every{stride}",
                        meta=dict(self.meta, derived_from=self.name, derivation=f"every {stride}th step"))

    def with_ratio(self, ratio: float) -> "Strategy":
        """The same cache depths with one prune ratio at every step (the paper's Table 3 rows)."""
        return Strategy(list(self.cache_depth), [ratio] * self.steps, name=f"{self.name or 'strategy'}-r{ratio:g}",
                        meta=dict(self.meta, derived_from=self.name, derivation=f"prune ratio {ratio:g} at every step"))

    def with_depths(self, schedule: "Strategy") -> "Strategy":
        """These prune ratios on the cache depths of `schedule`, a strategy of as many steps (e.g. DaTo's pruning
        on DeepCache's full and partial steps, to compare the two at equal full steps)."""
        if schedule.steps != self.steps:
            raise _fail(self.name, f"with_depths of a {schedule.steps}-step schedule", f"{self.steps} steps",
                        "Derive both strategies for the same step count.")
        name = f"{self.name or 'strategy'}-on-{schedule.name or 'schedule'}"
        return Strategy(list(schedule.cache_depth), list(self.prune_ratio), name=name,
                        meta=dict(self.meta, derived_from=self.name, derivation=f"cache depths of {schedule.name}"))

    # --- YAML --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, name: Optional[str] = None) -> "Strategy":
        """Build from a mapping with keys steps, cache_depth, prune_ratio (name and extras optional)."""
        if not isinstance(data, dict):
            raise _fail(
                name, f"the file holds a {type(data).__name__}, not a mapping",
                "keys steps, cache_depth, prune_ratio", "See configs/dato/b1.yaml for the format.",
            )
        name = data.get("name", name)
        unknown = [str(key) for key in data if key not in _RESERVED_KEYS and key not in METADATA_KEYS]
        if unknown:
            raise _fail(
                name, f"unknown key(s) {', '.join(unknown)}",
                f"the keys {', '.join(_RESERVED_KEYS)} and optionally the metadata keys {', '.join(METADATA_KEYS)}",
                "Fix the spelling or remove the key(s).",
            )
        missing = [key for key in ("steps", "cache_depth", "prune_ratio") if key not in data]
        if missing:
            raise _fail(
                name, f"missing key(s) {', '.join(missing)}",
                "keys steps, cache_depth, prune_ratio", "See configs/dato/b1.yaml for the format.",
            )
        steps = data["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise _fail(name, f"steps = {steps!r}", "a positive integer", "Set steps to the sampler's step count.")
        meta = {k: v for k, v in data.items() if k not in _RESERVED_KEYS}
        strategy = cls(list(data["cache_depth"] or []), list(data["prune_ratio"] or []), name=name, meta=meta)
        if strategy.steps != steps:
            raise _fail(
                name,
                f"steps is {steps} but the lists have {strategy.steps} entries",
                "steps to equal the length of cache_depth and prune_ratio",
                "Fix steps or the lists.",
            )
        return strategy

    def to_dict(self) -> Dict[str, Any]:
        """Mapping with name (if any), steps, cache_depth, prune_ratio, then the extra keys."""
        data: Dict[str, Any] = {}
        if self.name is not None:
            data["name"] = self.name
        data["steps"] = self.steps
        data["cache_depth"] = list(self.cache_depth)
        data["prune_ratio"] = list(self.prune_ratio)
        data.update(self.meta)
        return data

    @classmethod
    def load(cls, path: PathLike) -> "Strategy":
        """Read a strategy YAML file; the name defaults to the file's stem."""
        path = Path(path)
        if path.is_dir():
            raise _folder_error(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.reader.ReaderError):
            raise StrategyError(f"strategy file {path} is not a text YAML file (it holds bytes that are not "
                                f"text); give a strategy YAML such as configs/dato/b1.yaml") from None
        except yaml.YAMLError as e:
            raise StrategyError(f"strategy file {path} is not valid YAML: {e}") from e
        try:
            return cls.from_dict(data, name=path.stem)
        except StrategyError as e:
            raise StrategyError(f"{path}: {e}") from None

    def save(self, path: PathLike) -> None:
        """Write the strategy as YAML (lists on one line each), readable by ``load``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, default_flow_style=None, width=1 << 16)

    # --- reporting ---------------------------------------------------------------
    def summary(self, n_blocks: int = MAX_DEPTH) -> StrategySummary:
        """Steps as they run on a UNet of `n_blocks` input blocks: full (d >= n_blocks, and step 0, which always
        computes everything: spec 2), partial (0 < d < n_blocks) and reused (d == 0), and the mean prune ratio."""
        kinds = [call_kind(self.step_setting(step, n_blocks)[0]) for step in range(self.steps)]
        return StrategySummary(
            steps=self.steps,
            full=kinds.count("full"),
            partial=kinds.count("partial"),
            reused=kinds.count("reused"),
            mean_ratio=sum(self.prune_ratio) / self.steps,
        )

    def describe(self, n_blocks: int = MAX_DEPTH) -> str:
        """One line, e.g. ``b1: 50 steps, 6 full / 37 partial / 7 reused, mean prune ratio 0.47`` (steps counted
        as `summary(n_blocks)` does)."""
        s = self.summary(n_blocks)
        return (
            f"{self.name or 'strategy'}: {s.steps} steps, {s.full} full / {s.partial} partial /"
            f" {s.reused} reused, mean prune ratio {s.mean_ratio:.2f}"
        )


StrategyLike = Union[Strategy, str, Path, None]


def shipped_strategies() -> List[str]:
    """Names of the strategies shipped with datosd (e.g. 'b1', 'b1-table-order')."""
    return sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))


def _folder_error(path: Path) -> StrategyError:
    return StrategyError(f"strategy {path} is a folder, not a strategy file; give a YAML file in it, or one of the "
                         f"shipped strategies: {', '.join(shipped_strategies())}")


def find_strategy(name_or_path: PathLike) -> Path:
    """A strategy file: the path itself, or the file of a shipped strategy name ('b1'). StrategyError if none."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    if given.is_dir():
        raise _folder_error(given)
    shipped = STRATEGY_DIR / f"{name_or_path}.yaml"
    if given.suffix == "" and len(given.parts) == 1 and shipped.is_file():
        return shipped
    raise StrategyError(f"strategy file not found: {name_or_path} (give a YAML file or one of the shipped "
                        f"strategies: {', '.join(shipped_strategies())})")


def load_strategy(strategy: StrategyLike) -> Optional[Strategy]:
    """A Strategy, None, a YAML path, or a shipped strategy's name ('b1', named so) as a Strategy (None stays)."""
    if strategy is None or isinstance(strategy, Strategy):
        return strategy
    path = find_strategy(strategy)
    loaded = Strategy.load(path)
    if path.parent == STRATEGY_DIR and str(strategy) == path.stem:
        loaded.name = path.stem
    return loaded
