"""Side-by-side speed of DaTo and the paper's baselines, in ONE process, interleaved over repeats.

Every method samples the same prompts from the same starting noise on the same model; each runs once untimed
(warm-up), then the order of the methods rotates between timed repeats so that a noisy machine disturbs them
alike. For every method the table gives seconds per image (median, min), speed-up over Original, UNet calls
(full / partial / reused), MACs and the ideal (MAC) speed-up, efficiency (measured / ideal), the time the
per-step cost table predicts and its error, peak memory, and fidelity to Original (PSNR of decoded images,
MSE of final latents).

Methods are registry names (sdgen.methods): original, ddim<N>, tome-<r>, deepcache-n<N>, their '+'
combinations, dato[:<strategy>][@<derivation>]. --steps applies to every method whose name has no step
count: ddim10 always runs 10 steps (the table says so). DaTo's b1 has 50 steps; at fewer steps name a
stand-in, e.g. dato@every5 (b1's every 5th step) for --steps 10.

The cost tables are stored in OUTDIR/costs.json (or --cost-table), keyed by model, latent size, batch,
device, dtype, threads and ToMe ratio; a stored entry is reused, and measured again only with --remeasure.
The spread of each entry's repeats is printed, and entries spreading more than 20% are flagged, as are pairs
of entries whose time ratio strays from their MAC ratio by more than 1.5x (seen even with one repeat).

    # full-size SD 1.5 architecture with random weights (speed does not depend on weight values)
    python scripts/benchmark.py --random-weights --steps 10 --repeats 2 \\
        --methods original,ddim10,tome-0.5,deepcache-n3,dato@every5
    # 50-step figures from the cost table only (no end-to-end sampling)
    python scripts/benchmark.py --random-weights --predict-only
    # a real checkpoint
    python scripts/benchmark.py --config configs/stable-diffusion/v1-inference.yaml --ckpt model.ckpt
"""
import argparse
import datetime
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch
from datosd.strategy import DEFAULT_STRATEGY, StrategyError
from ldm.checkpoint import CheckpointError

from .. import generate as gen
from ..benchmark import (
    BASE_SAMPLERS,
    DEFAULT_METHODS,
    NOISY_SPREAD,
    BenchSettings,
    bench_entries,
    check_cost_table,
    plot,
    render_markdown,
    run_benchmark,
    spread_report,
)
from ..compiled import COMPILE_MODES
from ..costs import MAC_TOLERANCE, hardware_name
from ..images import atomic_write_text, check_output_dir, check_output_file
from ..methods import REGISTRY, MethodError, Registry
from ..methods.caching import check_source
from ..resources import find_config
from ..runtime import UsageError, pick_device, precision_name, set_threads
from ..settings import RunSettings, SettingFlags
from . import run
from .flags import DEFAULT_CONFIG, resolve_model_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"model config (default {DEFAULT_CONFIG}; with --demo the "
                                                       f"shapes model's)")
    parser.add_argument("--ckpt", default=None, help="checkpoint; omit with --random-weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --config with random weights (speed does not depend on weight values)")
    parser.add_argument("--demo", action="store_true",
                        help="the shapes model (the demo model, weights shipped); with --config, that config with "
                             "seeded random weights (e.g. configs/stable-diffusion/tiny-demo.yaml)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated registry names (original is always the first row)")
    parser.add_argument("--strategy", action="append", default=[],
                        help="a DaTo strategy file, benchmarked as dato:FILE (repeatable)")
    parser.add_argument("--steps", type=int, default=50,
                        help="sampling steps of every method whose name has no step count (ddim10 runs 10)")
    parser.add_argument("--H", type=int, default=None, help="image height (default: the config's, 512 for SD 1.5)")
    parser.add_argument("--W", type=int, default=None, help="image width (default: the config's)")
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every method (after one untimed)")
    parser.add_argument("--table-repeats", type=int, default=3, help="interleaved passes of the cost table")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="full", choices=["full", "autocast"],
                        help="full = float32; autocast = bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-decode", action="store_true", help="skip VAE decoding (no PSNR column)")
    parser.add_argument("--predict-only", action="store_true",
                        help="no end-to-end runs: report cost-table predictions and MACs")
    parser.add_argument("--cost-table", default=None,
                        help="JSON store of cost tables, reused when the key matches (default OUTDIR/costs.json)")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure every cost-table entry this run needs again, replacing the stored ones")
    parser.add_argument("--outdir", default="outputs/bench", help="where the .md, .json, .png and costs.json go")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default from the settings)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="also time every method with torch.compile in this mode (rows '<method> [<mode>]'): "
                             "the untimed first run compiles, and its extra time is the 'compile s' column")
    parser.add_argument("--channels_last", action="store_true", help="run every method in channels-last memory")
    parser.add_argument("--diffusers", action="store_true",
                        help="also time the same SD 1.x architecture through a diffusers pipeline (random weights): "
                             "its original, DeepCache's DeepCacheSDHelper, DaTo's ratios on the helper's schedule "
                             "(equal full steps), tomesd and DaTo, each with its fidelity to the original, next to "
                             "this path's original and DaTo rows (needs the diffusers extra)")
    return parser


