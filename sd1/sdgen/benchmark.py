"""Side-by-side speed of acceleration methods in one process, and what the per-step cost model predicts.

Every method (a registry name, `sdgen.methods`) samples the same prompts from the same start noise on the same
model through the generation API. Each method first runs once untimed at the benchmark's shape (the first
run pays one-off costs: allocations, kernel selection, lazy initialisation); then `repeats` timed passes run
every method, the order rotating between passes so that a disturbed machine disturbs them alike.

For every method the report gives seconds per image (median, min), the speed-up over the original, UNet calls
by kind, exact MACs and the ideal (MAC) speed-up, the time the cost table (`sdgen.costs`, one table per ToMe
ratio) predicts and its error, peak memory, and fidelity to the original (PSNR of decoded images, MSE of the
final latents). Cost tables are stored by key (model, latent size, batch, device, dtype, threads, and what the
methods that change a call's cost add: the ToMe ratio);
a stored entry is reused and replaced only on request (`remeasure`), and entries whose repeats spread more
than NOISY_SPREAD, or whose times are out of line with their MACs (`CostTable.mac_mismatches`, which a table of
one repeat shows too), are flagged.
"""
import os
import statistics
import textwrap
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from .costs import CostTable, count_entry_macs, entry_name, find_table, load_tables, measure_table, spread, table_key
from tqdm import tqdm

from . import generate as gen
from .compiled import EAGER, Execution
from .fidelity import psnr
from .methods import REGISTRY, Method, MethodError, Registry, count_calls
from .runtime import UsageError, precision_name
from .settings import RunSettings

DEFAULT_PROMPTS = ["a photograph of an astronaut riding a horse", "a golden retriever on a beach at sunset",
                   "a bowl of fruit on a wooden table, still life", "a red sports car in the rain"]
DEFAULT_METHODS = ("original", "ddim10", "tome-0.5", "deepcache-n3", "deepcache-n5", "deepcache-n3+tome-0.5",
                   "dato")
BASE_SAMPLERS = {"ldm": "plms", "sgm": "euler"}  # the paper's samplers (SD: PLMS, SDXL: EulerEDM); ddim<N> brings its own
NOISY_SPREAD = 0.2  # (max - min) / median of an entry's repeats above which it is flagged
RENAMED = {"tome": "tome-0.5", "deepcache-tome": "deepcache-n3+tome-0.5", "dato-b1": "dato"}

CallType = Tuple[int, float]  # (cache depth, prune ratio) of one UNet call


@dataclass
class BenchEntry:
    """One row of the benchmark: a registry method, its run settings (the benchmark's, for the method), how its
    UNet calls run (eager or compiled), and what the runs measured (the untimed first run's seconds, seconds
    per image of each timed repeat, calls by kind, peak memory, first latents)."""

    method: Method
    run: RunSettings
    execution: Execution = EAGER
    first_run_seconds: Optional[float] = None
    seconds: List[float] = field(default_factory=list)
    calls: Optional[Dict[str, int]] = None
    peak_memory_mb: float = 0.0
    latents: Optional[torch.Tensor] = None

    @property
    def name(self) -> str:
        return self.method.name if not self.execution.compiles else f"{self.method.name} [{self.execution.compile}]"

    @property
    def sampler(self) -> str:
        return self.run.sampler

    @property
    def steps(self) -> int:
        """The steps its runs really run."""
        return self.run.sampler_steps

    def compile_seconds(self, batch: int) -> Optional[float]:
        """What compiling cost: the first run's time beyond a timed run's (None when eager or not timed)."""
        if not self.execution.compiles or self.first_run_seconds is None or not self.seconds:
            return None
        return max(0.0, self.first_run_seconds - statistics.median(self.seconds) * batch)

    def call_plan(self) -> List[CallType]:
        """(cache depth, prune ratio) of every UNet call of one run (`RunSettings.call_plan`)."""
        return self.run.call_plan(self.method)

    def planned_calls(self) -> Dict[str, int]:
        return count_calls(depth for depth, _ in self.call_plan())

    def note(self) -> str:
        """What a reader of the table must know about this row's step count or strategy ('' if nothing)."""
        parts, forced, asked = [], self.method.forced_steps, self.run.asked_steps
        if forced is not None and forced != asked:
            parts.append(f"runs {forced} steps: its name fixes the step count (--steps {asked} applies to the "
                         f"methods whose name has none)")
        elif self.steps != self.run.steps:
            parts.append(f"the {self.sampler} schedule runs {self.steps} steps for {asked}")
        return "; ".join(parts + self.method.notes())


