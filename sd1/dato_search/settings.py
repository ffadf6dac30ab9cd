"""The settings of one search: resolved from the command line and checked before anything is loaded or written."""
from __future__ import annotations

import argparse
import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

from datosd.strategy import DEFAULT_STRATEGY, MAX_DEPTH, Strategy, StrategyError, find_strategy
from sdgen.benchmark import check_cost_table
from sdgen.generate import ModelRef
from sdgen.images import check_output_dir
from sdgen.prompts import read_prompts
from sdgen.resources import IMAGENET_PROMPTS
from sdgen.runtime import UsageError, pick_device
from sdgen.settings import RunSettings, SettingFlags

from .evaluator import SamplingSpec
from .objectives import QualitySpec
from .space import UNIFORM_INTERVALS, SearchSpace

__all__ = ["LATENCIES", "MODES", "SELECTS", "SearchSettings", "SearchUsageError", "choose_prompts",
           "resolve_settings"]

MODES = ("depth", "ratio", "joint")
LATENCIES = ("table", "measured")
SELECTS = ("raw", "normalized")
DEFAULT_DEPTH_SPACE = "0,1,12"  # spec 1
DEFAULT_RATIO_SPACE = "0.3,0.4,0.5,0.6,0.7"  # spec 1
FLAGS = SettingFlags(batch="--batch-size", seed="--sample-seed")


class SearchUsageError(ValueError):
    """Bad search options, reported before anything is loaded or written."""


@dataclass(frozen=True)
class SearchSettings:
    """Every resolved, validated setting of one search."""

    mode: str
    run_dir: Path
    pop: int
    gens: int
    seed: int
    space: SearchSpace
    sampling: SamplingSpec
    quality: QualitySpec
    model: ModelRef
    device: str
    latency: str
    table_repeats: int
    cost_table: Optional[Path]
    prompt_source: str
    threads: int
    workers: int
    scheduler: Optional[str]
    w_m: float
    select: str
    min_speedup: Optional[float] = None
    argv: Tuple[str, ...] = ()

    @property
    def uses_dask(self) -> bool:
        return bool(self.workers or self.scheduler)


