"""The table specs (data/tables.yaml) as typed values: settings, models, datasets, metric files, tables.

Nothing here reads the environment or resolves a template: `plan.py` does that for one run.
"""
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from sdgen.runtime import UsageError


def packaged_data(name: str) -> Path:
    """A file shipped in dato_tables/data (the specs, the paper's numbers)."""
    return Path(str(files("dato_tables") / "data" / name))


TABLES_FILE = packaged_data("tables.yaml")
PAPER_FILE = packaged_data("paper-tables.yaml")
MODEL_KINDS = ("ldm", "sgm")
PATH_KINDS = ("file", "dir", "any")
SETTING_TYPES = ("int", "float", "floats", "choice", "text", "metrics", "strategy", "extra_rows")
LAYOUTS = ("rows", "matrix")


class SpecError(ValueError):
    """tables.yaml is malformed (a bug in the shipped data, or in a user's copy of it)."""


@dataclass(frozen=True)
class SettingSpec:
    """One tunable value of a table run, read from environment variable `env` (or command-line `option`)."""

    name: str
    env: str
    type: str
    default: Any = None
    smoke: Any = None
    help: str = ""
    option: Optional[str] = None
    min: Optional[float] = None
    max: Optional[float] = None
    below: Optional[float] = None
    choices: Tuple[str, ...] = ()


@dataclass(frozen=True)
class PathNeed:
    """An input path a run needs, from environment variable `env`; `kind` is file, dir or any.
    `default_env`: another variable whose value is the default (I2I_REF defaults to I2I_INIT_DIR);
    `default_packaged`: the default is this file shipped with sdgen (`sdgen.resources.packaged`)."""

    env: str
    kind: str
    help: str
    default_env: Optional[str] = None
    default_packaged: Optional[str] = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    checkpoint: PathNeed
    config_env: str
    config_default: str
    size: int
    smoke_config: Optional[str] = None  # --smoke runs this config with seeded random weights (default: the
    # tiny demo model of the kind)


@dataclass(frozen=True)
class GeneratedSpec:
    """An FID reference made in-process: `generator` (a name of dato_tables.evaluation.GENERATORS) draws one
    image per image of a row, of its prompt, with `seed`."""

    generator: str
    seed: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    """A prompt set (`packaged` prompt list or `prompts` file) or an img2img set (`init_images` + `prompts`).
    The FID reference is a path (`reference`) or made in-process (`generated`)."""

    name: str
    reference: Optional[PathNeed]
    packaged: Optional[str] = None
    prompts: Optional[PathNeed] = None
    init_images: Optional[PathNeed] = None
    repeats: int = 1
    generated: Optional[GeneratedSpec] = None

    @property
    def is_img2img(self) -> bool:
        return self.init_images is not None


@dataclass(frozen=True)
class MetricFile:
    need: PathNeed
    metrics: Tuple[str, ...]


@dataclass(frozen=True)
class RowTemplate:
    """A method row before its templates are filled; `for_each` = (variable, list setting) repeats `rows`."""

    id: str = ""
    label: str = ""
    method: str = ""
    baseline: bool = False
    paper: Optional[str] = None
    cell: Optional[Tuple[str, str]] = None
    for_each: Optional[Tuple[str, str]] = None
    rows: Tuple["RowTemplate", ...] = ()


@dataclass(frozen=True)
class PaperLink:
    """Where a table's numbers are in paper-tables.yaml (dotted key) and how they face ours.

    layout 'rows': one paper row per method, matched by a row's `paper` key. layout 'matrix': rows are prune
    ratios, columns the paper's settings of `metric`; our rows fill our own `columns` through their `cell`.
    reasons: why a paper row is not produced here ('*' = any row not named).
    """

    table: str
    layout: str = "rows"
    metric: Optional[str] = None
    columns: Mapping[str, str] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()


@dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    about: str
    model: str
    dataset: str
    sampler: str
    metrics: Tuple[str, ...]
    rows: Tuple[RowTemplate, ...]
    settings: Tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    extra_rows: Optional[str] = None
    paper: Optional[PaperLink] = None


@dataclass(frozen=True)
class StrategyTable:
    key: str
    title: str
    shipped: str


@dataclass(frozen=True)
class Alias:
    """A name that picks one of several tables by an environment variable."""

    env: str
    default: str
    tables: Mapping[str, str]