def method_names(opt) -> list:
    """--methods, then dato:FILE for every --strategy."""
    names = [m.strip() for m in opt.methods.split(",") if m.strip()]
    for path in opt.strategy:
        check_source(path, "--strategy")
        names.append(f"dato:{path}")
    return names


FLAGS = SettingFlags(steps="--steps", batch="--batch")


def check_options(opt, registry: Registry = REGISTRY):
    """Reject bad input before any model is built. Returns (entries, run settings, device, model config,
    cost-table path)."""
    if not (opt.demo or opt.random_weights or opt.ckpt):
        raise UsageError("give --ckpt, --random-weights or --demo")
    if opt.table_repeats < 1:
        raise UsageError(f"--table-repeats must be at least 1, got {opt.table_repeats}")
    if opt.repeats < 1 and not opt.predict_only:
        raise UsageError(f"--repeats must be at least 1, got {opt.repeats}")
    config = gen.read_config(opt.config)
    geometry = gen.model_geometry(config)
    opt.H = geometry.default_size if opt.H is None else opt.H
    opt.W = geometry.default_size if opt.W is None else opt.W
    device = pick_device(opt.device)
    settings = RunSettings.resolve(flags=FLAGS, sampler=BASE_SAMPLERS[geometry.kind], steps=opt.steps,
                                   scale=opt.scale, precision=opt.precision, height=opt.H, width=opt.W,
                                   batch=opt.batch, seed=opt.seed, seed_count=opt.batch, device=str(device),
                                   geometry=geometry)
    entries = bench_entries(method_names(opt), settings, compile_mode=opt.compile, channels_last=opt.channels_last,
                            registry=registry)
    if opt.diffusers:
        if geometry.kind != "ldm" or not (opt.random_weights or opt.demo) or opt.predict_only or opt.H != opt.W:
            raise UsageError("--diffusers times an SD 1.x architecture with random weights end to end at a square "
                             "size: use it with --random-weights (or --demo), without --predict-only, --H = --W")
        if importlib.util.find_spec("diffusers") is None:
            raise UsageError('--diffusers needs the diffusers extra: pip install -e ".[diffusers]"')
    if opt.ckpt and not (opt.demo or opt.random_weights):
        gen.check_model_files(opt.config, opt.ckpt)
    check_output_dir(opt.outdir)
    cost_table = Path(opt.cost_table) if opt.cost_table else Path(opt.outdir) / "costs.json"
    check_output_file(cost_table, "--cost-table")
    check_cost_table(cost_table)
    return entries, settings, device, config, cost_table


def load(opt, config, device):
    """(model, label for the table) of --demo, --random-weights or --ckpt."""
    if opt.demo:
        return gen.build_demo_model(device, opt.config), f"{Path(opt.config).name}, seeded random weights"
    if opt.random_weights:
        return gen.build_random_model(opt.config, device), f"{Path(opt.config).name}, random weights"
    return gen.load_model(opt.config, opt.ckpt, device), Path(opt.ckpt).name