def _parse_list(text: str, cast: Callable[[str], Any], flag: str) -> Tuple[Any, ...]:
    try:
        values = tuple(cast(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise SearchUsageError(f"{flag} {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise SearchUsageError(f"{flag} is empty; give at least one value, e.g. {flag} "
                               f"{DEFAULT_DEPTH_SPACE if 'depth' in flag else DEFAULT_RATIO_SPACE}")
    if len(set(values)) != len(values):
        raise SearchUsageError(f"{flag} {text!r} repeats a value")
    return values


def _depth_space(text: str) -> Tuple[int, ...]:
    depths = _parse_list(text, int, "--depth-space")
    bad = [d for d in depths if not 0 <= d <= MAX_DEPTH]
    if bad:
        raise SearchUsageError(f"--depth-space has {bad}: cache depths are integers from 0 to {MAX_DEPTH}")
    if len(depths) < 2:
        raise SearchUsageError(f"--depth-space {text!r} has one value: there is nothing to search")
    return depths


def _seed_intervals(text: Optional[str], mode: str) -> Tuple[int, ...]:
    if text is None:
        return UNIFORM_INTERVALS
    if mode == "ratio":
        raise SearchUsageError("--seed-intervals sets the cache-depth seeds of a depth or joint search; --mode ratio "
                               "searches ratios under fixed depths")
    intervals = _parse_list(text, int, "--seed-intervals")
    if min(intervals) < 2:
        raise SearchUsageError(f"--seed-intervals {text!r}: every N must be at least 2 (N = 1 is the all-full "
                               f"strategy, always seeded)")
    return intervals


def _ratio_space(text: str) -> Tuple[float, ...]:
    ratios = _parse_list(text, float, "--ratio-space")
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise SearchUsageError(f"--ratio-space has {bad}: prune ratios are in [0, 1)")
    return ratios


def choose_prompts(path: Optional[str], n: int, seed: int,
                   default: Optional[Tuple[Sequence[str], str]] = None) -> Tuple[Tuple[str, ...], str]:
    """Draw ``n`` prompts from the file with ``random.Random(seed)``; without a file, from `default` (prompts,
    where they come from: the quality objective's own prompt list), else the shipped ImageNet class prompts.

    Returns: (prompts, where they came from).
    """
    if path is None and default is not None:
        lines, source = list(default[0]), default[1]
    else:
        source = str(IMAGENET_PROMPTS if path is None else path)
        try:
            lines = read_prompts(source)
        except (OSError, ValueError) as err:
            raise SearchUsageError(f"--prompts: {err}") from None
    if n > len(lines):
        raise SearchUsageError(f"--n-prompts {n} is more than the {len(lines)} prompts of {source}")
    picked = random.Random(seed).sample(range(len(lines)), n)
    return tuple(lines[i] for i in picked), source


def _check_search(opt: argparse.Namespace) -> None:
    if opt.mode not in MODES:
        raise SearchUsageError(f"--mode must be one of {', '.join(MODES)}, got {opt.mode!r}")
    if opt.pop < 2:
        raise SearchUsageError(f"--pop must be at least 2 (NSGA-II mates pairs of parents), got {opt.pop}")
    if opt.gens < 1:
        raise SearchUsageError(f"--gens must be at least 1 (the first generation is the initial population), "
                               f"got {opt.gens}")
    if opt.latency not in LATENCIES:
        raise SearchUsageError(f"unknown latency objective {opt.latency!r}; expected one of {', '.join(LATENCIES)}")
    if opt.select not in SELECTS:
        raise SearchUsageError(f"--select must be one of {', '.join(SELECTS)}, got {opt.select!r}")
    if not math.isfinite(opt.w_m) or opt.w_m < 0:
        raise SearchUsageError(f"--w_M must be a finite number >= 0, got {opt.w_m}")
    if opt.min_speedup is not None:
        if not math.isfinite(opt.min_speedup) or opt.min_speedup <= 1:
            raise SearchUsageError(f"--min-speedup must be a number above 1 (times faster than the full model), got "
                                   f"{opt.min_speedup}")
        if opt.latency != "table":
            raise SearchUsageError("--min-speedup needs --latency table: the speed-up is predicted from the cost table")
    if opt.prune_ratio is not None and opt.mode != "depth":
        raise SearchUsageError(f"--prune_ratio fixes the ratio of a depth search; --mode {opt.mode} searches ratios "
                               f"(see --ratio-space)")
    if opt.cache_strategy is not None and opt.mode != "ratio":
        raise SearchUsageError(f"--cache_strategy fixes the depths of a ratio search; --mode {opt.mode} searches "
                               f"depths (see --depth-space)")


def _fixed_depths(opt: argparse.Namespace, steps: int) -> Optional[Tuple[int, ...]]:
    """Ratio mode: the cache depths of --cache_strategy (default the shipped b1)."""
    if opt.mode != "ratio":
        return None
    try:
        path = find_strategy(opt.cache_strategy) if opt.cache_strategy else DEFAULT_STRATEGY
    except StrategyError as err:
        raise SearchUsageError(f"--cache_strategy: {err}") from None
    cache = Strategy.load(path)
    if cache.steps != steps:
        raise SearchUsageError(
            f"--cache_strategy {path} has {cache.steps} steps but --steps {opt.steps} runs {steps}; pass a "
            f"{steps}-step --cache_strategy (e.g. a scripts/search_depth.py result) or --steps {cache.steps}.")
    return tuple(cache.cache_depth)


def _space(opt: argparse.Namespace, steps: int) -> SearchSpace:
    depths = _depth_space(opt.depth_space) if opt.mode != "ratio" else _depth_space(DEFAULT_DEPTH_SPACE)
    ratios = _ratio_space(opt.ratio_space)
    fixed_ratio = 0.0 if opt.prune_ratio is None else opt.prune_ratio
    if not 0.0 <= fixed_ratio < 1.0:
        raise SearchUsageError(f"--prune_ratio must be in [0, 1), got {fixed_ratio}")
    fixed_depths = _fixed_depths(opt, steps)
    if steps < 2 and opt.mode != "ratio":
        raise SearchUsageError(f"a depth search needs at least 2 sampler steps (step 0 always computes everything); "
                               f"--steps {opt.steps} runs {steps}")
    space = SearchSpace(opt.mode, steps, depths, ratios, fixed_ratio, fixed_depths,
                        _seed_intervals(opt.seed_intervals, opt.mode))
    if space.size < opt.pop:
        raise SearchUsageError(f"the search space holds only {space.size} strategies, fewer than --pop {opt.pop}; "
                               f"lower --pop or search more steps")
    return space


def _check_execution(opt: argparse.Namespace) -> None:
    for flag, value in (("--n-prompts", opt.n_prompts), ("--batch-size", opt.batch_size),
                        ("--table-repeats", opt.table_repeats), ("--threads", opt.threads)):
        if value < 1:
            raise SearchUsageError(f"{flag} must be at least 1, got {value}")
    if opt.workers < 0:
        raise SearchUsageError(f"--workers must be 0 (serial) or more, got {opt.workers}")
    if opt.workers and opt.scheduler:
        raise SearchUsageError("give --workers (start a local Dask cluster) or --scheduler (join one), not both")
    if (opt.workers or opt.scheduler) and importlib.util.find_spec("distributed") is None:
        raise SearchUsageError("--workers / --scheduler need Dask: pip install 'dask[distributed]' "
                               "(or pip install -e '.[search]')")


def resolve_settings(opt: argparse.Namespace, argv: Sequence[str] = ()) -> SearchSettings:
    """Check every option and build the settings; raises SearchUsageError, ObjectiveError, UsageError or
    CheckpointError. Loads no model and writes nothing."""
    _check_search(opt)
    device = pick_device(opt.device)
    model = ModelRef(opt.config, opt.ckpt, opt.ema, opt.demo)
    model.check()
    height = opt.H if opt.H is not None else model.geometry().default_size
    width = opt.W if opt.W is not None else model.geometry().default_size
    try:
        run = RunSettings.resolve(flags=FLAGS, sampler=opt.sampler, steps=opt.steps, scale=float(opt.scale),
                                  precision=opt.precision, height=height, width=width,
                                  batch=min(opt.batch_size, opt.n_prompts), seed=opt.sample_seed,
                                  seed_count=opt.n_prompts, device=str(device), geometry=model.geometry())
    except UsageError as err:
        raise SearchUsageError(str(err)) from None
    space = _space(opt, run.sampler_steps)
    _check_execution(opt)
    quality = QualitySpec(kind=opt.quality, fidelity_space=opt.fidelity_space, fid_ref=opt.fid_ref,
                          inception_weights=opt.inception_weights,
                          random_inception_seed=opt.random_inception_for_tests, clip_arch=opt.clip_arch,
                          clip_weights=opt.clip_weights, imagereward_weights=opt.imagereward_weights,
                          imagereward_med_config=opt.imagereward_med_config)
    quality.check(opt.n_prompts)
    prompts, prompt_source = choose_prompts(opt.prompts, opt.n_prompts, opt.prompt_seed,
                                            quality.objective.default_prompts())
    quality.objective.check_prompts(prompts)
    sampling = SamplingSpec(prompts=prompts, seeds=tuple(opt.sample_seed + k for k in range(opt.n_prompts)), run=run)

    run_dir = Path(opt.run_dir) if opt.run_dir else Path("outputs") / f"search-{opt.mode}"
    check_output_dir(run_dir, "--run-dir")
    cost_table = Path(opt.cost_table) if opt.cost_table else None
    if cost_table is not None:
        try:
            check_cost_table(cost_table)
        except UsageError as err:
            raise SearchUsageError(str(err)) from None
    return SearchSettings(mode=opt.mode, run_dir=run_dir, pop=opt.pop, gens=opt.gens, seed=opt.seed, space=space,
                          sampling=sampling, quality=quality, model=model, device=device.type, latency=opt.latency,
                          table_repeats=opt.table_repeats, cost_table=cost_table, prompt_source=prompt_source,
                          threads=opt.threads, workers=opt.workers, scheduler=opt.scheduler, w_m=opt.w_m,
                          select=opt.select, min_speedup=opt.min_speedup, argv=tuple(argv))
