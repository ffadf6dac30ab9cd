"""What the image jobs (a prompt set, `prompt_set.py`; an img2img set, `img2img_set.py`) share: the manifest
(OUTDIR/manifest.json: the settings, every run, the sampling time per image; a rerun with other settings is
refused) and the sharded run that makes the missing images.

A job has `outdir`, `total`, `method`, `model` (a ModelRef), `settings()` (what decides its images),
`IGNORED_SETTINGS` (settings a rerun may change), `record_settings()` (its entries of a run's record),
`FILE_NAMES` and `TIMING_WHAT` (the manifest's words for them) and `make_images(model, todo, progress)`.
"""
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from . import generate as gen
from .images import atomic_write_text, check_output_dir
from .locks import exclusive_lock
from .methods import Method
from .runtime import UsageError
from .sharding import DistInfo, missing_indices, run_sharded

MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(outdir) -> Optional[Dict[str, Any]]:
    path = Path(outdir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; delete it (the PNGs are kept) and run again") from None


def check_job(job) -> Optional[Dict[str, Any]]:
    """Raise UsageError when the output folder cannot be used or holds images of other settings (besides the
    job's IGNORED_SETTINGS); returns the previous manifest (None for a new folder). Writes nothing."""
    check_output_dir(job.outdir)
    previous = read_manifest(job.outdir)
    old, new = (previous or {}).get("settings") or {}, job.settings()
    differing = sorted(k for k in set(old) | set(new) if k not in job.IGNORED_SETTINGS and old.get(k) != new.get(k))
    if previous is not None and differing:
        raise UsageError(f"{job.outdir} holds images made with other settings (differing: {', '.join(differing)}; "
                         f"see its {MANIFEST}). Use another output folder, or delete that one to start over.")
    return previous


@dataclass
class Timing:
    """Sampler seconds: all batches, and those after the warm-up batches (with their image count)."""

    seconds: float = 0.0
    timed_seconds: float = 0.0
    timed_images: int = 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def merge_manifest(outdir: Path, total: int, method: Method, settings: Dict[str, Any], run: Dict[str, Any],
                   file_names: str, timing_what: str) -> Dict[str, Any]:
    """Rank 0: merge this run (`run`: its date, generated, sampling / timed seconds, timed images, ...) into
    OUTDIR/manifest.json; runs are kept and the timing is summed over them. The manifest is read again and
    written under a lock (OUTDIR/.manifest.lock), so runs that share the folder at once each add their run.
    Returns the manifest."""
    with exclusive_lock(Path(outdir) / MANIFEST_LOCK):
        manifest = _merged(outdir, total, method, settings, read_manifest(outdir), run, file_names, timing_what)
        atomic_write_text(Path(outdir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _merged(outdir: Path, total: int, method: Method, settings: Dict[str, Any], previous: Optional[Dict[str, Any]],
            run: Dict[str, Any], file_names: str, timing_what: str) -> Dict[str, Any]:
    present = total - len(missing_indices(outdir, range(total)))
    runs = list((previous or {}).get("runs", [])) + [run]
    timed_s = sum(r["timed_seconds"] for r in runs)
    timed_n = sum(r["timed_images"] for r in runs)
    includes_warmup = timed_n == 0
    if includes_warmup:  # every image was a warm-up one: report them rather than nothing
        timed_s, timed_n = sum(r["sampling_seconds"] for r in runs), sum(r["generated"] for r in runs)
    manifest = {
        "method": method.name,
        "method_label": method.label,
        "settings": settings,
        "total": total, "count": present, "complete": present == total,
        "file_names": file_names,
        "seconds_per_image": timed_s / timed_n if timed_n else None,
        "timing": {"what": timing_what, "timed_images": int(timed_n), "seconds": timed_s,
                   "includes_warmup": includes_warmup},
        "runs": runs,
    }
    return manifest


def run_record(info: DistInfo, device: torch.device, totals: Sequence[float], generated: int,
               wall_seconds: float, **settings) -> Dict[str, Any]:
    """One run's entry of the manifest. totals: (sampling seconds, timed seconds, timed images)."""
    all_s, timed_s, timed_n = totals
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "generated": int(generated),
            "processes": info.world, "device": device_name(device), **settings, "sampling_seconds": all_s,
            "timed_seconds": timed_s, "timed_images": int(timed_n), "wall_seconds": wall_seconds}


def write_manifest(job, info: DistInfo, device: torch.device, totals: Sequence[float], generated: int,
                   wall_seconds: float) -> Dict[str, Any]:
    """Rank 0: merge this run into OUTDIR/manifest.json (runs are kept, timing summed over them)."""
    run = run_record(info, device, totals, generated, wall_seconds, **job.record_settings())
    return merge_manifest(job.outdir, job.total, job.method, job.settings(), run, file_names=job.FILE_NAMES,
                          timing_what=job.TIMING_WHAT)


def run_image_job(job, info: DistInfo, device: torch.device, progress: bool = True,
                  load_model: Optional[Callable[..., torch.nn.Module]] = None,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Make every missing image of `job` on this rank (of `info.world`), then rank 0 writes the manifest and
    says the sampling time. The model is loaded (by `load_model`, default `generate.load_model`) only when this
    rank has something to make. Returns the manifest (rank 0) or {}."""
    check_job(job)

    def make(device: torch.device, todo: Sequence[int]) -> Tuple[float, float, int]:
        ref = job.model
        model = (load_model or gen.load_model)(ref.config, ref.ckpt, device, use_ema=ref.use_ema, demo=ref.demo,
                                               verbose=info.is_main)
        timing = job.make_images(model, todo, progress=progress and info.is_main)
        return timing.seconds, timing.timed_seconds, timing.timed_images

    def manifest(device: torch.device, totals: Sequence[float], generated: int, wall_seconds: float):
        written = write_manifest(job, info, device, totals, generated, wall_seconds)
        if written["seconds_per_image"] is not None:
            log(f"sampling time: {written['seconds_per_image']:.4f} s per image "
                f"(over {written['timing']['timed_images']} timed images)")
        return written

    return run_sharded(job.outdir, job.total, info, device, make, manifest, log)