def bench_entries(names: Sequence[str], settings: RunSettings, compile_mode: str = "none",
                  channels_last: bool = False, registry: Registry = REGISTRY) -> List[BenchEntry]:
    """The benchmark's rows, original first (added when missing): every name through the registry, each with
    `settings` (the benchmark's: its sampler, PLMS / EulerEDM, and step count apply to every method whose name
    has none; ddim10 runs DDIM 10) resolved for it. With a `compile_mode` other than 'none' every method has a
    second row, compiled (all eager rows first). Raises MethodError / StrategyError (a DaTo strategy of another
    length) before any model is built."""
    methods: List[Method] = []
    for name in names:
        if name in RENAMED:
            raise MethodError(f"method {name!r} is now called {RENAMED[name]!r} (registry names, sdgen.methods)")
        method = registry.parse(name)
        if any(m.name == method.name for m in methods):
            raise MethodError(f"method {method.name!r} is listed twice")
        methods.append(method)
    methods.sort(key=lambda m: not m.is_original)
    if not methods or not methods[0].is_original:
        methods.insert(0, registry.parse("original"))
    entries = [BenchEntry(method, settings.for_method(method), Execution(channels_last=channels_last))
               for method in methods]
    if compile_mode != "none":
        compiled = Execution(compile_mode, channels_last=channels_last)
        entries += [BenchEntry(e.method, e.run, compiled) for e in list(entries)]
    return entries


# --- measuring --------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak, or the process RSS sampled every 20 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self.peak_bytes = self._rss()

        def watch():
            while not self._stop.wait(0.02):
                self.peak_bytes = max(self.peak_bytes, self._rss())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())


def run_method(model, entry: BenchEntry, cond: gen.Conditioning, x_T: torch.Tensor) -> Tuple[gen.SampleResult, int]:
    """One sampling run of `entry`, its method applied for this run only; returns (result, peak bytes)."""
    run = entry.run
    with entry.method.apply(model, run.sampler_steps, seed=run.seed, execution=entry.execution) as applied, \
            PeakMemory(gen.model_device(model)) as memory:
        result = gen.sample_latents(model, cond, x_T, sampler=run.sampler, steps=run.steps, scale=run.scale,
                                    seed=run.seed, method=applied, precision=run.precision)
    return result, memory.peak_bytes


def time_methods(model, entries: Sequence[BenchEntry], cond: gen.Conditioning, x_T: torch.Tensor, *,
                 repeats: int, progress: bool = True) -> None:
    """One untimed warm-up run per entry (a compiled entry compiles in it), then `repeats` passes over all
    entries, each pass starting one entry later (rotating order). Fills each entry's first-run seconds, seconds
    (per image), calls, peak memory and first latents."""
    batch = x_T.shape[0]
    bar = tqdm(total=(repeats + 1) * len(entries), desc="benchmark", disable=not progress)
    for entry in entries:
        bar.set_description(f"benchmark: {entry.name}, untimed warm-up")
        result, _ = run_method(model, entry, cond, x_T)
        entry.first_run_seconds = result.seconds
        bar.update()
    for repeat in range(repeats):
        shift = repeat % len(entries)
        for entry in list(entries[shift:]) + list(entries[:shift]):
            bar.set_description(f"benchmark: {entry.name}, repeat {repeat + 1}/{repeats}")
            result, peak = run_method(model, entry, cond, x_T)
            entry.seconds.append(result.seconds / batch)
            entry.calls = result.calls or entry.planned_calls()
            entry.peak_memory_mb = max(entry.peak_memory_mb, peak / 2 ** 20)
            if entry.latents is None:
                entry.latents = result.latents.float().cpu()
            bar.update()
    bar.close()


