"""NSGA-II search of a per-step DaTo strategy (spec 8): cache depths, prune ratios, or both.

    python scripts/search_depth.py --demo --H 64 --W 64 --steps 5 --n-prompts 2 --pop 8 --gens 5
    python scripts/search_ratio.py --ckpt sd-v1-5.safetensors --quality fid --fid-ref imagenet-ref.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --n-prompts 500

Modes (``--mode``; each script sets its own default):

- ``depth``: one cache depth per step from ``--depth-space`` (default {0, 1, 12}); pruning off, or a fixed
  ``--prune_ratio`` at every step.
- ``ratio``: one prune ratio per step from ``--ratio-space`` (default {0.3, ..., 0.7}) under the fixed cache
  depths of ``--cache_strategy`` (default ``configs/dato/b1.yaml``).
- ``joint``: both at once.

The decision variables are indices into the search spaces: depth variables for steps 1..S-1 (step 0 always
computes everything, spec 2, so its depth is fixed to 12), ratio variables for every step that runs (a step
at depth 0 reuses everything and does not prune, so its ratio is fixed to 0). Decoding always gives this
canonical strategy, so two index vectors that run the same computation share one evaluation.

The search is pymoo's NSGA-II with the paper's settings: population 20, 100 generations, integer sampling
seeded with uniform strategies (all-full, then DeepCache "every N-th step full" for N = 2..5 at each
partial depth, 1 first; constant ratios for ratio search), SBX (probability 0.7, eta 7) and polynomial
mutation (probability 0.4, eta 15) on real values with rounding repair, duplicates eliminated.

Objectives (both minimised):

- quality, ``--quality``: see ``datosd.search_objectives`` (default ``fidelity``, the relative RMS error in
  percent of the final latents against the unaccelerated run of the same prompts and seeds);
- latency in seconds per image, ``--latency``: ``table`` (default) predicts it from the per-step cost table
  (``datosd.costs``; measured once, stored in ``RUN_DIR/costs.json``, deterministic, no extra UNet calls),
  ``measured`` takes the wall clock of the candidate's sampler loop.

Choosing one strategy from the front (spec 8): the point minimising ``quality + w_M * latency``, where with
``--select raw`` (default) quality is in its own units and latency in milliseconds per image (the scale on
which the paper's w_M range, 0.025 = quality first to 0.16 = speed first, trades a few FID points against
hundreds of milliseconds), and with ``--select normalized`` both objectives are first scaled to [0, 1] over
the front. The fidelity objective is in percent so that the raw weighting stays meaningful for it too.

Resuming: every evaluated strategy is a row of ``RUN_DIR/evals.sqlite``, committed as soon as it is done and
keyed by a SHA-256 of (canonical strategy, objective settings, model identity, prompts, seeds, sampler
settings, device). The algorithm is re-run from its seed with pymoo's ask/tell interface and every candidate
already stored is served from the file, so restarting the same command replays the finished generations
without computing anything and continues where it stopped (a raised ``--gens`` extends a finished search).
Counts of evaluations performed and served from the store are logged, kept per run in the ``invocations``
table and per candidate in the ``asks`` table.

Scale-out: ``--workers N`` starts a Dask ``LocalCluster`` (N processes, 1 thread each), ``--scheduler
ADDRESS`` joins a running cluster. Each worker builds its model once, in a worker plugin
(``SearchWorkerPlugin``), and evaluates the generation's new strategies in parallel. Evaluation is
deterministic (per-image seeds, fixed batches, fixed torch thread count ``--threads``), and the cost-table
latency is computed in the main process, so the front equals a serial run's. (``--latency measured`` is a wall
clock: it varies from run to run and with the load of the workers sharing a device. It is stored with each
evaluation, so a resumed search reuses it.)

Outputs in ``RUN_DIR``: ``front.json`` (the Pareto front over every candidate of the search, each point with
its strategy, quality and latency, and the chosen point), ``front.png`` (quality vs latency, every evaluated
point faint, the front highlighted, the chosen point starred), ``best.yaml`` (a strategy for
``scripts/txt2img.py --dato --strategy``), ``progress.json``, ``search.json`` and ``search.log``; all are
rewritten after every generation.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ldm.checkpoint import CheckpointError
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.runtime import REPO_ROOT, UsageError, autocast_dtype, latent_shape, pick_device

from .costs import CostTable, entry_name, find_table, load_tables, measure_table, table_key
from .search_front import Point, choose, finite, pareto_front, plot_front, point_dict, selection_scores, write_atomic
from .search_objectives import (
    QUALITIES,
    QUALITY_AXIS,
    EvalResult,
    ModelSpec,
    ObjectiveError,
    QualitySpec,
    SamplingSpec,
    StrategyEvaluator,
)
from .search_space import SearchSpace
from .search_store import EvalStore, StoredEval, now, sampling_context, search_context, sha256_json
from .strategy import MAX_DEPTH, Strategy, StrategyError
from .utils import find_unet

try:  # the worker plugin must subclass Dask's, when Dask is installed (the `search` extra)
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - serial searches do not need Dask
    _WorkerPluginBase = object

__all__ = [
    "MODES",
    "LATENCIES",
    "Point",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "SearchUsageError",
    "EvalStore",
    "SearchWorkerPlugin",
    "build_parser",
    "choose",
    "main",
    "pareto_front",
    "resolve_settings",
    "run_search",
]

MODES = ("depth", "ratio", "joint")
LATENCIES = ("table", "measured")
SELECTS = ("raw", "normalized")
DEFAULT_DEPTH_SPACE = "0,1,12"  # spec 1
DEFAULT_RATIO_SPACE = "0.3,0.4,0.5,0.6,0.7"  # spec 1
DEFAULT_PROMPTS = REPO_ROOT / "data" / "imagenet-class-prompts.txt"
DEFAULT_CACHE_STRATEGY = REPO_ROOT / "configs" / "dato" / "b1.yaml"
BUILTIN_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a painting of a fox sitting in a field at sunrise",
    "a golden retriever playing in the snow",
    "a bowl of ramen on a wooden table, studio lighting",
    "a red sports car on a mountain road",
    "a lighthouse on a cliff during a storm",
    "a watercolor of a city street in the rain",
    "a close-up photo of a hummingbird drinking from a flower",
)

# NSGA-II operators (spec 8)
SBX_PROB, SBX_ETA = 0.7, 7.0
PM_PROB, PM_ETA = 0.4, 15.0


class SearchUsageError(ValueError):
    """Bad search options, reported before anything is loaded or written."""


# --- command line -------------------------------------------------------------------------------------


DESCRIPTIONS = {
    "depth": "Search a per-step cache depth (pruning off, or a fixed --prune_ratio) with NSGA-II.",
    "ratio": "Search a per-step prune ratio under a fixed cache strategy (--cache_strategy) with NSGA-II.",
    "joint": "Search per-step cache depths and prune ratios together with NSGA-II.",
}


def build_parser(mode: str = "depth") -> argparse.ArgumentParser:
    """The search command line shared by scripts/search_depth.py, search_ratio.py and search_joint.py."""
    parser = argparse.ArgumentParser(description=DESCRIPTIONS[mode] + "\n\n" + __doc__.split("\n\n", 2)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    search = parser.add_argument_group("search")
    search.add_argument("--mode", default=mode, help=f"what is searched: {', '.join(MODES)} (default {mode})")
    search.add_argument("--run-dir", "--run_dir", default=None,
                        help="where results go; restarting with the same directory resumes (default "
                             "outputs/search-MODE)")
    search.add_argument("--pop", type=int, default=20, help="NSGA-II population size (paper: 20)")
    search.add_argument("--gens", type=int, default=100, help="generations, the first one included (paper: 100)")
    search.add_argument("--seed", type=int, default=0, help="seed of the search algorithm")
    search.add_argument("--depth-space", "--depth_space", default=DEFAULT_DEPTH_SPACE,
                        help=f"cache depths to choose from, comma-separated (default {DEFAULT_DEPTH_SPACE})")
    search.add_argument("--ratio-space", "--ratio_space", default=DEFAULT_RATIO_SPACE,
                        help=f"prune ratios to choose from, comma-separated (default {DEFAULT_RATIO_SPACE})")
    search.add_argument("--prune_ratio", type=float, default=None,
                        help="depth mode: the prune ratio of every step (default 0, pruning off)")
    search.add_argument("--cache_strategy", default=None,
                        help=f"ratio mode: strategy YAML whose cache depths are kept (default "
                             f"{DEFAULT_CACHE_STRATEGY.relative_to(REPO_ROOT)})")

    sampling = parser.add_argument_group("sampling (the same for every candidate)")
    sampling.add_argument("--steps", type=int, default=50, help="sampler steps S (CompVis --ddim_steps; paper: 50)")
    sampling.add_argument("--sampler", choices=["plms", "ddim"], default="plms", help="sampler (eta 0)")
    sampling.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    sampling.add_argument("--H", type=int, default=None, help="image height in pixels (default 512; 128 with --demo)")
    sampling.add_argument("--W", type=int, default=None, help="image width in pixels (default 512; 128 with --demo)")
    sampling.add_argument("--n-prompts", "--n_prompts", type=int, default=100,
                          help="images per candidate, one per prompt (the paper's FID uses 500)")
    sampling.add_argument("--prompts", default=None,
                          help="prompt file, one per line (default data/imagenet-class-prompts.txt if it exists, "
                               "else a small built-in list)")
    sampling.add_argument("--prompt-seed", "--prompt_seed", type=int, default=0,
                          help="seed of the draw of --n-prompts prompts from the file")
    sampling.add_argument("--sample-seed", "--sample_seed", type=int, default=42,
                          help="image k starts from the noise of seed SAMPLE_SEED + k")
    sampling.add_argument("--batch-size", "--batch_size", type=int, default=4, help="images per sampler call")
    sampling.add_argument("--precision", choices=["full", "autocast"], default="autocast",
                          help="autocast = float16 on CUDA, bfloat16 on CPU; full = float32")

    objectives = parser.add_argument_group("objectives")
    objectives.add_argument("--quality", default="fidelity",
                            help=f"quality objective: {', '.join(QUALITIES)} (default fidelity, needs no weights)")
    objectives.add_argument("--fidelity-space", "--fidelity_space", default="latent",
                            help="fidelity: compare final latents ('latent', default) or decoded images ('image')")
    objectives.add_argument("--fid-ref", "--fid_ref", default=None, help="fid: reference statistics .npz (mu, sigma)")
    objectives.add_argument("--inception-weights", "--inception_weights", default=None,
                            help="fid: pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    objectives.add_argument("--random-inception-for-tests", "--random_inception_for_tests", type=int, default=None,
                            help=argparse.SUPPRESS)
    objectives.add_argument("--clip-arch", "--clip_arch", default="ViT-g-14", help="clip: open_clip architecture")
    objectives.add_argument("--clip-weights", "--clip_weights", default=None, help="clip: open_clip checkpoint file")
    objectives.add_argument("--imagereward-weights", "--imagereward_weights", default=None,
                            help="imagereward: ImageReward.pt")
    objectives.add_argument("--imagereward-med-config", "--imagereward_med_config", default=None,
                            help="imagereward: med_config.json")
    objectives.add_argument("--latency", default="table",
                            help="latency objective: 'table' (per-step cost table, default) or 'measured' "
                                 "(wall clock of each candidate's sampling)")
    objectives.add_argument("--table-repeats", "--table_repeats", type=int, default=3,
                            help="passes when measuring the cost table (median)")
    objectives.add_argument("--cost-table", "--cost_table", default=None,
                            help="a shared cost-table JSON to read first (and to add a new table to); the table "
                                 "used is always copied to RUN_DIR/costs.json")
    objectives.add_argument("--w_M", "--w-M", "--w_m", dest="w_m", type=float, default=0.025,
                            help="choose the front point minimising quality + w_M * latency (paper: 0.025 quality "
                                 "first .. 0.16 speed first)")
    objectives.add_argument("--select", default="raw",
                            help="'raw': quality in its units, latency in ms per image (default); "
                                 "'normalized': both scaled to [0, 1] over the front")

    model = parser.add_argument_group("model")
    model.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", help="model config")
    model.add_argument("--ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt", help="checkpoint file")
    model.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    model.add_argument("--demo", action="store_true", help="the built-in tiny model with seeded random weights")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to sample")

    execution = parser.add_argument_group("execution")
    execution.add_argument("--workers", type=int, default=0,
                           help="evaluate on a Dask LocalCluster of this many processes (0: serial, in this process)")
    execution.add_argument("--scheduler", default=None, help="evaluate on the Dask cluster at this address")
    execution.add_argument("--threads", type=int, default=1,
                           help="torch CPU threads per evaluating process (fixed, so results do not depend on it)")
    return parser


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
    model: ModelSpec
    latency: str
    table_repeats: int
    cost_table: Optional[Path]
    prompt_source: str
    threads: int
    workers: int
    scheduler: Optional[str]
    w_m: float
    select: str
    argv: Tuple[str, ...] = ()


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


def _ratio_space(text: str) -> Tuple[float, ...]:
    ratios = _parse_list(text, float, "--ratio-space")
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise SearchUsageError(f"--ratio-space has {bad}: prune ratios are in [0, 1)")
    return ratios


def choose_prompts(path: Optional[str], n: int, seed: int) -> Tuple[Tuple[str, ...], str]:
    """Draw ``n`` prompts from the file (or the built-in list) with ``random.Random(seed)``.

    Returns: (prompts, where they came from).
    """
    from sdeval.prompts import read_prompts

    if path is None and DEFAULT_PROMPTS.is_file():
        path = str(DEFAULT_PROMPTS)
    if path is None:
        lines, source = list(BUILTIN_PROMPTS), "built-in list"
    else:
        try:
            lines, source = read_prompts(path), str(path)
        except (OSError, ValueError) as err:
            raise SearchUsageError(f"--prompts: {err}") from None
    if n > len(lines):
        raise SearchUsageError(f"--n-prompts {n} is more than the {len(lines)} prompts of {source}")
    picked = random.Random(seed).sample(range(len(lines)), n)
    return tuple(lines[i] for i in picked), source


def resolve_settings(opt: argparse.Namespace, argv: Sequence[str] = ()) -> SearchSettings:
    """Check every option and build the settings; raises SearchUsageError / ObjectiveError. Writes nothing."""
    if opt.mode not in MODES:
        raise SearchUsageError(f"--mode must be one of {', '.join(MODES)}, got {opt.mode!r}")
    if opt.pop < 2:
        raise SearchUsageError(f"--pop must be at least 2 (NSGA-II mates pairs of parents), got {opt.pop}")
    if opt.gens < 1:
        raise SearchUsageError(f"--gens must be at least 1 (the first generation is the initial population), "
                               f"got {opt.gens}")
    if not 1 <= opt.steps <= 1000:
        raise SearchUsageError(f"--steps must be between 1 and 1000, got {opt.steps}")
    steps = len(make_ddim_timesteps("uniform", opt.steps, 1000, verbose=False))
    if opt.latency not in LATENCIES:
        raise SearchUsageError(f"unknown latency objective {opt.latency!r}; expected one of {', '.join(LATENCIES)}")
    if opt.select not in SELECTS:
        raise SearchUsageError(f"--select must be one of {', '.join(SELECTS)}, got {opt.select!r}")
    if not math.isfinite(opt.w_m) or opt.w_m < 0:
        raise SearchUsageError(f"--w_M must be a finite number >= 0, got {opt.w_m}")

    depths = _depth_space(opt.depth_space) if opt.mode != "ratio" else _depth_space(DEFAULT_DEPTH_SPACE)
    ratios = _ratio_space(opt.ratio_space)
    if opt.prune_ratio is not None and opt.mode != "depth":
        raise SearchUsageError(f"--prune_ratio fixes the ratio of a depth search; --mode {opt.mode} searches ratios "
                               f"(see --ratio-space)")
    if opt.cache_strategy is not None and opt.mode != "ratio":
        raise SearchUsageError(f"--cache_strategy fixes the depths of a ratio search; --mode {opt.mode} searches "
                               f"depths (see --depth-space)")
    fixed_ratio = 0.0 if opt.prune_ratio is None else opt.prune_ratio
    if not 0.0 <= fixed_ratio < 1.0:
        raise SearchUsageError(f"--prune_ratio must be in [0, 1), got {fixed_ratio}")
    fixed_depths = None
    if opt.mode == "ratio":
        path = Path(opt.cache_strategy) if opt.cache_strategy else DEFAULT_CACHE_STRATEGY
        if not path.is_file():
            raise SearchUsageError(f"--cache_strategy file not found: {path}")
        cache = Strategy.load(path)
        if cache.steps != steps:
            raise SearchUsageError(
                f"--cache_strategy {path} has {cache.steps} steps but --steps {opt.steps} runs {steps}; pass a "
                f"{steps}-step --cache_strategy (e.g. a scripts/search_depth.py result) or --steps {cache.steps}.")
        fixed_depths = tuple(cache.cache_depth)
    if steps < 2 and opt.mode != "ratio":
        raise SearchUsageError(f"a depth search needs at least 2 sampler steps (step 0 always computes everything); "
                               f"--steps {opt.steps} runs {steps}")
    space = SearchSpace(opt.mode, steps, depths, ratios, fixed_ratio, fixed_depths)
    if space.size < opt.pop:
        raise SearchUsageError(f"the search space holds only {space.size} strategies, fewer than --pop {opt.pop}; "
                               f"lower --pop or search more steps")

    if not math.isfinite(opt.scale):
        raise SearchUsageError(f"--scale must be a finite number, got {opt.scale}")
    height = opt.H if opt.H is not None else (128 if opt.demo else 512)
    width = opt.W if opt.W is not None else (128 if opt.demo else 512)
    try:
        latent_shape(None, height, width)
        device = pick_device(opt.device)
    except UsageError as err:
        raise SearchUsageError(str(err)) from None
    if opt.n_prompts < 1:
        raise SearchUsageError(f"--n-prompts must be at least 1, got {opt.n_prompts}")
    if opt.batch_size < 1:
        raise SearchUsageError(f"--batch-size must be at least 1, got {opt.batch_size}")
    if opt.table_repeats < 1:
        raise SearchUsageError(f"--table-repeats must be at least 1, got {opt.table_repeats}")
    if opt.threads < 1:
        raise SearchUsageError(f"--threads must be at least 1, got {opt.threads}")
    if opt.workers < 0:
        raise SearchUsageError(f"--workers must be 0 (serial) or more, got {opt.workers}")
    if opt.workers and opt.scheduler:
        raise SearchUsageError("give --workers (start a local Dask cluster) or --scheduler (join one), not both")
    if (opt.workers or opt.scheduler) and _WorkerPluginBase is object:
        raise SearchUsageError("--workers / --scheduler need Dask: pip install 'dask[distributed]' "
                               "(or pip install -e '.[search]')")
    prompts, prompt_source = choose_prompts(opt.prompts, opt.n_prompts, opt.prompt_seed)
    sampling = SamplingSpec(prompts=prompts, seeds=tuple(opt.sample_seed + k for k in range(opt.n_prompts)),
                            steps=opt.steps, sampler=opt.sampler, scale=float(opt.scale), height=height, width=width,
                            batch_size=min(opt.batch_size, opt.n_prompts), precision=opt.precision)

    quality = QualitySpec(kind=opt.quality, fidelity_space=opt.fidelity_space, fid_ref=opt.fid_ref,
                          inception_weights=opt.inception_weights,
                          random_inception_seed=opt.random_inception_for_tests, clip_arch=opt.clip_arch,
                          clip_weights=opt.clip_weights, imagereward_weights=opt.imagereward_weights,
                          imagereward_med_config=opt.imagereward_med_config)
    quality.check(opt.n_prompts)
    model = ModelSpec(demo=opt.demo, config=opt.config, ckpt=opt.ckpt, ema=opt.ema, device=device.type)
    model.check()

    run_dir = Path(opt.run_dir) if opt.run_dir else Path("outputs") / f"search-{opt.mode}"
    if run_dir.exists() and not run_dir.is_dir():
        raise SearchUsageError(f"--run-dir {run_dir} is a file, not a directory")
    cost_table = Path(opt.cost_table) if opt.cost_table else None
    if cost_table is not None and cost_table.exists():
        try:
            load_tables(cost_table)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SearchUsageError(f"--cost-table {cost_table} is not a cost-table JSON file ({err})") from None
    return SearchSettings(mode=opt.mode, run_dir=run_dir, pop=opt.pop, gens=opt.gens, seed=opt.seed, space=space,
                          sampling=sampling, quality=quality, model=model, latency=opt.latency,
                          table_repeats=opt.table_repeats, cost_table=cost_table, prompt_source=prompt_source,
                          threads=opt.threads, workers=opt.workers, scheduler=opt.scheduler, w_m=opt.w_m,
                          select=opt.select, argv=tuple(argv))


# --- latency: the cost table --------------------------------------------------------------------------


def load_or_measure_table(settings: SearchSettings, model: torch.nn.Module, log: Callable[[str], None]) -> CostTable:
    """The cost table of this model, latent size, batch, device and precision.

    Looked up in ``--cost-table`` and then ``RUN_DIR/costs.json`` by ``costs.table_key``; measured with
    ``costs.measure_table`` when none has every entry the search needs. The table used is stored in
    ``RUN_DIR/costs.json`` (and added to ``--cost-table``), so a restarted search predicts the same latencies.
    """
    unet = find_unet(model)
    spec = settings.sampling
    _, h, w = latent_shape(model, spec.height, spec.width)
    device = next(unet.parameters()).device
    dtype = "float32" if spec.precision == "full" else str(autocast_dtype(device)).replace("torch.", "")
    key = table_key(unet, h, w, spec.batch_size, device, dtype)
    entries = settings.space.table_entries()
    needed = {entry_name(d, r) for d, r in entries}
    run_path = settings.run_dir / "costs.json"
    for path in (settings.cost_table, run_path):
        if path is None or not path.exists():
            continue
        table = find_table(path, key)
        if table is not None and needed <= set(table.seconds):
            log(f"cost table: {path} ({len(table.seconds)} entries)")
            if path != run_path:
                table.save(run_path)
            return table
    log(f"cost table: measuring {len(entries)} entries x {settings.table_repeats} passes "
        f"(latent {h}x{w}, batch {spec.batch_size}, {device.type}, {dtype})")
    table = measure_table(model, h, w, spec.batch_size, entries, repeats=settings.table_repeats,
                          precision="float32" if spec.precision == "full" else "autocast")
    table.save(run_path)
    if settings.cost_table is not None:
        table.save(settings.cost_table)
    return table


# --- evaluation backends ------------------------------------------------------------------------------


@dataclass
class EvaluatorRecipe:
    """Everything a process needs to build a StrategyEvaluator (small enough to send to Dask workers)."""

    model: ModelSpec
    sampling: SamplingSpec
    quality: QualitySpec
    reference: Optional[torch.Tensor]
    threads: int
    measure_latency: bool

    def build(self) -> StrategyEvaluator:
        return StrategyEvaluator.build(self.model, self.sampling, self.quality, reference=self.reference,
                                       threads=self.threads)


class SearchWorkerPlugin(_WorkerPluginBase):  # type: ignore[misc, valid-type]
    """Dask worker plugin holding the worker's StrategyEvaluator: built on its first task, then reused.

    The evaluator (model, conditioning, scoring networks) lives on this plugin instance, i.e. in the worker's
    ``plugins`` mapping, not in a module-level cache.
    """

    def __init__(self, recipe: EvaluatorRecipe) -> None:
        self.recipe = recipe
        self.evaluator: Optional[StrategyEvaluator] = None

    def setup(self, worker: Any) -> None:
        torch.set_num_threads(self.recipe.threads)
        self.evaluator = None

    def teardown(self, worker: Any) -> None:
        self.evaluator = None

    def get_evaluator(self) -> StrategyEvaluator:
        if self.evaluator is None:
            self.evaluator = self.recipe.build()
        return self.evaluator


def evaluate_on_worker(plugin_name: str, strategy: Dict[str, Any]) -> EvalResult:
    """Dask task: evaluate one strategy with the worker's own evaluator (see SearchWorkerPlugin)."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins[plugin_name]
    result = plugin.get_evaluator().evaluate(Strategy.from_dict(strategy), plugin.recipe.measure_latency)
    result.worker = str(worker.address)
    return result


