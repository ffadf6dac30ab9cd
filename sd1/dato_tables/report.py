"""Render a table's results (results.md) and every table of the paper next to ours (scripts/tables/collect.py).

    python scripts/tables/collect.py $OUT_DIR                       # every table, ours from OUT_DIR
    python scripts/tables/collect.py $OUT_DIR/table1_imagenet_sd15 --out report.md

For an OUT_DIR, the report shows every table of the paper (Tables 1-6) in the specs' order, with our
numbers where OUT_DIR/<table>/rows.jsonl has them (empty cells where it does not), then any other table
folder found there; for a table folder, that table alone. A paper row the repo cannot produce says n/a in
the Ours column, with the reason under the table. Speed-up is always our baseline row's latency divided by
the row's, measured in the same run; the paper's latencies are from its GPU, ours from the run's device.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from datosd.strategy import Strategy, find_strategy

from .evaluation import FIELDS, metric_fields
from .paper import COLUMN_FIELDS, PaperTable, load_paper, paper_table
from .plan import default_rows
from .records import META, ROWS, read_table, speedups
from .spec import PAPER_FILE, Specs, StrategyTable, TableSpec, load_specs

# A column per record field (evaluation.METRIC_FIELDS), in this order.
METRIC_NAMES = {"accuracy": "Accuracy (%)", "accuracy_color": "Color (%)", "accuracy_shape": "Shape (%)",
                "accuracy_position": "Position (%)", "accuracy_count": "Count (%)", "fid": "FID", "clip": "CLIP",
                "is": "IS", "psnr": "PSNR (dB)", "latent_rms": "Latent error (%)"}
assert set(METRIC_NAMES) == set(FIELDS), "every record field needs its column name"
NOT_PRODUCED = "n/a"
SMOKE_NOTE = ("**Smoke run**: a random-weight model (the tiny demo model, or the table's model config) and "
              "random-init metric networks; the numbers only show that the pipeline runs end to end and mean nothing.")
LATENCY_NOTE = ("Latency: the sampler's UNet loop per image, as measured by the run (see each row's "
                "manifest.json); speed-up: the baseline row's latency over the row's.")
NO_PAPER_NOTE = "The paper has no numbers for this table: ours alone."
FIELD_NOTES = {
    "accuracy": "Accuracy: the shapes-world judge's prompt accuracy (the image shows the asked color, shape and "
                "position and nothing else); Color, Shape, Position: of the asked object; Count: one object found.",
    "psnr": "PSNR: of the images against the Original row's (same prompts and seeds), over all pixels; "
            "100 dB = identical. Latent error: RMS of the final latents' difference from the Original's, "
            "relative to the Original's RMS."}


def fmt(value: Optional[float], kind: str = "metric") -> str:
    if value is None:
        return ""
    if kind == "speedup":
        return f"{value:.2f}x"
    if kind == "latency":
        return f"{value:.3f}" if value >= 0.01 else f"{value:.2e}"
    if kind == "images":
        return str(int(value))
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def table_metrics(meta: Dict[str, Any], rows: List[Dict[str, Any]], extra: Sequence[str] = ()) -> List[str]:
    """The record fields to show: those of the table's metrics, `extra` ones and any a row holds."""
    wanted = set(metric_fields(meta.get("metrics") or ())) | set(extra)
    wanted |= {m for r in rows for m in METRIC_NAMES if r.get(m) is not None}
    return [m for m in METRIC_NAMES if m in wanted]