def call_types(entries: Sequence[BenchEntry]) -> Dict[Optional[str], Dict[str, CallType]]:
    """{cost group (`Method.cost_group`; None: the plain table): {entry name: (depth, ratio)}} of every UNet
    call the entries make."""
    groups: Dict[Optional[str], Dict[str, CallType]] = {}
    for entry in entries:
        group = groups.setdefault(entry.method.cost_group, {})
        for depth, ratio in entry.call_plan():
            group.setdefault(entry_name(depth, ratio), (depth, ratio))
    return groups


def cost_patch(model: torch.nn.Module, method: Method):
    """The components of `method` that change a call's cost (`Method.cost_components`) patched into `model`
    while the block runs; nothing when it has none."""
    if not method.cost_components:
        return nullcontext()
    return Method(method.cost_components).apply(model, steps=1)  # they have no step plan


def check_cost_table(path: Path, flag: str = "--cost-table") -> None:
    """Raise UsageError (one line) when the file `path` exists but is not a store of cost tables, which would
    otherwise fail once the model is built and the first table is looked up."""
    if not Path(path).exists():
        return
    try:
        load_tables(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{flag} {path} is not a cost-table JSON file ({err}); fix or remove it, or give another "
                         f"{flag}") from None


def cost_table_key(model, height: int, width: int, batch: int, precision: str, method: Method,
                   registry: Registry = REGISTRY) -> Dict[str, object]:
    """What a stored table is found by: `costs.table_key` (model, latent size, batch, device, dtype, threads,
    torch) and the fields the cost-changing components of `method` add (`Registry.cost_key`)."""
    device = gen.model_device(model)
    unet = model.model.diffusion_model
    return dict(table_key(unet, height, width, batch, device, precision_name(precision, device)),
                **registry.cost_key(method))


def cost_tables(model, entries: Sequence[BenchEntry], height: int, width: int, batch: int, precision: str,
                repeats: int, path: Path, remeasure: bool = False, progress: bool = True,
                registry: Registry = REGISTRY) -> Dict[Optional[str], CostTable]:
    """The cost table of every cost group the entries use: seconds and exact MACs of every call type they make.

    A table stored in `path` under the same key is reused: only the entries it lacks are timed (every needed
    entry with `remeasure`, replacing the stored ones), and only missing MAC counts are counted. What is
    measured is stored back. height, width: latent size; precision: 'full' or 'autocast'.
    """
    unet = model.model.diffusion_model
    tables = {}
    for group, needed in call_types(entries).items():
        method = next(e.method for e in entries if e.method.cost_group == group)
        key = cost_table_key(model, height, width, batch, precision, method, registry)
        stored = find_table(path, key)
        to_time = sorted(call for name, call in needed.items()
                         if remeasure or stored is None or name not in stored.seconds)
        to_count = sorted(call for name, call in needed.items() if stored is None or name not in stored.macs)
        if to_time or to_count:
            fresh = CostTable(key=key)
            with cost_patch(model, method):
                if to_time:
                    fresh = measure_table(model, height, width, batch, to_time, repeats=repeats,
                                          precision=precision, progress=progress, count_macs=False)
                    fresh.key = key
                if to_count:
                    fresh.macs = count_entry_macs(unet, height, width, batch, to_count)
            fresh.save(path)
            stored = fresh.merged_into(stored)
        tables[group] = stored
    return tables


@dataclass(frozen=True)
class BenchSettings:
    """What every run of a benchmark shares: the run settings (image size, batch, scale, precision, seed; the
    sampler and step count of the methods whose name has none), and the measuring: cost_table, the JSON store of
    cost tables; remeasure: time every needed cost-table entry again; predict_only: no end-to-end runs."""

    run: RunSettings
    repeats: int = 3
    table_repeats: int = 3
    cost_table: Path = Path("costs.json")
    remeasure: bool = False
    decode: bool = True
    predict_only: bool = False


def run_benchmark(model, entries: Sequence[BenchEntry], settings: BenchSettings, progress: bool = True,
                  registry: Registry = REGISTRY) -> Tuple[List[Dict[str, object]], Dict[Optional[str], CostTable]]:
    """Get the cost tables (seconds and MACs per call type), time every entry end to end (unless predict_only)
    and decode the first latents of each. Returns (result rows, cost tables by cost group)."""
    run = settings.run
    _, h, w = shape = run.latent_shape
    tables = cost_tables(model, entries, h, w, run.batch, run.precision, settings.table_repeats,
                         settings.cost_table, remeasure=settings.remeasure, progress=progress, registry=registry)
    decoded = None
    if not settings.predict_only:
        prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(run.batch)]
        cond = gen.encode_prompts(model, prompts, run.scale, run.precision, size=run.size)
        x_T = gen.start_noise([run.seed + i for i in range(run.batch)], shape)
        time_methods(model, entries, cond, x_T, repeats=settings.repeats, progress=progress)
        if settings.decode:
            decoded = {e.name: gen.decode(model, e.latents, run.precision) for e in entries}
    return result_rows(entries, tables, run.batch, decoded), tables