def main(argv=None, registry: Registry = REGISTRY) -> int:
    """Run the benchmark with flags `argv` over the methods of `registry`."""
    opt = resolve_model_args(build_parser().parse_args(argv))
    try:
        entries, run_settings, device, config, cost_table = check_options(opt, registry)
        threads = set_threads(opt.threads)
        model, model_label = load(opt, config, device)
    except (UsageError, MethodError, StrategyError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = BenchSettings(run=run_settings, repeats=opt.repeats, table_repeats=opt.table_repeats,
                             cost_table=cost_table, remeasure=opt.remeasure, decode=not opt.no_decode,
                             predict_only=opt.predict_only)
    rows, tables = run_benchmark(model, entries, settings, registry=registry)

    lines, flagged = spread_report(tables, entries)
    print("\n" + "\n".join(lines))
    flag_note = (f"spread (max - min) / median above {NOISY_SPREAD:.0%}, or cost-table times out of line with the "
                 f"MACs by more than {MAC_TOLERANCE:g}x, the machine was likely disturbed: "
                 + ", ".join(flagged) + "; rerun (--remeasure measures the cost-table entries again)")
    if flagged:
        print(f"warning: {flag_note}", file=sys.stderr)
    dtype = precision_name(opt.precision, device)
    fidelity_note = (" Fidelity columns compare with Original at the same seed; with random weights they are"
                     " NOT meaningful (printed only to show the pipeline)." if (opt.random_weights or opt.demo) else "")
    mode = "cost-table prediction only (no end-to-end sampling)" if opt.predict_only else (
        f"measured end to end, median of {opt.repeats} interleaved repeats after one untimed warm-up run each")
    note = (f"**{model_label}**, {opt.H}x{opt.W}, batch {opt.batch} (CFG scale {opt.scale}), {dtype}, "
            f"{device.type} ({hardware_name(device)}, {threads} threads), torch {torch.__version__}"
            f"{', channels-last' if opt.channels_last else ''}; {mode}"
            f"{f'; rows [{opt.compile}] torch.compile-d (compile s: their first run beyond a timed one)' if opt.compile != 'none' else ''}. "
            f"Seconds are sampling time per image (UNet loop, no text encoding or VAE).{fidelity_note}")
    markdown = render_markdown(rows, note)
    if flagged:
        markdown += f"\n\nFlagged: {flag_note}."
    if opt.diffusers:
        markdown += "\n\n" + diffusers_rows(opt, config, entries, rows)
    print("\n" + markdown)
    stem = opt.name or (f"bench-{'demo' if opt.demo else 'sd'}-{opt.H}x{opt.W}-{opt.steps}steps-{dtype}"
                        + ("-predicted" if opt.predict_only else ""))
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outdir / f"{stem}.md", markdown + "\n")
    environment = {"hardware": hardware_name(device), "device": device.type, "threads": threads,
                   "torch": torch.__version__, "python": platform.python_version(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "model": model_label, "precision": dtype, "H": opt.H, "W": opt.W, "batch": opt.batch,
                   "scale": opt.scale, "steps": opt.steps, "repeats": opt.repeats, "warmup_runs": 1,
                   "predict_only": opt.predict_only, "cost_table": str(cost_table), "compile": opt.compile,
                   "channels_last": opt.channels_last}
    tables_json = {str(k): v.to_dict() for k, v in tables.items()}
    atomic_write_text(outdir / f"{stem}.json", json.dumps({"environment": environment, "rows": rows,
                                                           "spread": lines, "cost_tables": tables_json}, indent=1))
    plot(rows, outdir / f"{stem}.png", note.split(";")[0])
    print(f"\nwrote {outdir / stem}.md, .json and .png; cost tables in {cost_table}")
    return 0


def diffusers_rows(opt, config, entries, rows) -> str:
    """The diffusers pipeline of the same architecture, timed here after the ldm rows: its original, DeepCache
    helper, DaTo's ratios on the helper's schedule, tomesd and DaTo (this run's DaTo strategy, or b1), interleaved,
    each with its full steps and fidelity to the original (PSNR unless --no-decode); a table with this path's
    original and DaTo rows beside them."""
    from ..diffusers_bench import compare, format_table

    dato = next((e for e in entries if e.method.component("dato") is not None), None)
    strategy = dato.method.patch_strategy(dato.steps) if dato is not None else DEFAULT_STRATEGY
    results = compare(steps=opt.steps, size=opt.H, strategy=strategy, repeats=opt.repeats, warmup=1,
                      guidance_scale=opt.scale, seed=opt.seed, decode=not opt.no_decode,
                      config_path=find_config(opt.config))
    lines = ["diffusers StableDiffusionPipeline, same architecture and random weights, "
             f"{opt.steps} DDIM steps (diffusers' scheduler of that config), prompt encoding included; fidelity "
             "against the original run with the same prompt and seed:", "",
             format_table(results), "", "This path (ldm, from the table above):", "",
             "| method | s/img | speed-up |", "| --- | --- | --- |"]
    for row in rows:
        if row["method"] == "original" or (dato is not None and row["method"] == dato.name):
            lines.append(f"| {row['method']} | {row['median_s']:.2f} | {row['speedup']:.2f}x |")
    return "\n".join(lines)


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