class SerialBackend:
    """Evaluates in this process, one strategy after another."""

    def __init__(self, evaluator: StrategyEvaluator, measure_latency: bool) -> None:
        self.evaluator = evaluator
        self.measure_latency = measure_latency

    def evaluate(self, jobs: Sequence[Tuple[str, Strategy]]) -> Iterator[Tuple[str, EvalResult]]:
        for key, strategy in jobs:
            yield key, self.evaluator.evaluate(strategy, self.measure_latency)

    def close(self) -> None:
        pass


class DaskBackend:
    """Evaluates a generation's strategies in parallel on a Dask cluster (local or joined)."""

    def __init__(self, recipe: EvaluatorRecipe, workers: int, scheduler: Optional[str], plugin_name: str,
                 log: Callable[[str], None]) -> None:
        from distributed import Client, LocalCluster

        self.plugin_name = plugin_name
        self.cluster = None
        if scheduler:
            log(f"dask: joining the cluster at {scheduler}")
            self.client = Client(scheduler)
        else:
            log(f"dask: starting a local cluster of {workers} worker processes, 1 thread each")
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
        self.client.register_plugin(SearchWorkerPlugin(recipe), name=plugin_name)

    def evaluate(self, jobs: Sequence[Tuple[str, Strategy]]) -> Iterator[Tuple[str, EvalResult]]:
        from distributed import as_completed

        futures = {self.client.submit(evaluate_on_worker, self.plugin_name, strategy.to_dict(),
                                      key=f"dato-eval-{key}", pure=False): key
                   for key, strategy in jobs}
        for future in as_completed(list(futures)):
            yield futures[future], future.result()
            future.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# --- outputs ------------------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    run_dir: Path
    front: List[Point]
    best: Point
    points: List[Point]
    generations: int
    evaluated: int
    cached: int
    stored: int