# --- reporting --------------------------------------------------------------------------------------------

def result_rows(entries: Sequence[BenchEntry], tables: Dict[Optional[str], CostTable], batch: int,
                decoded: Optional[Dict[str, torch.Tensor]] = None) -> List[Dict[str, object]]:
    """One dict per entry (the .json rows and the table's cells); the first entry is the (eager) original.
    Speed-ups are over the eager original; `speedup_same_mode` is over the original run the same way."""
    original = entries[0]
    originals = {e.execution: e for e in entries if e.method.is_original}
    macs = {e.name: tables[e.method.cost_group].plan_macs(e.call_plan()) for e in entries}
    base = statistics.median(original.seconds) if original.seconds else None
    base_predicted = tables[None].plan_seconds(original.call_plan()) / batch
    rows = []
    for entry in entries:
        # The cost table times plain eager calls: no prediction for methods it does not model or compiled runs.
        modelled = entry.method.predicted
        predicted = (tables[entry.method.cost_group].plan_seconds(entry.call_plan()) / batch
                     if modelled and not entry.execution.compiles else None)
        measured = statistics.median(entry.seconds) if entry.seconds else None
        ideal = macs[original.name] / macs[entry.name] if macs[entry.name] and modelled else None
        speedup = base / measured if measured else None
        same_mode = originals.get(entry.execution)
        same_mode_base = statistics.median(same_mode.seconds) if same_mode is not None and same_mode.seconds else None
        strategy = entry.method.patch_strategy(entry.steps)
        rows.append({
            "method": entry.name, "label": entry.method.label, "sampler": entry.sampler, "steps": entry.steps,
            "note": entry.note(), "strategy": strategy.to_dict() if strategy else None,
            "cost_group": entry.method.cost_group, "seconds": entry.seconds, "median_s": measured,
            "min_s": min(entry.seconds) if entry.seconds else None,
            "spread": spread(entry.seconds) if len(entry.seconds) > 1 else None,
            "execution": entry.execution.label, "compile_s": entry.compile_seconds(batch),
            "speedup": speedup, "speedup_same_mode": same_mode_base / measured if measured and same_mode_base else None,
            "calls": entry.calls or entry.planned_calls(),
            "gmacs_per_image": macs[entry.name] / batch / 1e9 if modelled else None, "ideal_speedup": ideal,
            "efficiency": speedup / ideal if speedup and ideal else None,
            "predicted_s": predicted, "predicted_speedup": base_predicted / predicted if predicted else None,
            "predicted_efficiency": (base_predicted / predicted) / ideal if predicted and ideal else None,
            "prediction_error": (predicted - measured) / measured if measured and predicted else None,
            "peak_memory_mb": entry.peak_memory_mb if entry.seconds else None,
            "psnr": psnr(decoded[entry.name], decoded[original.name]) if decoded else None,
            "latent_mse": (torch.mean((entry.latents - original.latents) ** 2).item()
                           if entry.latents is not None else None),
        })
    return rows


