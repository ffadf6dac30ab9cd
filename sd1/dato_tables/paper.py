"""The paper's numbers (data/paper-tables.yaml, Tables 1-6 transcribed): read one table by its dotted key."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .spec import PAPER_FILE

# paper column -> our record field
COLUMN_FIELDS = {"fid": "fid", "clip_score": "clip", "inception_score": "is", "latency_s": "latency",
                 "speedup": "speedup"}


@dataclass(frozen=True)
class PaperTable:
    """One table of numbers: row key -> one value per column, rows in the paper's order."""

    key: str
    columns: Tuple[str, ...]
    rows: Dict[str, Tuple[Optional[float], ...]]

    def value(self, row: str, column: str) -> Optional[float]:
        return self.rows[row][self.columns.index(column)] if row in self.rows and column in self.columns else None


def load_paper(path=PAPER_FILE) -> Dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


def paper_table(paper: Dict[str, Any], key: str) -> PaperTable:
    """The table at dotted `key` (e.g. 'table1.imagenet.sd15'); its columns are the nearest `columns` above.
    KeyError when the file has no such table."""
    node, columns = paper, None
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"the paper's numbers have no table {key!r}")
        columns = node.get("columns", columns)
        node = node[part]
    columns = node.get("columns", columns)
    if columns is None:
        raise KeyError(f"{key!r} in the paper's numbers has no columns")
    rows = {str(name): tuple(values) for name, values in node.items() if name != "columns"}
    return PaperTable(key=key, columns=tuple(columns), rows=rows)


def numeric_tables(paper: Dict[str, Any], prefix: str = "", columns=None) -> List[str]:
    """Dotted keys of every table of numbers in the file (a mapping of rows under some `columns`)."""
    keys = []
    columns = paper.get("columns", columns)
    children = {k: v for k, v in paper.items() if k != "columns"}
    if columns is not None and children and all(isinstance(v, list) for v in children.values()):
        return [prefix]
    for name, child in children.items():
        if isinstance(child, dict):
            keys += numeric_tables(child, f"{prefix}.{name}" if prefix else str(name), columns)
    return keys
