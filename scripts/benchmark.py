"""Side-by-side speed of DaTo and the paper's baselines, in ONE process, interleaved over repeats.

Every method samples the same prompts from the same starting noise on the same model; the order of the
methods rotates between repeats so that a noisy machine disturbs them alike. For every method the table
gives seconds per image (median, min), speed-up over Original, UNet calls (full / partial / reused), MACs and
the ideal (MAC) speed-up, efficiency (measured / ideal), the time the per-step cost table predicts and its
error, peak memory, and fidelity to Original (PSNR of decoded images, MSE of final latents).

    # full-size SD 1.5 architecture with random weights (speed does not depend on weight values)
    python scripts/benchmark.py --random-weights --steps 10 --repeats 2
    # 50-step figures from the cost table only (no end-to-end sampling)
    python scripts/benchmark.py --random-weights --predict-only
    # a real checkpoint
    python scripts/benchmark.py --config configs/stable-diffusion/v1-inference.yaml --ckpt model.ckpt
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from datosd import Strategy, apply_patch, remove_patch
from datosd.cli import DEFAULT_STRATEGY
from datosd.costs import (
    count_entry_macs,
    entry_name,
    find_table,
    measure_table,
    table_key,
    unet_calls,
)
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.runtime import DEMO_CONFIG, build_demo_model, load_model, pick_device, precision_scope, timed
from ldm.util import instantiate_from_config

DEFAULT_PROMPTS = ["a photograph of an astronaut riding a horse", "a golden retriever on a beach at sunset",
                   "a bowl of fruit on a wooden table, still life", "a red sports car in the rain"]
ALL_METHODS = ["original", "ddim10", "tome", "deepcache-n3", "deepcache-n5", "deepcache-tome", "dato-b1"]


@dataclass
class Method:
    """One row of the table: a sampler, a step count, and optionally a strategy and a ToMe ratio."""

    name: str
    sampler: str
    steps: int
    strategy: Optional[Strategy] = None
    tome_ratio: Optional[float] = None
    note: str = ""
    seconds: List[float] = field(default_factory=list)
    calls: Dict[str, int] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    latents: Optional[torch.Tensor] = None

    def unet_call_types(self):
        """(depth, ratio) of every UNet call of one run (the strategy's, or all full)."""
        strategy = self.strategy or Strategy.full(self.steps)
        return unet_calls(strategy, self.sampler)


def b1_for(steps: int) -> Method:
    b1 = Strategy.load(DEFAULT_STRATEGY)
    if steps == b1.steps:
        return Method("dato-b1", "plms", steps, b1)
    if b1.steps % steps:
        raise ValueError(f"--steps {steps} must divide {b1.steps} to derive a reduced-step b1 for validation")
    stride = b1.steps // steps
    reduced = Strategy(b1.cache_depth[::stride], b1.prune_ratio[::stride], name=f"b1-every-{stride}")
    return Method(f"dato-b1/{stride}", "plms", steps, reduced,
                  note=f"b1's every {stride}th step, a {steps}-step stand-in used to validate the cost table")


def build_methods(names: List[str], steps: int, strategy_files: List[str], tome_ratio: float) -> List[Method]:
    methods = []
    for name in names:
        if name == "original":
            methods.append(Method("original", "plms", steps))
        elif name == "ddim10":
            methods.append(Method("ddim10", "ddim", 10))
        elif name == "tome":
            methods.append(Method(f"tome-r{tome_ratio:g}", "plms", steps, tome_ratio=tome_ratio))
        elif name.startswith("deepcache-n") and name[len("deepcache-n"):].isdigit():
            interval = int(name[len("deepcache-n"):])
            methods.append(Method(name, "plms", steps, Strategy.uniform(steps, interval, 1)))
        elif name == "deepcache-tome":
            methods.append(Method(f"deepcache-n3+tome-r{tome_ratio:g}", "plms", steps,
                                  Strategy.uniform(steps, 3, 1), tome_ratio=tome_ratio))
        elif name == "dato-b1":
            methods.append(b1_for(steps))
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)} (deepcache-nN for any N)")
    for path in strategy_files:
        strategy = Strategy.load(path)
        strategy.check_steps(steps)
        methods.append(Method(f"dato-{Path(path).stem}", "plms", steps, strategy))
    if not methods or methods[0].name != "original":
        methods.insert(0, Method("original", "plms", steps))
    return methods


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