class _RunLog:
    """Log lines to stdout (above the progress bars) and to RUN_DIR/search.log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{now()} {message}\n")


# --- the search ---------------------------------------------------------------------------------------


def _algorithm(space: SearchSpace, pop: int, seed: int):
    """pymoo NSGA-II with the paper's operators, its first population seeded with uniform strategies."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    problem = Problem(n_var=space.n_var, n_obj=2, xl=np.zeros(space.n_var, dtype=int), xu=space.upper, vtype=int)
    rows = space.seed_rows()[:pop]
    seen = set(rows)
    rng = np.random.default_rng(seed)
    sampler = IntegerRandomSampling()
    for _ in range(1000):
        if len(rows) >= pop:
            break
        for x in sampler.do(problem, pop, random_state=rng).get("X"):
            row = tuple(int(v) for v in x)
            if row not in seen and len(rows) < pop:
                seen.add(row)
                rows.append(row)
    if len(rows) < pop:
        raise SearchUsageError(f"could not draw {pop} distinct strategies from the search space; lower --pop")
    algorithm = NSGA2(pop_size=pop, sampling=np.array(rows, dtype=int),
                      crossover=SBX(prob=SBX_PROB, eta=SBX_ETA, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=PM_PROB, eta=PM_ETA, vtype=float, repair=RoundingRepair()),
                      eliminate_duplicates=True)
    return problem, algorithm