@dataclass(frozen=True)
class Specs:
    paper_source: str
    settings: Mapping[str, SettingSpec]
    common_settings: Tuple[str, ...]
    models: Mapping[str, ModelSpec]
    datasets: Mapping[str, DatasetSpec]
    metric_files: Mapping[str, MetricFile]
    tables: Mapping[str, TableSpec]
    strategies: Mapping[str, StrategyTable]
    aliases: Mapping[str, Alias]
    groups: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)

    def table(self, name: str, env: Mapping[str, str]) -> TableSpec:
        """The table `name` (or the one an alias picks from `env`); UsageError for an unknown name."""
        alias = self.aliases.get(name)
        if alias is not None:
            choice = env.get(alias.env) or alias.default
            if choice not in alias.tables:
                raise UsageError(f"{alias.env}={choice}: {name} runs one of {', '.join(alias.tables)}")
            name = alias.tables[choice]
        if name not in self.tables:
            raise UsageError(f"unknown table {name!r}; tables: {', '.join(self.names)}")
        return self.tables[name]

    @property
    def names(self) -> Tuple[str, ...]:
        """Every name `python -m dato_tables NAME` takes: tables, aliases, groups."""
        return (*self.tables, *self.aliases, *self.groups)


def _fields(data: Any, where: str, required: Tuple[str, ...], optional: Tuple[str, ...] = ()) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {data!r}")
    missing = [k for k in required if k not in data]
    unknown = sorted(set(data) - set(required) - set(optional))
    if missing or unknown:
        raise SpecError(f"{where}: missing {missing}, unknown {unknown}")
    return data


def _need(data: Any, where: str) -> PathNeed:
    d = _fields(data, where, ("env", "type", "help"), ("default_env", "default_packaged"))
    if d["type"] not in PATH_KINDS:
        raise SpecError(f"{where}: type must be one of {PATH_KINDS}")
    return PathNeed(d["env"], d["type"], " ".join(d["help"].split()), d.get("default_env"),
                    d.get("default_packaged"))


def _setting(name: str, data: Any) -> SettingSpec:
    d = _fields(data, f"settings.{name}", ("env", "type", "help"),
                ("default", "smoke", "option", "min", "max", "below", "choices"))
    if d["type"] not in SETTING_TYPES:
        raise SpecError(f"settings.{name}: type must be one of {SETTING_TYPES}")
    return SettingSpec(name=name, env=d["env"], type=d["type"], default=d.get("default"), smoke=d.get("smoke"),
                       help=d["help"], option=d.get("option"), min=d.get("min"), max=d.get("max"),
                       below=d.get("below"), choices=tuple(d.get("choices") or ()))


def _rows(items: Any, where: str, row_sets: Mapping[str, Any]) -> Tuple[RowTemplate, ...]:
    """The row templates of `items`, an item `{include: SET}` replaced by the rows of row_sets[SET]."""
    rows = []
    for item in items:
        if isinstance(item, dict) and "include" in item:
            name = _fields(item, where, ("include",))["include"]
            if name not in row_sets:
                raise SpecError(f"{where}: no row set {name!r} (row sets: {', '.join(row_sets)})")
            rows += _rows(row_sets[name], f"row_sets.{name}", row_sets)
        else:
            rows.append(_row(item, where, row_sets))
    return tuple(rows)


def _row(data: Any, where: str, row_sets: Mapping[str, Any]) -> RowTemplate:
    if isinstance(data, dict) and "for_each" in data:
        d = _fields(data, where, ("for_each", "rows"))
        ((var, setting),) = d["for_each"].items()
        return RowTemplate(for_each=(var, setting), rows=_rows(d["rows"], f"{where}.rows", row_sets))
    d = _fields(data, where, ("id", "label", "method"), ("baseline", "paper", "cell"))
    cell = tuple(d["cell"]) if d.get("cell") is not None else None
    if cell is not None and len(cell) != 2:
        raise SpecError(f"{where}: cell is [matrix row, column]")
    return RowTemplate(id=str(d["id"]), label=d["label"], method=d["method"], baseline=bool(d.get("baseline")),
                       paper=d.get("paper"), cell=cell)


def _paper_link(data: Any, where: str) -> PaperLink:
    d = _fields(data, where, ("table",), ("layout", "metric", "columns", "reasons", "notes"))
    layout = d.get("layout", "rows")
    if layout not in LAYOUTS or (layout == "matrix") != ("metric" in d):
        raise SpecError(f"{where}: layout rows, or layout matrix with its metric")
    return PaperLink(table=d["table"], layout=layout, metric=d.get("metric"), columns=dict(d.get("columns") or {}),
                     reasons={k: " ".join(v.split()) for k, v in (d.get("reasons") or {}).items()},
                     notes=tuple(" ".join(n.split()) for n in d.get("notes") or ()))


