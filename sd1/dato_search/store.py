"""The evaluation store of the strategy search: ``evals.sqlite``, keyed by hashes of the strategy and its context."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from datosd.strategy import Strategy

from .evaluator import EvalResult
from .identity import model_identity, sha256_json
from .settings import SearchSettings, SearchUsageError

CONTEXT_VERSION = 1  # bump when the meaning of a stored evaluation changes
STORE_FILE = "evals.sqlite"


def _device_label(device: str) -> str:
    if device == "cuda":
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return device


def sampling_context(settings: SearchSettings) -> Dict[str, Any]:
    """What an unaccelerated sample depends on: model, sampling settings, device (and CPU threads)."""
    context: Dict[str, Any] = {"version": CONTEXT_VERSION, "model": model_identity(settings.model),
                               "device": _device_label(settings.device), "torch": torch.__version__,
                               "sampling": settings.sampling.identity()}
    if settings.device == "cpu":
        context["threads"] = settings.threads
    return context


def search_context(settings: SearchSettings) -> Dict[str, Any]:
    """What an evaluation depends on besides the strategy: the sampling context and the objectives."""
    return {**sampling_context(settings), "quality": settings.quality.identity(),
            "measured_latency": settings.latency == "measured"}


def strategy_json(strategy: Strategy) -> str:
    """The canonical text of a strategy's lists (what its key hashes)."""
    return json.dumps({"cache_depth": [int(d) for d in strategy.cache_depth],
                       "prune_ratio": [float(r) for r in strategy.prune_ratio]}, separators=(",", ":"))


@dataclass
class StoredEval:
    """One row of the evals table."""

    key: str
    strategy: Strategy
    quality: float
    latency: Optional[float]
    extras: Dict[str, float]
    eval_seconds: float
    worker: str
    invocation: int
    generation: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (hash TEXT PRIMARY KEY, context TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evals (
    key TEXT PRIMARY KEY, context TEXT NOT NULL, strategy TEXT NOT NULL, quality REAL NOT NULL, latency REAL,
    extras TEXT NOT NULL, eval_seconds REAL NOT NULL, worker TEXT, invocation INTEGER NOT NULL,
    generation INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, context TEXT NOT NULL, argv TEXT NOT NULL, started TEXT NOT NULL,
    finished TEXT, generations INTEGER NOT NULL DEFAULT 0, evaluated INTEGER NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS asks (
    invocation INTEGER NOT NULL, generation INTEGER NOT NULL, position INTEGER NOT NULL, key TEXT NOT NULL,
    source TEXT NOT NULL);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class EvalStore:
    """``evals.sqlite``: every evaluated strategy, keyed by SHA-256(context hash, canonical strategy).

    Each evaluation is committed on its own as soon as it is done, so a killed search loses at most the
    evaluations in flight. A key is inserted once (a second insert is an error, never an overwrite).
    Tables: ``evals`` (one row per evaluation, with the invocation and generation that computed it),
    ``invocations`` (one row per run of the command: evaluations performed / served from the store),
    ``asks`` (every candidate NSGA-II asked for, and whether it was 'evaluated' or 'cached'), ``contexts``.
    """

    @staticmethod
    def check(path: Path) -> None:
        """Raise SearchUsageError (one line) unless the file `path`, when it exists, is a whole SQLite database (an
        integrity check, read-only: a garbage or truncated file is refused before any work)."""
        path = Path(path)
        if not path.exists():
            return
        try:
            db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
            try:
                found = [row[0] for row in db.execute("PRAGMA quick_check")]
            finally:
                db.close()
        except sqlite3.DatabaseError as err:
            found = [str(err)]
        if found != ["ok"]:
            raise SearchUsageError(f"{path} is not a readable SQLite database ({'; '.join(found[:2])}); move it "
                                   f"away to start the search over without its stored evaluations, or pick another "
                                   f"--run-dir")

    def __init__(self, path: Path, context: Dict[str, Any]) -> None:
        self.path = Path(path)
        self.context = context
        self.context_hash = sha256_json(context)
        self.db = sqlite3.connect(str(self.path), isolation_level=None)  # autocommit: each write is durable
        self.db.executescript(_SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)",
                        (self.context_hash, json.dumps(context, sort_keys=True)))

    def key(self, strategy: Strategy) -> str:
        """SHA-256 of (context hash, canonical strategy)."""
        return hashlib.sha256(f"{self.context_hash}\n{strategy_json(strategy)}".encode()).hexdigest()

    @staticmethod
    def _row(row: Tuple) -> StoredEval:
        key, strategy, quality, latency, extras, seconds, worker, invocation, generation = row
        lists = json.loads(strategy)
        return StoredEval(key=key, strategy=Strategy(lists["cache_depth"], lists["prune_ratio"], name="searched"),
                          quality=float(quality), latency=latency, extras=json.loads(extras), eval_seconds=seconds,
                          worker=worker, invocation=invocation, generation=generation)

    _COLUMNS = "key, strategy, quality, latency, extras, eval_seconds, worker, invocation, generation"

    def get_many(self, keys: Sequence[str]) -> Dict[str, StoredEval]:
        """The stored evaluations among ``keys``."""
        found: Dict[str, StoredEval] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(f"SELECT {self._COLUMNS} FROM evals WHERE key IN ({marks})", chunk):
                found[row[0]] = self._row(row)
        return found

    def all(self) -> List[StoredEval]:
        """Every evaluation stored for this context."""
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM evals WHERE context = ? ORDER BY rowid",
                               (self.context_hash,))
        return [self._row(row) for row in rows]

    def put(self, key: str, strategy: Strategy, result: EvalResult, invocation: int, generation: int) -> StoredEval:
        """Store one new evaluation (committed at once) and return it as read back."""
        self.db.execute(
            "INSERT INTO evals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, self.context_hash, strategy_json(strategy), float(result.quality), result.latency,
             json.dumps(result.extras, sort_keys=True), float(result.eval_seconds), result.worker, invocation,
             generation, now()))
        return self.get_many([key])[key]

    def start_invocation(self, argv: Sequence[str]) -> int:
        cursor = self.db.execute("INSERT INTO invocations (context, argv, started) VALUES (?, ?, ?)",
                                 (self.context_hash, json.dumps(list(argv)), now()))
        return int(cursor.lastrowid)

    def record_generation(self, invocation: int, generation: int, keys: Sequence[str], sources: Sequence[str],
                          evaluated: int, cached: int) -> None:
        """Log a finished generation's candidates and the invocation's running counts, in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO asks VALUES (?, ?, ?, ?, ?)",
                                [(invocation, generation, i, k, s) for i, (k, s) in enumerate(zip(keys, sources))])
            self.db.execute("UPDATE invocations SET generations = ?, evaluated = ?, cached = ? WHERE id = ?",
                            (generation, evaluated, cached, invocation))

    def finish_invocation(self, invocation: int) -> None:
        self.db.execute("UPDATE invocations SET finished = ? WHERE id = ?", (now(), invocation))

    def count(self) -> int:
        """Number of evaluations stored for this context."""
        return int(self.db.execute("SELECT COUNT(*) FROM evals WHERE context = ?", (self.context_hash,)).fetchone()[0])

    def close(self) -> None:
        self.db.close()