def _load_reference(settings: SearchSettings, evaluator: StrategyEvaluator, log: Callable[[str], None]) -> torch.Tensor:
    """The unaccelerated final latents of the prompt set, computed once and kept in RUN_DIR."""
    digest = sha256_json(sampling_context(settings))
    path = settings.run_dir / f"reference-{digest[:16]}.pt"
    if path.exists():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("context") == digest:
            log(f"reference: {path.name} (unaccelerated latents of {data['latents'].shape[0]} images)")
            return data["latents"]
    log(f"reference: sampling {settings.sampling.n_images} images with the unaccelerated model")
    latents, _ = evaluator.sample(None)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"context": digest, "latents": latents}, tmp)
    os.replace(tmp, path)
    return latents


def _settings_record(settings: SearchSettings, context_hash: str) -> Dict[str, Any]:
    space = settings.space
    return {
        "mode": settings.mode, "pop": settings.pop, "gens": settings.gens, "seed": settings.seed,
        "space": {"steps": space.steps, "depths": list(space.depths), "ratios": list(space.ratios),
                  "fixed_ratio": space.fixed_ratio,
                  "fixed_depths": list(space.fixed_depths) if space.fixed_depths else None,
                  "n_var": space.n_var},
        "operators": {"sbx": {"prob": SBX_PROB, "eta": SBX_ETA}, "pm": {"prob": PM_PROB, "eta": PM_ETA},
                      "repair": "rounding", "eliminate_duplicates": True},
        "sampling": settings.sampling.identity(), "prompt_source": settings.prompt_source,
        "quality": {**settings.quality.identity(), "units": settings.quality.units},
        "latency": settings.latency, "w_M": settings.w_m, "select": settings.select,
        "model": settings.model.identity(), "device": settings.model.device, "threads": settings.threads,
        "workers": settings.workers, "scheduler": settings.scheduler, "context": context_hash,
        "argv": list(settings.argv),
    }