def spread_report(tables: Dict[Optional[str], CostTable], entries: Sequence[BenchEntry],
                  threshold: float = NOISY_SPREAD) -> Tuple[List[str], List[str]]:
    """(lines giving the spread, (max - min) / median, of the repeats of every cost-table entry the entries use
    and of every method's timed runs; the measurements spreading more than `threshold`, e.g.
    'cost table entry d12_r0.50 45%', and the pairs of those cost-table entries whose times are out of line with
    their MACs, e.g. 'cost table entries d12_r0.00 / d12_r0.60: 4.06x the time for 1.05x the MACs')."""
    lines, flagged = [], []
    for group, needed in call_types(entries).items():
        table = tables[group]
        where = "cost table" + (f" ({group})" if group is not None else "")
        cells = []
        for name in sorted(needed):
            repeats = len(table.raw_seconds.get(name, []))
            cells.append(f"{name} {table.spread(name):.0%} of {repeats}" if repeats > 1 else f"{name} (1 repeat)")
        lines.append(f"{where}, spread of each entry's repeats: " + ", ".join(cells))
        flagged += [f"{where} entry {name} {value:.0%}"
                    for name, value in table.noisy_entries(threshold, sorted(needed)).items()]
        flagged += [f"{where} entries {big} / {small}: {time_ratio:.2f}x the time for {mac_ratio:.2f}x the MACs"
                    for big, small, time_ratio, mac_ratio in table.mac_mismatches(names=needed)]
    timed = [(e.name, spread(e.seconds)) for e in entries if len(e.seconds) > 1]
    if timed:
        lines.append("timed runs, spread of each method's repeats: "
                     + ", ".join(f"{name} {value:.0%}" for name, value in timed))
        flagged += [f"timed runs of {name} {value:.0%}" for name, value in timed if value > threshold]
    return lines, flagged


def render_markdown(rows: Sequence[Dict[str, object]], header_note: str) -> str:
    columns = ["method", "sampler", "s/img median", "s/img min", "speed-up", "speed-up vs original, same mode",
               "compile s", "UNet calls full/partial/reused",
               "GMACs/img", "ideal speed-up", "efficiency", "predicted s/img", "predicted speed-up",
               "prediction error", "peak memory MB", "PSNR vs original dB", "latent MSE"]
    lines = [header_note, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        calls = r["calls"]
        lines.append("| " + " | ".join([
            r["method"], f"{r['sampler']} {r['steps']}", fmt(r["median_s"], ".2f"), fmt(r["min_s"], ".2f"),
            fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
            fmt(r["speedup_same_mode"], ".2f") + ("x" if r["speedup_same_mode"] is not None else ""),
            fmt(r["compile_s"], ".1f"),
            f"{calls['full']}/{calls['partial']}/{calls['reused']}",
            fmt(r["gmacs_per_image"], ".1f"), fmt(r["ideal_speedup"], ".2f"), fmt(r["efficiency"], ".2f"),
            fmt(r["predicted_s"], ".2f"),
            fmt(r["predicted_speedup"], ".2f") + ("x" if r["predicted_speedup"] is not None else ""),
            fmt(r["prediction_error"], "+.1%"), fmt(r["peak_memory_mb"], ".0f"),
            fmt(r["psnr"], ".2f"), fmt(r["latent_mse"], ".4g")]) + " |")
    lines += [f"\n{r['method']}: {r['note']}." for r in rows if r["note"]]
    return "\n".join(lines)


def plot(rows: Sequence[Dict[str, object]], path: Path, title: str) -> None:
    """Bar chart of measured (or predicted) and ideal speed-ups, and measured against ideal, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = range(len(rows))
    measured = [r["speedup"] if r["speedup"] is not None else r["predicted_speedup"] or 0 for r in rows]
    axes[0].bar([x - 0.2 for x in xs], measured, width=0.4, label="measured" if rows[0]["speedup"] else "predicted")
    axes[0].bar([x + 0.2 for x in xs], [r["ideal_speedup"] or 0 for r in rows], width=0.4, label="ideal (MACs)")
    axes[0].set_xticks(list(xs))
    axes[0].set_xticklabels(names, rotation=30, ha="right")
    axes[0].set_ylabel("speed-up over original")
    axes[0].legend()
    axes[0].set_title("speed-up per method")
    ideal = [r["ideal_speedup"] or 0 for r in rows]
    axes[1].scatter(ideal, measured)
    for name, xi, yi in zip(names, ideal, measured):
        axes[1].annotate(name, (xi, yi), fontsize=8)
    top = max(ideal + measured + [1]) * 1.1
    axes[1].plot([0, top], [0, top], "k--", linewidth=0.8, label="measured = ideal")
    axes[1].set_xlabel("ideal speed-up (MACs)")
    axes[1].set_ylabel("speed-up")
    axes[1].legend()
    axes[1].set_title("measured vs ideal")
    fig.suptitle(textwrap.fill(title.replace("**", ""), 160), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
