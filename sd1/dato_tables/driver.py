"""Run a table plan: generate every row's images (all torchrun ranks, the model loaded once per process),
then measure them and record the rows (rank 0). Re-running resumes: existing images are kept, and a row is
re-measured (and its record replaced) only when its images or the evaluation settings changed.
"""
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from sdgen import generate as gen
from sdgen.images import atomic_write_text
from sdgen.image_jobs import check_job, device_name, read_manifest, run_image_job
from sdgen.img2img_set import Img2ImgJob
from sdgen.prompt_set import PromptSetJob
from sdgen.runtime import pick_device
from sdgen.sharding import DistInfo

from .evaluation import FIELDS, Evaluator, GeneratedReference, metric_fields
from .plan import RowPlan, TablePlan
from .records import RESULTS, read_table, record_row
from .report import render_results
from .smoke import ensure_smoke_assets

Job = Union[PromptSetJob, Img2ImgJob]


class ModelCache:
    """The table's model, loaded by the first row that needs it and handed to every later row."""

    def __init__(self):
        self.model: Optional[torch.nn.Module] = None

    def __call__(self, config, ckpt, device, use_ema=False, demo=False, verbose=True) -> torch.nn.Module:
        if self.model is None:
            self.model = gen.load_model(config, ckpt, device, use_ema=use_ema, demo=demo, verbose=verbose)
        return self.model


def row_job(plan: TablePlan, row: RowPlan) -> Job:
    """The generation job of one row: a prompt set (keeping its latents when the table measures the
    fidelity), or an img2img set."""
    source = plan.source
    if source.is_img2img:
        return Img2ImgJob(outdir=row.images, init_dir=source.init_dir, init_images=source.init_images[:plan.total],
                          prompts=source.prompts, prompt_file=source.prompt_file, method=row.method,
                          model=plan.model.ref, run=row.run)
    return PromptSetJob(outdir=row.images, prompts=source.prompts, prompt_file=source.prompt_file, method=row.method,
                        model=plan.model.ref, run=row.run, repeats=source.repeats, limit=plan.values["limit"],
                        save_latents="fidelity" in plan.spec.metrics)


def check_jobs(jobs: Dict[str, Job]) -> None:
    """Raise UsageError, before any image is made, when a row's folder holds images of other settings."""
    for job in jobs.values():
        check_job(job)


def generate_rows(plan: TablePlan, jobs: Dict[str, Job], info: DistInfo, device: torch.device,
                  log: Callable[[str], None]) -> None:
    models = ModelCache()
    progress = not plan.smoke
    for row in plan.rows:
        log(f"## row {row.id}: {row.label}\nmethod: {row.method.name} = {row.method.label}")
        run_image_job(jobs[row.id], info, device, progress=progress, load_model=models, log=log)
    models.model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def row_record(plan: TablePlan, row: RowPlan, manifest: Dict[str, Any], metrics: Dict[str, float]) -> Dict[str, Any]:
    record = {"table": plan.spec.key, "row": row.id, "label": row.label, "baseline": row.baseline,
              "method": row.method.name, "method_label": row.method.label}
    record.update({f: metrics.get(f) for f in FIELDS})
    record.update({"latency": manifest.get("seconds_per_image"), "images": manifest.get("count"),
                   "samples": str(row.images), "paper": row.paper, "cell": list(row.cell) if row.cell else None})
    return record


def table_meta(plan: TablePlan, device: torch.device) -> Dict[str, Any]:
    spec = plan.spec
    e = plan.evaluation
    reference = e.reference.describe() if isinstance(e.reference, GeneratedReference) else e.reference
    return {"table": spec.key, "title": spec.title, "setup": plan.setup_line, "smoke": plan.smoke,
            "metrics": list(e.metrics), "paper": spec.paper.table if spec.paper else None,
            "device": device_name(device), "fid_reference": reference}


def measurement_key(plan: TablePlan, row: RowPlan, sources: Optional[Dict[str, Any]] = None) -> str:
    """What a row's numbers depend on: its image files (and the Original row's, for the fidelity) and the
    evaluation (settings, reference, and the metric networks' `sources`: `Evaluator.sources()`)."""
    e = plan.evaluation

    def stat(path: Path):
        return (path.name, path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None

    images = [stat(p) for p in sorted(row.images.glob("*.png"))]
    if e.original is not None:
        images.append([stat(p) for p in sorted(e.original.glob("*.png"))])
    if isinstance(e.reference, GeneratedReference):
        reference = e.reference.key()
    else:
        reference = [e.reference, stat(Path(e.reference)) if e.reference else None]
    settings = [e.metrics, *reference, e.inception_weights,
                e.inception_seed, e.clip_arch, e.clip_weights, e.is_splits, e.prompts_cycle,
                hashlib.sha256("\n".join(e.prompts).encode()).hexdigest()]
    if sources:
        settings.append(sources)
    return hashlib.sha256(json.dumps([images, settings]).encode()).hexdigest()


def evaluate_rows(plan: TablePlan, device: torch.device, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Measure every row's images and record it (rows.jsonl, results.md); a row whose images and evaluation
    settings are those of its record keeps its numbers. Returns the table's rows."""
    e = plan.evaluation
    evaluator = Evaluator(e.metrics, inception_weights=e.inception_weights, inception_seed=e.inception_seed,
                          clip_arch=e.clip_arch, clip_weights=e.clip_weights, is_splits=e.is_splits,
                          device=str(device), batch_size=e.batch_size, num_workers=e.num_workers,
                          progress=not plan.smoke)
    sources = evaluator.sources()
    meta = dict(table_meta(plan, device), **sources)
    fields = metric_fields(e.metrics)
    _, rows = read_table(plan.table_dir)
    recorded = {r["row"]: r for r in rows}
    for row in plan.rows:
        key = measurement_key(plan, row, sources)
        previous = recorded.get(row.id, {})
        if previous.get("measured") == key:
            metrics = {f: previous[f] for f in fields}
        else:
            metrics = evaluator.evaluate(row.images, e.reference, e.prompts, e.prompts_cycle, original=e.original)
        record = dict(row_record(plan, row, read_manifest(row.images) or {}, metrics), **sources, measured=key)
        rows = record_row(plan.table_dir, meta, record)
        atomic_write_text(plan.table_dir / RESULTS, render_results(meta, rows))
        shown = ", ".join(f"{f} {record[f]:.4g}" for f in fields if record[f] is not None)
        log(f"row {row.id} ({row.label}): {shown}, latency {record['latency']} s/img")
    return rows


def run_table(plan: TablePlan, info: DistInfo, log: Callable[[str], None] = print) -> int:
    """Generate (every rank), then evaluate and record (rank 0). UsageError before any work for a row
    folder of other settings."""
    if plan.smoke:
        ensure_smoke_assets(plan.smoke_dir)
    jobs = {row.id: row_job(plan, row) for row in plan.rows}
    check_jobs(jobs)
    device = pick_device(plan.device)
    generate_rows(plan, jobs, info, device, log)
    if not info.is_main:
        return 0
    evaluate_rows(plan, device, log)
    log("\n" + (plan.table_dir / RESULTS).read_text(encoding="utf-8"))
    return 0
