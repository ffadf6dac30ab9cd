"""Render the table scripts' results next to the numbers the DaTo paper reports.

    python scripts/tables/collect.py $OUT_DIR                       # every table under OUT_DIR
    python scripts/tables/collect.py $OUT_DIR/table1_imagenet_sd15 --out report.md

Each table script keeps, in OUT_DIR/<table>/, `rows.jsonl` (one record per method row, rewritten when a
row is re-run) and `results.md` (that table alone, made from rows.jsonl). This script reads those records
and prints, per table, our value and the paper's (scripts/tables/paper_numbers.yaml) side by side, rows in
the paper's order, then any row the paper does not have. A blank paper cell means the number is not
restated in paper_numbers.yaml (fill it in from the paper), never that the paper reports nothing.
Speed-up is always the Original row's latency divided by the row's, measured in the same run.
"""
import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PAPER_NUMBERS = HERE / "paper_numbers.yaml"
ROWS = "rows.jsonl"
META = "table.json"
RESULTS = "results.md"
METRIC_NAMES = {"fid": "FID", "clip": "CLIP", "is": "IS"}
SMOKE_NOTE = ("**Smoke run**: tiny random-weight demo model and random-init metric networks; the numbers only "
              "show that the pipeline runs end to end and mean nothing.")


def read_rows(table_dir):
    """(meta dict, list of row records in the order they were first added)."""
    table_dir = Path(table_dir)
    meta = json.loads((table_dir / META).read_text(encoding="utf-8")) if (table_dir / META).is_file() else {}
    rows = []
    if (table_dir / ROWS).is_file():
        for line in (table_dir / ROWS).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return meta, rows


def write_rows(table_dir, rows):
    path = Path(table_dir) / ROWS
    tmp = path.with_name(f".{ROWS}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def speedups(rows):
    """row id -> Original latency / row latency (None without a timed baseline row)."""
    base = next((r for r in rows if r.get("baseline")), None)
    base_latency = base.get("latency") if base else None
    out = {}
    for r in rows:
        lat = r.get("latency")
        out[r["row"]] = base_latency / lat if base_latency and lat else None
    return out


def fmt(value, kind):
    if value is None:
        return ""
    if kind == "speedup":
        return f"{value:.2f}x"
    if kind == "latency":
        return f"{value:.3f}" if value >= 0.01 else f"{value:.2e}"
    if kind == "images":
        return str(int(value))
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"


def table_metrics(meta, rows):
    metrics = list(meta.get("metrics") or [])
    for r in rows:
        for m in METRIC_NAMES:
            if r.get(m) is not None and m not in metrics:
                metrics.append(m)
    return [m for m in METRIC_NAMES if m in metrics]


def markdown(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def render_results(meta, rows):
    """The table alone (results.md): Method, metrics, latency, speed-up vs the Original row, images."""
    metrics = table_metrics(meta, rows)
    speed = speedups(rows)
    header = ["Method", *(METRIC_NAMES[m] for m in metrics), "Latency (s/img)", "Speed-up", "Images"]
    lines = [[r["label"], *(fmt(r.get(m), m) for m in metrics), fmt(r.get("latency"), "latency"),
              fmt(speed[r["row"]], "speedup"), fmt(r.get("images"), "images")] for r in rows]
    parts = [f"# {meta.get('title', meta.get('table', 'results'))}", ""]
    if meta.get("smoke"):
        parts += [SMOKE_NOTE, ""]
    parts += [markdown(header, lines), ""]
    if meta.get("setup"):
        parts += [f"Setup: {meta['setup']}", ""]
    parts += ["Latency: the sampler's UNet loop per image, as measured by the run (see each row's manifest.json); "
              "speed-up: the Original row's latency over the row's.", ""]
    return "\n".join(parts)


def load_paper(path):
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return data


def render_comparison(meta, rows, paper_table):
    """Ours and the paper's numbers side by side, rows in the paper's order."""
    paper_table = paper_table or {}
    paper_rows = paper_table.get("rows") or []
    metrics = table_metrics(meta, rows)
    for pr in paper_rows:
        for m in METRIC_NAMES:
            if pr.get(m) is not None and m not in metrics:
                metrics.append(m)
    metrics = [m for m in METRIC_NAMES if m in metrics]
    speed = speedups(rows)
    ours = {r["row"]: r for r in rows}
    order = [pr["row"] for pr in paper_rows] + [r["row"] for r in rows if r["row"] not in
                                                  {pr["row"] for pr in paper_rows}]
    paper_by_row = {pr["row"]: pr for pr in paper_rows}
    header = ["Method"]
    for m in metrics:
        header += [METRIC_NAMES[m], f"{METRIC_NAMES[m]} (paper)"]
    header += ["Latency (s/img)", "Speed-up", "Speed-up (paper)"]
    lines = []
    for row in order:
        r, pr = ours.get(row, {}), paper_by_row.get(row, {})
        label = r.get("label") or pr.get("method") or row
        cells = [label]
        for m in metrics:
            cells += [fmt(r.get(m), m), fmt(pr.get(m), m)]
        cells += [fmt(r.get("latency"), "latency"), fmt(speed.get(row), "speedup"), fmt(pr.get("speedup"), "speedup")]
        lines.append(cells)
    title = meta.get("title") or paper_table.get("caption") or meta.get("table", "table")
    parts = [f"## {title}", ""]
    if paper_table.get("caption"):
        parts += [f"Paper: {paper_table['caption']}", ""]
    if meta.get("smoke"):
        parts += [SMOKE_NOTE, ""]
    parts += [markdown(header, lines), ""]
    for note in paper_table.get("notes") or []:
        parts.append(f"- {note}")
    if paper_table.get("notes"):
        parts.append("")
    return "\n".join(parts)


def find_tables(paths):
    """Table folders (holding rows.jsonl) given folders, results.md / rows.jsonl files, or a parent folder."""
    found = []
    for p in map(Path, paths):
        if p.is_file():
            p = p.parent
        if not p.is_dir():
            raise FileNotFoundError(f"no such results folder or file: {p}")
        if (p / ROWS).is_file():
            found.append(p)
        else:
            found += sorted(q.parent for q in p.glob(f"*/{ROWS}"))
    if not found:
        raise FileNotFoundError(f"no {ROWS} under {', '.join(map(str, paths))}: run a table script first")
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="OUT_DIR, a table folder, or its results.md / rows.jsonl")
    p.add_argument("--paper", type=Path, default=PAPER_NUMBERS, help="the paper's numbers (YAML)")
    p.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = p.parse_args(argv)
    try:
        tables = find_tables(args.results)
        paper = load_paper(args.paper)
    except (FileNotFoundError, yaml.YAMLError) as err:
        print(f"collect.py: {err}", file=sys.stderr)
        return 2
    parts = ["# DaTo reproduction: our numbers and the paper's", ""]
    if paper.get("source"):
        parts += [f"Paper numbers from {paper['source']} (file {args.paper.name}).", ""]
    for table_dir in tables:
        meta, rows = read_rows(table_dir)
        table_id = meta.get("table", table_dir.name)
        parts.append(render_comparison(meta, rows, (paper.get("tables") or {}).get(table_id)))
    report = "\n".join(parts)
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
