"""A run directory remembers the settings of its search (``search.json``), so a rerun resumes that search and
a rerun with other settings is refused (naming the differences) instead of overwriting its results.

Resuming may raise ``--gens`` (the search goes on) and change how it runs (``--workers``, ``--scheduler``,
``--table-repeats``, ``--cost-table``: they do not change its results). ``--new-search`` starts a new search
in the directory; the stored evaluations whose key (model, sampling, objectives) is unchanged are reused.
"""
from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

from sdgen.images import made_folder
from sdgen.locks import LockHeld, exclusive_lock

from .identity import model_identity
from .loop import OPERATORS
from .settings import SearchSettings, SearchUsageError
from .space import UNIFORM_INTERVALS

SETTINGS_FILE = "search.json"
LOCK_FILE = "search.lock"
# What a resumed search must share with the stored one (besides --gens, which may only grow).
COMPARED = ("mode", "pop", "seed", "space", "operators", "sampling", "quality", "latency", "min_speedup", "w_M",
            "select", "model", "device", "threads")


def settings_record(settings: SearchSettings, context_hash: str) -> Dict[str, Any]:
    """The content of search.json."""
    space = settings.space
    return {
        "mode": settings.mode, "pop": settings.pop, "gens": settings.gens, "seed": settings.seed,
        "space": {"steps": space.steps, "depths": list(space.depths), "ratios": list(space.ratios),
                  "fixed_ratio": space.fixed_ratio,
                  "fixed_depths": list(space.fixed_depths) if space.fixed_depths else None,
                  "n_var": space.n_var,
                  # absent: the paper's seeds (as in the search.json of earlier versions, which so still resume)
                  **({"seed_intervals": list(space.intervals)} if space.intervals != UNIFORM_INTERVALS else {})},
        "operators": OPERATORS,
        "sampling": settings.sampling.identity(), "prompt_source": settings.prompt_source,
        "quality": {**settings.quality.identity(), "units": settings.quality.units},
        "latency": settings.latency, "min_speedup": settings.min_speedup, "w_M": settings.w_m,
        "select": settings.select,
        "model": model_identity(settings.model), "device": settings.device, "threads": settings.threads,
        "workers": settings.workers, "scheduler": settings.scheduler, "context": context_hash,
        "argv": list(settings.argv),
    }


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(name: str, old: Any, new: Any, out: List[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            _differences(f"{name}.{key}", old.get(key), new.get(key), out)
    elif old != new:
        out.append(f"{name} {_short(old)} -> {_short(new)}")


def differences(stored: Dict[str, Any], record: Dict[str, Any]) -> List[str]:
    """The settings in which `record` (this run) differs from `stored` (the directory's search), e.g.
    ['pop 4 -> 6']; empty when this run resumes the stored search."""
    record = json.loads(json.dumps(record))  # tuples -> lists, as stored
    out: List[str] = []
    for key in COMPARED:
        _differences(key, stored.get(key), record.get(key), out)
    if record["gens"] < stored.get("gens", 0):
        out.append(f"gens {stored['gens']} -> {record['gens']} (a search can be extended, not shortened)")
    if not out and stored.get("context") != record["context"]:
        out.append("the evaluation context (torch version, GPU model or store version)")
    return out


def check_rerun(settings: SearchSettings, record: Dict[str, Any], new_search: bool) -> List[str]:
    """Refuse (SearchUsageError) to run in a directory that holds a search with other settings, unless
    `new_search`; returns the differences (empty for a fresh directory or a resumed search). Writes nothing."""
    path = settings.run_dir / SETTINGS_FILE
    if not path.exists():
        return []
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        if new_search:
            return [f"unreadable {SETTINGS_FILE}"]
        raise SearchUsageError(f"--run-dir {settings.run_dir}: cannot read {SETTINGS_FILE} ({err}); pass "
                               f"--new-search to start a new search there, or pick another --run-dir") from None
    diffs = differences(stored, record)
    if diffs and not new_search:
        raise SearchUsageError(
            f"--run-dir {settings.run_dir} holds a search with other settings ({'; '.join(diffs)}); rerun it with "
            f"its own settings to resume it, pass --new-search to start a new search there (stored evaluations "
            f"with the same model, sampling and objectives are reused), or pick another --run-dir")
    return diffs


@contextmanager
def claimed(run_dir: Path) -> Iterator[Path]:
    """Hold the run directory for one search (made if missing, removed again if this search fails before
    writing into it): an exclusive lock on RUN_DIR/search.lock, so that a second search there is refused
    (SearchUsageError, naming the PID that holds it) instead of both writing one store. The lock of a search
    that died is taken over."""
    with made_folder(run_dir), ExitStack() as lock:
        try:
            lock.enter_context(exclusive_lock(Path(run_dir) / LOCK_FILE, wait=False))
        except LockHeld as held:
            raise SearchUsageError(f"--run-dir {run_dir} is already in use by PID {held.pid or '?'} (another "
                                   f"search runs there); wait for it to end, or pick another --run-dir") from None
        yield Path(run_dir)