def results_table(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """Method | metrics | Latency | Speed-up | Images, rows in the order they were first recorded."""
    metrics = table_metrics(meta, rows)
    speed = speedups(rows)
    header = ["Method", *(METRIC_NAMES[m] for m in metrics), "Latency (s/img)", "Speed-up", "Images"]
    lines = [[r["label"], *(fmt(r.get(m)) for m in metrics), fmt(r.get("latency"), "latency"),
              fmt(speed[r["row"]], "speedup"), fmt(r.get("images"), "images")] for r in rows]
    return markdown(header, lines)


def field_notes(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> List[str]:
    """What the table's less common columns mean."""
    fields = table_metrics(meta, rows)
    return [note for field, note in FIELD_NOTES.items() if field in fields]


def render_results(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """results.md: the table alone."""
    parts = [f"# {meta.get('title', meta.get('table', 'results'))}", ""]
    if meta.get("smoke"):
        parts += [SMOKE_NOTE, ""]
    parts += [results_table(meta, rows), ""]
    if meta.get("setup"):
        parts += [f"Setup: {meta['setup']}" + (f"; device {meta['device']}" if meta.get("device") else ""), ""]
    if meta.get("fid_reference") and "fid" in (meta.get("metrics") or ()):
        parts += [f"FID reference: {meta['fid_reference']}", ""]
    parts += [note for note in field_notes(meta, rows) for note in (note, "")]
    inception = meta.get("inception")
    if inception:
        line = f"Inception weights: {inception['weights']}"
        if inception.get("weights_sha256"):
            line += f" ({inception['weights_path']}, sha256 {inception['weights_sha256']})"
        parts += [line, ""]
    return "\n".join(parts + [LATENCY_NOTE, ""])


# --- ours next to the paper's -----------------------------------------------------------------------------

def _reason(spec: TableSpec, key: str) -> str:
    reasons = spec.paper.reasons
    return reasons.get(key) or reasons.get("*") or "not produced here"


def _rows_layout(spec: TableSpec, table: PaperTable, meta, rows, defaults) -> Tuple[str, Dict[str, List[str]]]:
    """Paper rows in the paper's order, ours beside the row each faces, then our other rows."""
    paper_fields = {COLUMN_FIELDS[c]: c for c in table.columns}
    metrics = table_metrics(meta or {"metrics": spec.metrics}, rows, [f for f in paper_fields if f in METRIC_NAMES])
    header = ["Paper row", "Ours"]
    for m in metrics:
        header += [METRIC_NAMES[m]] + ([f"{METRIC_NAMES[m]} (paper)"] if m in paper_fields else [])
    header += ["Latency (s/img)", "Latency (paper)", "Speed-up", "Speed-up (paper)"]
    speed = speedups(rows)
    ours_by_key = {r["paper"]: r for r in rows if r.get("paper") in table.rows}
    default_by_key = {d["paper"]: d for d in defaults if d["paper"]}
    lines, missing = [], {}

    def cells(key: Optional[str], label: str, ours: Dict[str, Any]) -> List[str]:
        """One line: the paper row `key` (None: a row of ours alone) and our record `ours` beside it."""
        def paper(field: str) -> Optional[float]:
            return table.value(key, paper_fields[field]) if key and field in paper_fields else None

        out = [key or "", label]
        for m in metrics:
            out += [fmt(ours.get(m))] + ([fmt(paper(m))] if m in paper_fields else [])
        return out + [fmt(ours.get("latency"), "latency"), fmt(paper("latency")),
                      fmt(speed.get(ours.get("row")), "speedup"), fmt(paper("speedup"), "speedup")]

    for key in table.rows:
        ours = ours_by_key.get(key)
        if ours is not None:
            label = ours["label"]
        elif key in default_by_key:
            label = default_by_key[key]["label"]
        else:
            label = NOT_PRODUCED
            missing.setdefault(_reason(spec, key), []).append(key)
        lines.append(cells(key, label, ours or {}))
    lines += [cells(None, r["label"], r) for r in rows if r.get("paper") not in ours_by_key or
              ours_by_key[r["paper"]] is not r]
    return markdown(header, lines), missing


def _matrix_layout(spec: TableSpec, table: PaperTable, meta, rows, defaults) -> Tuple[str, Dict[str, List[str]]]:
    """Rows = prune ratios; the paper's columns, then ours (filled by rows with a `cell`); then our rows
    that are in no cell (recorded, or the table's rows not run yet)."""
    link = spec.paper
    in_cells = {tuple(r["cell"]): r for r in rows if r.get("cell")}
    keys = sorted({*table.rows, *(k for k, _ in in_cells)}, key=float)
    header = ["Prune ratio", *(f"{c} (paper)" for c in table.columns), *link.columns.values()]
    lines = [[k, *(fmt(table.value(k, c)) for c in table.columns),
              *(fmt(in_cells.get((k, c), {}).get(link.metric)) for c in link.columns)] for k in keys]
    parts = [markdown(header, lines)]
    recorded = {r["row"] for r in rows}
    others = [r for r in rows if not r.get("cell")]
    others += [{"row": d["id"], "label": d["label"]} for d in defaults if not d["cell"] and d["id"] not in recorded]
    if others:
        parts += ["", "Our rows outside the matrix:", "", results_table(meta, others)]
    columns = ", ".join(table.columns)
    return "\n".join(parts), {_reason(spec, "*"): [f"paper columns {columns}"]}


def render_comparison(specs: Specs, spec: TableSpec, paper: Dict[str, Any], meta: Dict[str, Any],
                      rows: List[Dict[str, Any]]) -> str:
    """One table: ours and the paper's numbers side by side (ours alone when the paper has no such table)."""
    parts = [f"## {spec.title}", ""]
    if meta.get("smoke"):
        parts += [SMOKE_NOTE, ""]
    if spec.paper is None:
        recorded = {r["row"] for r in rows}
        shown = rows + [{"row": d["id"], "label": d["label"]} for d in default_rows(specs, spec)
                        if d["id"] not in recorded]  # rows not run yet: empty cells
        meta_or_spec = meta or {"metrics": spec.metrics}
        body, missing = results_table(meta_or_spec, shown), {}
        notes = [NO_PAPER_NOTE, *field_notes(meta_or_spec, shown)]
    else:
        parts += [f"Paper: `{spec.paper.table}` of the paper's numbers.", ""]
        table = paper_table(paper, spec.paper.table)
        if spec.paper.layout == "matrix":
            body, missing = _matrix_layout(spec, table, meta or {"metrics": spec.metrics}, rows,
                                           default_rows(specs, spec))
        else:
            body, missing = _rows_layout(spec, table, meta, rows, default_rows(specs, spec))
        notes = list(spec.paper.notes)
    parts += [body, ""]
    if meta.get("setup"):
        parts += [f"Ours: {meta['setup']}.", ""]
    notes += [f"{NOT_PRODUCED}: {', '.join(keys)}: {reason}" for reason, keys in missing.items()]
    parts += [f"- {note}" for note in notes] + ([""] if notes else [])
    return "\n".join(parts)


def render_strategy(table: StrategyTable, paper: Dict[str, Any]) -> str:
    """Table 6: the strategy as printed, in sampler-step order, and which reading the shipped file holds."""
    printed = paper[table.key]
    depth, ratio = list(printed["cache_depth"]), [float(r) for r in printed["prune_ratio"]]
    path = find_strategy(table.shipped)
    shipped = Strategy.load(path)
    step_order = (depth[::-1], ratio[::-1])
    readings = {"read right to left, in sampler-step order as DATO_SPEC section 1 reads it": step_order,
                "read left to right, as printed (DATO_SPEC section 1 reads it right to left: column \"Timestep "
                "i\" is sampler step i)": (depth, ratio)}
    found = [name for name, (d, r) in readings.items()
             if list(shipped.cache_depth) == d and [float(x) for x in shipped.prune_ratio] == r]
    where = f"`{table.shipped}` (configs/dato/{path.name})"
    verdict = (f"The shipped strategy {where} is Table 6 {found[0]}." if found
               else f"The shipped strategy {where} matches neither reading of Table 6.")
    return "\n".join([
        f"## {table.title}", "", "As printed (columns \"Timestep 49, 48, ..., 0\", left to right):", "", "```",
        f"cache_depth: {depth}", f"prune_ratio: {ratio}", "```", "",
        "In sampler-step order (the table read right to left; step 0 always computes everything):", "", "```",
        f"cache_depth: {step_order[0]}", f"prune_ratio: {step_order[1]}", "```", "", verdict, ""])


def render_report(specs: Specs, paper: Dict[str, Any], tables: Dict[str, Tuple[Dict[str, Any], List[Dict]]],
                  others: Sequence[Tuple[Dict[str, Any], List[Dict]]] = (), all_tables: bool = True) -> str:
    """The report: every spec table (or those in `tables` when not all_tables), Table 6, other tables."""
    parts = ["# DaTo reproduction: our numbers and the paper's", "",
             f"Paper numbers: {specs.paper_source}. {LATENCY_NOTE} "
             f"{NOT_PRODUCED}: not produced here (reasons under each table); an empty cell: not run yet.", ""]
    for key, spec in specs.tables.items():
        if all_tables or key in tables:
            meta, rows = tables.get(key, ({}, []))
            parts.append(render_comparison(specs, spec, paper, meta, rows))
    if all_tables:
        parts += [render_strategy(t, paper) for t in specs.strategies.values()]
    for meta, rows in others:
        parts += [f"## {meta.get('title', meta.get('table', 'table'))}", "", results_table(meta, rows), ""]
    return "\n".join(parts)


def find_results(paths: Sequence[str], specs: Specs):
    """({spec table key: (meta, rows)}, [(meta, rows) of other tables], whether an OUT_DIR was given)."""
    found, others, out_dir_given = {}, [], False
    for p in map(Path, paths):
        if p.is_file():
            p = p.parent
        if not p.is_dir():
            raise FileNotFoundError(f"no such results folder or file: {p}")
        if (p / ROWS).is_file() or (p / META).is_file():
            folders = [p]
        else:
            out_dir_given = True
            folders = sorted(q.parent for q in p.glob(f"*/{ROWS}"))
        for folder in folders:
            meta, rows = read_table(folder)
            key = meta.get("table", folder.name)
            if key in specs.tables:
                found[key] = (meta, rows)
            else:
                others.append((meta, rows))
    return found, others, out_dir_given


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="OUT_DIR, a table folder, or its results.md / rows.jsonl")
    p.add_argument("--paper", type=Path, default=PAPER_FILE, help="the paper's numbers (YAML)")
    p.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = p.parse_args(argv)
    specs = load_specs()
    try:
        found, others, out_dir_given = find_results(args.results, specs)
        paper = load_paper(args.paper)
        report = render_report(specs, paper, found, others, all_tables=out_dir_given)
    except (OSError, KeyError, ValueError) as err:
        print(f"collect.py: {err}", file=sys.stderr)
        return 2
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


def cli() -> int:
    return main()