def run_search(settings: SearchSettings, model: torch.nn.Module) -> SearchOutcome:
    """Run (or resume) the search described by ``settings`` with ``model`` (built from ``settings.model``).

    Creates ``settings.run_dir``; see the module docstring for what it holds.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    log = _RunLog(settings.run_dir / "search.log")
    store = EvalStore(settings.run_dir / "evals.sqlite", search_context(settings))
    backend: Any = None
    try:
        write_atomic(settings.run_dir / "search.json",
                      json.dumps(_settings_record(settings, store.context_hash), indent=1))
        invocation = store.start_invocation(settings.argv)
        stored_before = store.count()
        log(f"search {settings.run_dir} (run {invocation}): {settings.space.describe()}; population "
            f"{settings.pop}, {settings.gens} generations, seed {settings.seed}; quality {settings.quality.kind}, "
            f"latency {settings.latency}; {settings.sampling.n_images} images from {settings.prompt_source}")
        if stored_before:
            log(f"resuming: {stored_before} evaluations of this search are stored in evals.sqlite and will not "
                f"be computed again")
        measured = settings.latency == "measured"
        table = load_or_measure_table(settings, model, log) if not measured else None
        evaluator = StrategyEvaluator(model, settings.sampling, settings.quality, threads=settings.threads)
        if settings.quality.kind == "fidelity":
            evaluator.reference = _load_reference(settings, evaluator, log)
        if settings.workers or settings.scheduler:
            recipe = EvaluatorRecipe(settings.model, settings.sampling, settings.quality, evaluator.reference,
                                     settings.threads, measured)
            backend = DaskBackend(recipe, settings.workers, settings.scheduler,
                                  f"dato-search-{store.context_hash[:16]}", log)
        else:
            backend = SerialBackend(evaluator, measured)
        return _search_loop(settings, store, backend, table, invocation, log)
    finally:
        if backend is not None:
            backend.close()
        store.close()
        torch.set_num_threads(previous_threads)


def _search_loop(settings: SearchSettings, store: EvalStore, backend: Any, table: Optional[CostTable],
                 invocation: int, log: Callable[[str], None]) -> SearchOutcome:
    from pymoo.core.evaluator import Evaluator
    from pymoo.problems.static import StaticProblem

    space, sampling = settings.space, settings.sampling
    batch = sampling.batch_size

    def latency_of(entry: StoredEval) -> float:
        if table is None:
            assert entry.latency is not None, "a measured-latency evaluation without its latency"
            return float(entry.latency)
        return table.predict(entry.strategy, sampling.sampler) / batch

    def gmacs_of(strategy: Strategy) -> Optional[float]:
        if table is None or not table.macs:
            return None
        try:
            return table.predict_macs(strategy, sampling.sampler) / batch / 1e9
        except KeyError:  # a shared table measured without some MAC counts
            return None

    full_latency = table.predict(Strategy.full(space.steps), sampling.sampler) / batch if table else None
    problem, algorithm = _algorithm(space, settings.pop, settings.seed)
    algorithm.setup(problem, termination=("n_gen", settings.gens), seed=settings.seed, verbose=False)
    points: Dict[str, Point] = {}
    evaluated = cached = generation = 0
    front: List[Point] = []
    best: Optional[Point] = None
    gen_bar = tqdm(total=settings.gens, desc="generations", unit="gen", dynamic_ncols=True)
    try:
        while algorithm.has_next():
            population = algorithm.ask()
            generation += 1
            strategies = [space.decode(x) for x in np.rint(population.get("X")).astype(int)]
            keys = [store.key(s) for s in strategies]
            known = store.get_many(keys)
            jobs: Dict[str, Strategy] = {}
            sources = []
            for key, strategy in zip(keys, strategies):
                if key in known or key in jobs:
                    sources.append("cached")
                else:
                    jobs[key] = strategy
                    sources.append("evaluated")
            with tqdm(total=len(keys), initial=len(keys) - len(jobs), desc=f"gen {generation} evaluations",
                      unit="eval", leave=False, dynamic_ncols=True) as eval_bar:
                for key, result in backend.evaluate(list(jobs.items())):
                    known[key] = store.put(key, jobs[key], result, invocation, generation)
                    eval_bar.update()
            evaluated += len(jobs)
            cached += len(keys) - len(jobs)
            objectives = np.array([[known[k].quality, latency_of(known[k])] for k in keys], dtype=float)
            objectives[~np.isfinite(objectives)] = 1e30  # NSGA-II needs finite values; such points are dominated
            Evaluator().eval(StaticProblem(problem, F=objectives), population)
            algorithm.tell(infills=population)
            store.record_generation(invocation, generation, keys, sources, evaluated, cached)

            for key, strategy in zip(keys, strategies):
                if key not in points:
                    entry = known[key]
                    points[key] = Point(key, strategy, entry.quality, latency_of(entry), gmacs_of(strategy),
                                        entry.extras)
            front = pareto_front(list(points.values()))
            best = choose(front, settings.w_m, settings.select)
            stored = store.count()
            _write_outputs(settings, list(points.values()), front, best, full_latency, generation, evaluated, cached,
                           stored, finished=not algorithm.has_next())
            gen_bar.update()
            log(f"gen {generation}/{settings.gens}: best quality {min(p.quality for p in front):.4g} "
                f"({settings.quality.kind}), best latency {front[0].latency_ms:.4g} ms/image, front {len(front)}, "
                f"evaluations {evaluated} done / {cached} cached this run ({stored} stored)")
    finally:
        gen_bar.close()
    store.finish_invocation(invocation)
    assert best is not None
    stored = store.count()
    log(f"search finished: {evaluated} evaluations performed, {cached} served from the store ({stored} stored); "
        f"front of {len(front)} points")
    log(f"chosen (w_M {settings.w_m:g}, {settings.select}): quality {best.quality:.4g}, latency "
        f"{best.latency_ms:.4g} ms/image, {best.strategy.describe()} -> {settings.run_dir / 'best.yaml'}")
    return SearchOutcome(settings.run_dir, front, best, list(points.values()), generation, evaluated, cached, stored)


def _write_outputs(settings: SearchSettings, points: List[Point], front: List[Point], best: Point,
                   full_latency: Optional[float], generation: int, evaluated: int, cached: int, stored: int,
                   finished: bool) -> None:
    """front.json, front.png, best.yaml and progress.json (each written atomically)."""
    run_dir = settings.run_dir
    scores = selection_scores(front, settings.w_m, settings.select)
    latency_units = "seconds per image (" + ("cost table" if settings.latency == "table" else "measured") + ")"
    report = {
        "mode": settings.mode,
        "generation": generation,
        "generations": settings.gens,
        "quality": {"kind": settings.quality.kind, "units": settings.quality.units},
        "latency": {"source": settings.latency, "units": latency_units, "full_model": full_latency},
        "selection": {"w_M": settings.w_m, "select": settings.select,
                      "score": "quality + w_M * latency_ms" if settings.select == "raw"
                      else "quality_norm + w_M * latency_norm (min-max over the front)"},
        "evaluations": {"performed": evaluated, "cached": cached, "stored": stored, "points": len(points)},
        "best": point_dict(best, scores[front.index(best)], full_latency),
        "front": [point_dict(p, s, full_latency) for p, s in zip(front, scores)],
    }
    write_atomic(run_dir / "front.json", json.dumps(report, indent=1))
    meta = {"sampler": settings.sampling.sampler, "sampler_steps_arg": settings.sampling.steps,
            "source": f"datosd.search ({settings.mode} mode, generation {generation})",
            "quality": {"kind": settings.quality.kind, "value": finite(best.quality)},
            "latency_ms": best.latency_ms, "w_M": settings.w_m, "select": settings.select}
    tmp = run_dir / "best.yaml.tmp"
    Strategy(best.strategy.cache_depth, best.strategy.prune_ratio, name=f"searched-{settings.mode}",
             meta=meta).save(tmp)
    os.replace(tmp, run_dir / "best.yaml")
    plot_front(run_dir / "front.png", points, front, best,
               quality_label=f"{QUALITY_AXIS[settings.quality.kind]} (lower is better)",
               latency_label=f"latency, ms per image ({settings.latency})",
               title=f"DaTo {settings.mode} search, generation {generation}/{settings.gens}")
    write_atomic(run_dir / "progress.json", json.dumps(
        {"generation": generation, "generations": settings.gens, "evaluated": evaluated, "cached": cached,
         "stored": stored, "front_size": len(front), "finished": finished}, indent=1))


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None, mode: str = "depth") -> int:
    """Command-line entry point of scripts/search_{depth,ratio,joint}.py. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opt = build_parser(mode).parse_args(argv)
    previous_threads = torch.get_num_threads()
    previous_handler = None
    try:
        try:
            settings = resolve_settings(opt, argv)
            torch.set_num_threads(settings.threads)
            model = settings.model.build()
        except (SearchUsageError, ObjectiveError, StrategyError, UsageError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if settings.model.demo:
            print("*** random-weight tiny demo model: the strategies it finds say nothing about Stable Diffusion ***")
        if threading.current_thread() is threading.main_thread():
            # a terminated search unwinds: its Dask cluster and its store are closed
            previous_handler = signal.signal(signal.SIGTERM, _raise_exit)
        started = time.perf_counter()
        outcome = run_search(settings, model)
        print(f"search took {time.perf_counter() - started:.1f} s; results in {outcome.run_dir}")
        return 0
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        torch.set_num_threads(previous_threads)