def _table(key: str, data: Any, specs: Dict[str, Any]) -> TableSpec:
    where = f"tables.{key}"
    d = _fields(data, where, ("title", "about", "model", "dataset", "sampler", "metrics", "rows"),
                ("settings", "defaults", "extra_rows", "paper"))
    if d["model"] not in specs["models"] or d["dataset"] not in specs["datasets"]:
        raise SpecError(f"{where}: unknown model {d['model']!r} or dataset {d['dataset']!r}")
    names = (*specs["common_settings"], *d.get("settings", ()))
    unknown = [n for n in (*names, *d.get("defaults", {})) if n not in specs["settings"]]
    if unknown:
        raise SpecError(f"{where}: unknown settings {unknown}")
    return TableSpec(key=key, title=d["title"], about=" ".join(d["about"].split()), model=d["model"],
                     dataset=d["dataset"], sampler=d["sampler"], metrics=tuple(d["metrics"]),
                     rows=_rows(d["rows"], f"{where}.rows", specs["row_sets"]), settings=tuple(d.get("settings", ())),
                     defaults=dict(d.get("defaults") or {}), extra_rows=d.get("extra_rows"),
                     paper=_paper_link(d["paper"], f"{where}.paper") if d.get("paper") else None)


def load_specs(path=TABLES_FILE) -> Specs:
    """Read and check tables.yaml; SpecError names the first problem."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    d = _fields(raw, str(path), ("paper_source", "settings", "common_settings", "models", "datasets",
                                 "metric_files", "tables"),
                ("row_sets", "paper_reasons", "strategies", "aliases", "groups"))
    parsed: Dict[str, Any] = {"common_settings": tuple(d["common_settings"]), "row_sets": d.get("row_sets") or {}}
    parsed["settings"] = {name: _setting(name, s) for name, s in d["settings"].items()}
    parsed["models"] = {}
    for name, m in d["models"].items():
        m = _fields(m, f"models.{name}", ("kind", "checkpoint", "config", "size"), ("smoke_config",))
        if m["kind"] not in MODEL_KINDS:
            raise SpecError(f"models.{name}: kind must be one of {MODEL_KINDS}")
        config = _fields(m["config"], f"models.{name}.config", ("env", "default"))
        parsed["models"][name] = ModelSpec(name, m["kind"], _need(m["checkpoint"], f"models.{name}.checkpoint"),
                                           config["env"], config["default"], int(m["size"]), m.get("smoke_config"))
    parsed["datasets"] = {}
    for name, s in d["datasets"].items():
        where = f"datasets.{name}"
        s = _fields(s, where, ("prompts", "reference"), ("repeats", "init_images"))
        prompts, reference = s["prompts"], s["reference"]
        packaged = prompts.get("packaged") if isinstance(prompts, dict) else None
        generated = None
        if isinstance(reference, dict) and "generated" in reference:
            g = _fields(reference, f"{where}.reference", ("generated",), ("seed",))
            generated = GeneratedSpec(str(g["generated"]), int(g.get("seed", 0)))
        parsed["datasets"][name] = DatasetSpec(
            name=name, reference=None if generated else _need(reference, f"{where}.reference"), generated=generated,
            packaged=packaged,
            prompts=None if packaged else _need(prompts, f"{where}.prompts"),
            init_images=_need(s["init_images"], f"{where}.init_images") if "init_images" in s else None,
            repeats=int(s.get("repeats", 1)))
    parsed["metric_files"] = {}
    for name, f in d["metric_files"].items():
        f = dict(f)
        metrics = tuple(f.pop("metrics", ()))
        parsed["metric_files"][name] = MetricFile(_need(f, f"metric_files.{name}"), metrics)
    parsed["tables"] = {key: _table(key, t, parsed) for key, t in d["tables"].items()}
    strategies = {}
    for key, s in (d.get("strategies") or {}).items():
        s = _fields(s, f"strategies.{key}", ("title", "shipped"))
        strategies[key] = StrategyTable(key, s["title"], s["shipped"])
    aliases = {}
    for name, a in (d.get("aliases") or {}).items():
        a = _fields(a, f"aliases.{name}", ("env", "default", "tables"))
        if any(t not in parsed["tables"] for t in a["tables"].values()):
            raise SpecError(f"aliases.{name}: unknown table in {a['tables']}")
        aliases[name] = Alias(a["env"], a["default"], dict(a["tables"]))
    groups = {}
    for name, tables in (d.get("groups") or {}).items():
        if not tables or any(t not in parsed["tables"] for t in tables) or name in parsed["tables"]:
            raise SpecError(f"groups.{name}: a list of known tables, named unlike any table (got {tables})")
        groups[name] = tuple(tables)
    return Specs(paper_source=" ".join(d["paper_source"].split()), settings=parsed["settings"],
                 common_settings=parsed["common_settings"], models=parsed["models"], datasets=parsed["datasets"],
                 metric_files=parsed["metric_files"], tables=parsed["tables"], strategies=strategies,
                 aliases=aliases, groups=groups)
