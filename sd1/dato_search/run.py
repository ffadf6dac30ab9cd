"""Running one search in its run directory: settings check, store, cost table, reference latents, backend, loop."""
from __future__ import annotations

import json
from typing import Callable, Optional

import torch

from sdgen.images import atomic_output, atomic_write_text
from sdgen.runtime import set_threads

from .backends import DaskBackend, EvaluatorRecipe, SerialBackend
from .evaluator import CandidateSampler, StrategyEvaluator
from .identity import sha256_json
from .latency import load_or_measure_table
from .loop import SearchOutcome, search_loop
from .objectives import build_objective
from .report import RunLog
from .rundir import SETTINGS_FILE, check_rerun, settings_record
from .settings import SearchSettings
from .store import STORE_FILE, EvalStore, sampling_context, search_context


def run_record(settings: SearchSettings) -> dict:
    """search.json of this run (see ``dato_search.rundir``)."""
    return settings_record(settings, sha256_json(search_context(settings)))


def load_reference(settings: SearchSettings, sampler: CandidateSampler, log: Callable[[str], None]) -> torch.Tensor:
    """The unaccelerated final latents of the prompt set (N, C, h, w), computed once and kept in RUN_DIR."""
    digest = sha256_json(sampling_context(settings))
    path = settings.run_dir / f"reference-{digest[:16]}.pt"
    if path.exists():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("context") == digest:
            log(f"reference: {path.name} (unaccelerated latents of {data['latents'].shape[0]} images)")
            return data["latents"]
    log(f"reference: sampling {settings.sampling.n_images} images with the unaccelerated model")
    latents, _ = sampler.sample(None)
    with atomic_output(path) as tmp:
        torch.save({"context": digest, "latents": latents}, tmp)
    return latents


def run_search(settings: SearchSettings, model: torch.nn.Module, new_search: bool = False,
               dask: Optional[DaskBackend] = None) -> SearchOutcome:
    """Run (or resume) the search described by ``settings`` with ``model`` (built from ``settings.model``).

    Refuses a run directory holding a search with other settings unless `new_search` (see
    ``dato_search.rundir``). `dask`: a connected cluster for a search with --workers/--scheduler (connected
    here when not given); it is closed at the end. Creates ``settings.run_dir``.
    """
    previous_threads = set_threads(None)
    backend = dask
    store = None
    try:
        record = run_record(settings)
        changed = check_rerun(settings, record, new_search)
        set_threads(settings.threads)
        if settings.uses_dask and backend is None:
            backend = DaskBackend(settings.workers, settings.scheduler)
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        log = RunLog(settings.run_dir / "search.log")
        store = EvalStore(settings.run_dir / STORE_FILE, search_context(settings))
        atomic_write_text(settings.run_dir / SETTINGS_FILE, json.dumps(record, indent=1))
        invocation = store.start_invocation(settings.argv)
        stored_before = store.count()
        if changed:
            log(f"new search in {settings.run_dir} (--new-search; changed: {'; '.join(changed)})")
        log(f"search {settings.run_dir} (run {invocation}): {settings.space.describe()}; population "
            f"{settings.pop}, {settings.gens} generations, seed {settings.seed}; quality {settings.quality.kind}, "
            f"latency {settings.latency}; {settings.sampling.n_images} images from {settings.prompt_source}")
        if stored_before:
            log(f"resuming: {stored_before} evaluations of this search are stored in evals.sqlite and will not "
                f"be computed again")
        measured = settings.latency == "measured"
        table = load_or_measure_table(settings, model, log) if not measured else None
        sampler = CandidateSampler(model, settings.sampling, threads=settings.threads)
        reference = load_reference(settings, sampler, log) if settings.quality.kind == "fidelity" else None
        if backend is not None:
            log(f"dask: {backend.description}")
            recipe = EvaluatorRecipe(settings.model, settings.device, settings.sampling, settings.quality, reference,
                                     settings.threads, measured)
            backend.start(recipe, f"dato-search-{store.context_hash[:16]}")
        else:
            objective = build_objective(settings.quality, settings.sampling.prompts, sampler.device, reference)
            backend = SerialBackend(StrategyEvaluator(sampler, objective), measured)
        return search_loop(settings, store, backend, table, invocation, log)
    finally:
        if backend is not None:
            backend.close()
        if store is not None:
            store.close()
        set_threads(previous_threads)