class CallCounter:
    """Counts UNet calls of a run by kind, from the patch's record or (unpatched) a forward pre-hook."""

    def __init__(self, unet):
        self.unet = unet
        self.plain_calls = 0

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(lambda *a: setattr(self, "plain_calls",
                                                                               self.plain_calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def counts(self, state) -> Dict[str, int]:
        if state is None:
            return {"full": self.plain_calls, "partial": 0, "reused": 0}
        kinds = [c.kind for c in state.calls]
        return {k: kinds.count(k) for k in ("full", "partial", "reused")}


def run_method(model, method: Method, cond, uncond, x_T, scale, precision, device, seed):
    """One timed sampling run; returns (seconds, final latents, call counts, peak bytes)."""
    import tomesd

    state = apply_patch(model, method.strategy, seed=seed) if method.strategy is not None else None
    if method.tome_ratio is not None:
        tomesd.apply_patch(model, ratio=method.tome_ratio)
    sampler = (PLMSSampler if method.sampler == "plms" else DDIMSampler)(model)
    try:
        with PeakMemory(device) as memory, CallCounter(model.model.diffusion_model) as counter, \
                torch.no_grad(), precision_scope(precision, device):
            (samples, _), seconds = timed(lambda: sampler.sample(
                S=method.steps, conditioning=cond, batch_size=x_T.shape[0], shape=list(x_T.shape[1:]),
                unconditional_guidance_scale=scale, unconditional_conditioning=uncond, x_T=x_T, verbose=False,
                disable_progress=True), device)
        return seconds, samples.float().cpu(), counter.counts(state), memory.peak_bytes
    finally:
        if method.tome_ratio is not None:
            tomesd.remove_patch(model)
        remove_patch(model)


def planned_calls(method: Method) -> Dict[str, int]:
    """UNet calls of one run by kind, from the strategy (what the patch will do)."""
    kinds = ["full" if d >= 12 else ("reused" if d == 0 else "partial") for d, _ in method.unet_call_types()]
    return {k: kinds.count(k) for k in ("full", "partial", "reused")}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (clamped), peak-to-peak 2."""
    mse = torch.mean((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def meta_unet(config) -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.unet_config)


def method_macs(unet_meta, method: Method, h: int, w: int, batch: int, cache: Dict[str, int]) -> int:
    """Exact MACs of one run of `method` (ToMe merging included), from per-call counts on the meta device."""
    import tomesd

    total = 0
    tome = method.tome_ratio
    for depth, ratio in method.unet_call_types():
        key = f"{entry_name(depth, ratio)}|tome={tome}"
        if key not in cache:
            shell = torch.nn.Module()
            shell.model = torch.nn.Module()
            shell.model.diffusion_model = unet_meta
            if tome is not None:
                tomesd.apply_patch(shell, ratio=tome)
            try:
                cache[key] = count_entry_macs(unet_meta, h, w, batch, [(depth, ratio)])[entry_name(depth, ratio)]
            finally:
                if tome is not None:
                    tomesd.remove_patch(shell)
        total += cache[key]
    return total


def cost_tables(model, methods, h, w, batch, precision, repeats, path: Optional[Path], progress):
    """Per-call seconds for every call type the methods use: one table without ToMe, one per ToMe ratio."""
    import tomesd

    dtype = "float32" if precision == "full" else (
        "float16" if next(model.parameters()).device.type == "cuda" else "bfloat16")
    groups: Dict[Optional[float], set] = {}
    for method in methods:
        groups.setdefault(method.tome_ratio, set()).update(method.unet_call_types())
    tables = {}
    unet = model.model.diffusion_model
    for tome, call_types in groups.items():
        key = dict(table_key(unet, h, w, batch, next(unet.parameters()).device, dtype), tome_ratio=tome)
        table = find_table(path, key) if path is not None else None
        needed = {entry_name(d, r) for d, r in call_types}
        if table is None or not needed <= set(table.seconds):
            if tome is not None:
                tomesd.apply_patch(model, ratio=tome)
            try:
                table = measure_table(model, h, w, batch, sorted(call_types), repeats=repeats,
                                      precision="float32" if precision == "full" else "autocast",
                                      progress=progress, count_macs=False)
            finally:
                if tome is not None:
                    tomesd.remove_patch(model)
            table.key = key
            if path is not None:
                table.save(path)
        tables[tome] = table
    return tables


def render_markdown(rows, header_note) -> str:
    columns = ["method", "sampler", "s/img median", "s/img min", "speed-up", "UNet calls full/partial/reused",
               "GMACs/img", "ideal speed-up", "efficiency", "predicted s/img", "predicted speed-up",
               "prediction error",
               "peak memory MB", "PSNR vs original dB", "latent MSE"]
    lines = [header_note, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        calls = r["calls"]
        lines.append("| " + " | ".join([
            r["method"], f"{r['sampler']} {r['steps']}", fmt(r["median_s"], ".2f"), fmt(r["min_s"], ".2f"),
            fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
            f"{calls['full']}/{calls['partial']}/{calls['reused']}",
            fmt(r["gmacs_per_image"], ".1f"), fmt(r["ideal_speedup"], ".2f"), fmt(r["efficiency"], ".2f"),
            fmt(r["predicted_s"], ".2f"),
            fmt(r["predicted_speedup"], ".2f") + ("x" if r["predicted_speedup"] is not None else ""),
            fmt(r["prediction_error"], "+.1%"), fmt(r["peak_memory_mb"], ".0f"),
            fmt(r["psnr"], ".2f"), fmt(r["latent_mse"], ".4g")]) + " |")
    return "\n".join(lines)


def plot(rows, path: Path, title: str):
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


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--ckpt", default=None, help="checkpoint; omit with --random-weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --config with random weights (speed does not depend on weight values)")
    parser.add_argument("--demo", action="store_true", help="the tiny demo model (for a quick check)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help=f"comma-separated subset of {','.join(ALL_METHODS)} (deepcache-nN for any N)")
    parser.add_argument("--strategy", action="append", default=[], help="extra DaTo strategy files (repeatable)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of every method but ddim10")
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--W", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--tome_ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table-repeats", type=int, default=3, help="interleaved passes of the cost table")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="full", choices=["full", "autocast"],
                        help="full = float32; autocast = bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-decode", action="store_true", help="skip VAE decoding (no PSNR column)")
    parser.add_argument("--predict-only", action="store_true",
                        help="no end-to-end runs: report cost-table predictions and MACs")
    parser.add_argument("--cost-table", default="outputs/bench/costs.json",
                        help="JSON store of cost tables (reused when the key matches)")
    parser.add_argument("--outdir", default="outputs/bench", help="where the .md, .json and .png go")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default from the settings)")
    return parser


def main(argv=None):
    opt = build_parser().parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    try:
        if opt.H % 64 or opt.W % 64:
            raise ValueError("--H and --W must be multiples of 64")
        if not (opt.demo or opt.random_weights or opt.ckpt):
            raise ValueError("give --ckpt, --random-weights or --demo")
        methods = build_methods([m.strip() for m in opt.methods.split(",") if m.strip()], opt.steps,
                                opt.strategy, opt.tome_ratio)
        device = pick_device(opt.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if opt.demo:
        model = build_demo_model().to(device)
        config = OmegaConf.load(str(DEMO_CONFIG))
        model_label = "tiny demo model, random weights"
    elif opt.random_weights:
        config = OmegaConf.load(opt.config)
        model = instantiate_from_config(config.model).to(device).eval()
        model_label = f"{Path(opt.config).name}, random weights"
    else:
        config = OmegaConf.load(opt.config)
        model = load_model(opt.config, opt.ckpt, device)
        model_label = f"{Path(opt.ckpt).name}"
    h, w = opt.H // 8, opt.W // 8
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(opt.batch)]
    with torch.no_grad(), precision_scope(opt.precision, device):
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning(opt.batch * [""])
    x_T = torch.randn((opt.batch, 4, h, w), generator=torch.Generator().manual_seed(opt.seed)).to(device)

    dtype_label = "float32" if opt.precision == "full" else ("float16" if device.type == "cuda" else "bfloat16")
    unet_meta = meta_unet(config)
    mac_cache: Dict[str, int] = {}
    macs = {m.name: method_macs(unet_meta, m, h, w, opt.batch, mac_cache) for m in methods}
    tables = cost_tables(model, methods, h, w, opt.batch, opt.precision, opt.table_repeats,
                         Path(opt.cost_table) if opt.cost_table else None, progress=True)

    if not opt.predict_only:
        bar = tqdm(total=opt.repeats * len(methods), desc="benchmark")
        for repeat in range(opt.repeats):
            shift = repeat % len(methods)
            for method in methods[shift:] + methods[:shift]:
                bar.set_description(f"benchmark: {method.name}, repeat {repeat + 1}/{opt.repeats}")
                seconds, latents, calls, peak = run_method(model, method, cond, uncond, x_T, opt.scale,
                                                           opt.precision, device, opt.seed)
                method.seconds.append(seconds / opt.batch)
                method.calls = calls
                method.peak_memory_mb = max(method.peak_memory_mb, peak / 2 ** 20)
                if method.latents is None:
                    method.latents = latents
                bar.update()
        bar.close()

    original = methods[0]
    decoded = {}
    if not opt.predict_only and not opt.no_decode:
        with torch.no_grad(), precision_scope(opt.precision, device):
            for method in tqdm(methods, desc="decoding"):
                decoded[method.name] = model.decode_first_stage(method.latents.to(device)).float().cpu()
    rows = []
    for method in methods:
        table = tables[method.tome_ratio]
        predicted = table.predict(method.strategy or Strategy.full(method.steps), method.sampler) / opt.batch
        measured = statistics.median(method.seconds) if method.seconds else None
        base = statistics.median(original.seconds) if original.seconds else None
        base_predicted = tables[None].predict(Strategy.full(original.steps), original.sampler) / opt.batch
        ideal = macs[original.name] / macs[method.name] if macs[method.name] else None
        speedup = base / measured if measured else None
        rows.append({
            "method": method.name, "sampler": method.sampler, "steps": method.steps, "note": method.note,
            "strategy": method.strategy.to_dict() if method.strategy else None, "tome_ratio": method.tome_ratio,
            "seconds": method.seconds, "median_s": measured, "min_s": min(method.seconds) if method.seconds else None,
            "speedup": speedup, "calls": method.calls or planned_calls(method),
            "gmacs_per_image": macs[method.name] / opt.batch / 1e9, "ideal_speedup": ideal,
            "efficiency": speedup / ideal if speedup and ideal else None,
            "predicted_s": predicted, "predicted_speedup": base_predicted / predicted if predicted else None,
            "predicted_efficiency": (base_predicted / predicted) / ideal if predicted and ideal else None,
            "prediction_error": (predicted - measured) / measured if measured else None,
            "peak_memory_mb": method.peak_memory_mb if method.seconds else None,
            "psnr": psnr(decoded[method.name], decoded[original.name]) if decoded else None,
            "latent_mse": (torch.mean((method.latents - original.latents) ** 2).item()
                           if method.latents is not None else None),
        })
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    fidelity_note = (" Fidelity columns compare with Original at the same seed; with random weights they are"
                     " NOT meaningful (printed only to show the pipeline)." if (opt.random_weights or opt.demo) else "")
    mode = "cost-table prediction only (no end-to-end sampling)" if opt.predict_only else (
        f"measured end to end, median of {opt.repeats} interleaved repeats")
    note = (f"**{model_label}**, {opt.H}x{opt.W}, batch {opt.batch} (CFG scale {opt.scale}), {dtype_label}, "
            f"{device.type} ({hardware}, {torch.get_num_threads()} threads), torch {torch.__version__}; {mode}. "
            f"Seconds are sampling time per image (UNet loop, no text encoding or VAE).{fidelity_note}")
    markdown = render_markdown(rows, note)
    for method in methods:
        if method.note:
            markdown += f"\n\n{method.name}: {method.note}."
    print("\n" + markdown)
    stem = opt.name or (f"bench-{'demo' if opt.demo else 'sd'}-{opt.H}x{opt.W}-{opt.steps}steps-{dtype_label}"
                        + ("-predicted" if opt.predict_only else ""))
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{stem}.md").write_text(markdown + "\n")
    environment = {"hardware": hardware, "device": device.type, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "model": model_label, "precision": dtype_label, "H": opt.H, "W": opt.W, "batch": opt.batch,
                   "scale": opt.scale, "repeats": opt.repeats, "predict_only": opt.predict_only}
    tables_json = {str(k): v.to_dict() for k, v in tables.items()}
    (outdir / f"{stem}.json").write_text(json.dumps({"environment": environment, "rows": rows,
                                                     "cost_tables": tables_json}, indent=1))
    plot(rows, outdir / f"{stem}.png", note.split(";")[0])
    print(f"\nwrote {outdir / stem}.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
