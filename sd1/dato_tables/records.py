"""A table's results on disk: OUT_DIR/<table>/table.json (what the table is), rows.jsonl (one record per
method row, replaced when the row is re-run) and results.md (made from them)."""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sdgen.images import atomic_write_text

META = "table.json"
ROWS = "rows.jsonl"
RESULTS = "results.md"


def read_table(table_dir) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(meta, row records in the order they were first added); empty when nothing was recorded."""
    table_dir = Path(table_dir)
    meta = json.loads((table_dir / META).read_text(encoding="utf-8")) if (table_dir / META).is_file() else {}
    rows = []
    if (table_dir / ROWS).is_file():
        rows = [json.loads(line) for line in (table_dir / ROWS).read_text(encoding="utf-8").splitlines()
                if line.strip()]
    return meta, rows


def record_row(table_dir, meta: Dict[str, Any], record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Write `meta` and put `record` into rows.jsonl (replacing the row of the same id; a baseline record
    makes every other row a non-baseline). Returns the rows."""
    table_dir = Path(table_dir)
    table_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table_dir / META, json.dumps(meta, indent=2) + "\n")
    _, rows = read_table(table_dir)
    if record.get("baseline"):
        for r in rows:
            r["baseline"] = False
    for i, r in enumerate(rows):
        if r["row"] == record["row"]:
            rows[i] = record
            break
    else:
        rows.append(record)
    atomic_write_text(table_dir / ROWS, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def speedups(rows: List[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """row id -> the baseline row's latency / the row's (None without both)."""
    base = next((r for r in rows if r.get("baseline")), None)
    base_latency = base.get("latency") if base else None
    return {r["row"]: base_latency / r["latency"] if base_latency and r.get("latency") else None for r in rows}
