"""Record one method row of a table: latency from the samples' manifest.json, metrics from eval_fid.py's
results file; then rewrite the table's results.md. A row id that is already there is replaced, so
re-running a table script updates its rows instead of repeating them.

    python scripts/tables/add_row.py --table-dir OUT/table1_imagenet_sd15 --table table1_imagenet_sd15 \
        --title "..." --row dato_b1 --label "DaTo b1" --samples OUT/.../images --metrics-file OUT/.../metrics.jsonl
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect import META, RESULTS, METRIC_NAMES, read_rows, render_results, write_rows  # noqa: E402


def read_metrics(path):
    """metric name -> value: the last record of each metric in an eval_fid.py --results file."""
    values = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            values[rec["metric"]] = rec["value"]
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-dir", required=True, type=Path)
    p.add_argument("--table", required=True, help="table id (the key in paper_numbers.yaml)")
    p.add_argument("--title", required=True)
    p.add_argument("--setup", default="", help="one line on the settings (shown under the table)")
    p.add_argument("--metrics", default="fid", help="the metrics the table reports (comma-separated)")
    p.add_argument("--row", required=True, help="row id (the key in paper_numbers.yaml)")
    p.add_argument("--label", required=True, help="method name shown in the table")
    p.add_argument("--samples", required=True, type=Path, help="the row's image folder (with manifest.json)")
    p.add_argument("--metrics-file", required=True, type=Path, help="eval_fid.py --results file of the row")
    p.add_argument("--baseline", action="store_true", help="this is the Original row (speed-up 1x)")
    p.add_argument("--smoke", action="store_true", help="the table is a --smoke run")
    args = p.parse_args(argv)

    manifest_path = args.samples / "manifest.json"
    problems = [f"{path} not found" for path in (manifest_path, args.metrics_file) if not path.is_file()]
    if problems:
        print("add_row.py: " + "; ".join(problems), file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    metrics = read_metrics(args.metrics_file)
    record = {"table": args.table, "row": args.row, "label": args.label, "baseline": args.baseline,
              **{m: metrics.get(m) for m in METRIC_NAMES},
              "latency": manifest.get("seconds_per_image"), "images": manifest.get("count"),
              "method": manifest.get("method"), "samples": str(args.samples)}

    args.table_dir.mkdir(parents=True, exist_ok=True)
    meta = {"table": args.table, "title": args.title, "setup": args.setup, "smoke": args.smoke,
            "metrics": [m.strip() for m in args.metrics.split(",") if m.strip()]}
    (args.table_dir / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _, rows = read_rows(args.table_dir)
    if args.baseline:
        for r in rows:
            r["baseline"] = False
    for i, r in enumerate(rows):
        if r["row"] == args.row:
            rows[i] = record
            break
    else:
        rows.append(record)
    write_rows(args.table_dir, rows)
    (args.table_dir / RESULTS).write_text(render_results(meta, rows), encoding="utf-8")
    shown = ", ".join(f"{METRIC_NAMES[m]} {record[m]:.4g}" for m in METRIC_NAMES if record[m] is not None)
    print(f"row {args.row} ({args.label}): {shown}, latency {record['latency']} s/img -> {args.table_dir / RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
