"""The settings of a table run: the command-line options, each setting's value (option > --smoke value >
environment > the table's default > the default), and the method rows with their templates filled in."""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .evaluation import METRICS
from .spec import RowTemplate, SettingSpec, Specs, TableSpec


@dataclass(frozen=True)
class Options:
    """The command-line options of a table run (None: not given; numbers as typed, checked as settings)."""

    smoke: bool = False
    dry_run: bool = False
    out: Optional[str] = None
    nproc: Optional[str] = None
    limit: Optional[str] = None
    batch_size: Optional[str] = None
    rows: Optional[Tuple[str, ...]] = None


def _bounds_problem(s: SettingSpec, value: float) -> Optional[str]:
    if s.min is not None and value < s.min:
        return f"at least {s.min:g}"
    if s.max is not None and value > s.max:
        return f"at most {s.max:g}"
    if s.below is not None and value >= s.below:
        return f"below {s.below:g}"
    return None


def parse_setting(s: SettingSpec, raw: Any) -> Any:
    """A setting's value from its text (environment) or YAML value; ValueError says what is expected."""
    if raw is None or raw == "":
        return None
    if s.type == "int":
        if isinstance(raw, bool) or not str(raw).strip().isdigit() or (s.min and int(raw) < s.min):
            raise ValueError("must be a positive integer" if s.min and s.min >= 1 else
                             f"must be an integer of at least {s.min or 0:g}")
        value = int(raw)
    elif s.type == "float":
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
    elif s.type == "floats":
        items = raw if isinstance(raw, list) else str(raw).replace(",", " ").split()
        try:
            value = [float(x) for x in items]
        except ValueError:
            value = []
        if not value or not all(math.isfinite(x) for x in value):
            raise ValueError("must be a list of numbers, e.g. \"0.4 0.5\"")
        for x in value:
            if (why := _bounds_problem(s, x)) is not None:
                raise ValueError(f"each value must be {why}")
        return value
    elif s.type == "choice":
        if raw not in s.choices:
            raise ValueError(f"must be one of {', '.join(s.choices)}")
        return raw
    elif s.type == "metrics":
        value = tuple(m.strip() for m in str(raw).split(",") if m.strip())
        unknown = [m for m in value if m not in METRICS]
        if unknown or not value:
            raise ValueError(f"must be a comma-separated subset of {','.join(METRICS)}")
        return tuple(m for m in METRICS if m in value)
    elif s.type == "strategy":
        if any(c in str(raw) for c in ",+"):
            raise ValueError("may not contain ',' or '+' (rename the file)")
        return str(raw)
    elif s.type == "extra_rows":
        value = []
        for item in str(raw).split():
            name, sep, strategy = item.partition("=")
            if not sep or not name or not strategy or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError("must be \"name=strategy ...\" (a shipped name or a YAML file each)")
            value.append((name, strategy))
        return value
    else:
        return str(raw)
    if (why := _bounds_problem(s, value)) is not None:
        raise ValueError(f"must be {why}")
    return value


def resolve_settings(specs: Specs, spec: TableSpec, options: Options, env: Mapping[str, str],
                     problems: List[str]) -> Dict[str, Any]:
    """name -> value for every setting the table reads (option > smoke > environment > table default >
    default)."""
    given = {"nproc": options.nproc, "limit": options.limit, "batch_size": options.batch_size}
    values: Dict[str, Any] = {}
    for name in (*specs.common_settings, *spec.settings):
        s = specs.settings[name]
        try:
            if given.get(name) is not None:
                value = parse_setting(s, given[name])
            elif options.smoke and s.smoke is not None:
                value = parse_setting(s, s.smoke)
            elif env.get(s.env):
                value = parse_setting(s, env[s.env])
            else:
                value = parse_setting(s, spec.defaults.get(name, s.default))
        except ValueError as err:
            where = f"{s.option}/{s.env}" if s.option else s.env
            problems.append(f"{where} {err}, got {given.get(name) or env.get(s.env)!r}")
            value = parse_setting(s, spec.defaults.get(name, s.default))
        values[name] = value
    return values


def template_values(values: Mapping[str, Any]) -> Dict[str, str]:
    """The settings as template text: numbers as :g writes them; derived {dato_name}."""
    out = {}
    for name, value in values.items():
        out[name] = f"{value:g}" if isinstance(value, float) else str(value)
    if "dato_strategy" in values:
        strategy = values["dato_strategy"]
        out["dato_name"] = Path(strategy).stem if strategy.endswith((".yaml", ".yml")) else strategy
    return out


def expand_rows(templates: Sequence[RowTemplate], text: Mapping[str, str],
                values: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Fill the row templates (for_each rows once per value of their list setting)."""
    rows = []
    for t in templates:
        if t.for_each is not None:
            var, setting = t.for_each
            for item in values[setting]:
                item_text = f"{item:g}" if isinstance(item, float) else str(item)
                rows += expand_rows(t.rows, {**text, var: item_text}, values)
            continue
        rows.append({"id": t.id.format_map(text), "label": t.label.format_map(text),
                     "method": t.method.format_map(text), "baseline": t.baseline,
                     "paper": t.paper.format_map(text) if t.paper else None,
                     "cell": tuple(c.format_map(text) for c in t.cell) if t.cell else None})
    return rows
