"""Generate one image per (prompt, repeat) of a prompt list, for evaluation: seeded per image, sharded over
torchrun processes, resumable.

Image k (k = repeat * number_of_prompts + prompt_index) uses prompt (k mod number_of_prompts) and seed
`seed + k`: its start noise comes from its own CPU generator, so it is the same whatever the batch size or
the number of processes, and every other random draw of its sampler call (DaTo's base tokens, tomesd's
partition, eta noise) comes from the seed of the first image of the batch. It is written to
OUTDIR/{k:06d}.png through a temp file and a rename; a run skips every index whose PNG exists.
`OUTDIR/manifest.json` records the settings (a rerun with other settings is refused), every run and the
sampling time per image.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from . import generate as gen
from .images import atomic_save_png, atomic_write_text, check_output_dir, to_uint8_images
from .compiled import EAGER, Execution
from .methods import Method
from .runtime import UsageError
from .settings import RunSettings
from .sharding import DistInfo, png_path, run_sharded

MANIFEST = "manifest.json"
LOCATION_KEYS = ("prompt_file",)  # where the prompts were read from: their content (prompt_sha256) is what counts


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PromptSetJob:
    """Everything that decides the images of a prompt set, and where they go. run: the run settings, resolved
    for the method (`RunSettings.resolve`; run.seed is the base seed, run.batch images per sampler call)."""

    outdir: Path
    prompts: Tuple[str, ...]
    prompt_file: str
    method: Method
    model: gen.ModelRef
    run: RunSettings
    repeats: int = 1
    limit: Optional[int] = None
    warmup_batches: int = 1
    execution: Execution = EAGER  # how UNet calls run (not part of the images' settings)

    @property
    def total(self) -> int:
        total = len(self.prompts) * self.repeats
        return total if self.limit is None else min(total, self.limit)

    def settings(self) -> Dict[str, Any]:
        """What decides the images (compared with a previous run's manifest)."""
        run = self.run
        strategy = self.method.patch_strategy(run.sampler_steps)
        return {
            "model": self.model.settings(),
            "prompt_file": os.path.abspath(self.prompt_file), "prompt_sha256": file_sha256(self.prompt_file),
            "n_prompts": len(self.prompts), "repeats": self.repeats, "seed": run.seed, "sampler": run.sampler,
            "ddim_steps": run.steps, "sampler_steps": run.sampler_steps, "scale": run.scale, "H": run.height,
            "W": run.width, "precision": run.precision, "method": self.method.name,
            "strategy": strategy.to_dict() if strategy is not None else None,
        }


def read_manifest(outdir) -> Optional[Dict[str, Any]]:
    path = Path(outdir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; delete it (the PNGs are kept) and run again") from None


def check_job(job: PromptSetJob) -> Optional[Dict[str, Any]]:
    """Raise UsageError when the output folder cannot be used or holds images of other settings; returns the
    previous manifest (None for a new folder). Writes nothing."""
    check_output_dir(job.outdir)
    previous = read_manifest(job.outdir)
    old, new = (previous or {}).get("settings") or {}, job.settings()
    differing = sorted(k for k in set(old) | set(new) if k not in LOCATION_KEYS and old.get(k) != new.get(k))
    if previous is not None and differing:
        raise UsageError(f"{job.outdir} holds images made with other settings (differing: {', '.join(differing)}; "
                         f"see its {MANIFEST}). Use another --outdir, or delete that folder to start over.")
    return previous


@dataclass
class Timing:
    """Sampler seconds: all batches, and those after the warm-up batches (with their image count)."""

    seconds: float = 0.0
    timed_seconds: float = 0.0
    timed_images: int = 0


def generate_images(model, job: PromptSetJob, todo: Sequence[int], progress: bool = True) -> Timing:
    """Make the images `todo` (global indices) into job.outdir; returns their sampling time."""
    n, run = len(job.prompts), job.run
    shape = run.latent_shape
    base_text = {"seed_rule": "seed = base + index", "steps": run.steps, "sampler": run.sampler,
                 "scale": run.scale, "method": job.method.name, "model": job.model.label}
    timing = Timing()
    bar = tqdm(total=len(todo), desc=f"sampling ({job.method.name})", unit="img", disable=not progress)
    with job.method.apply(model, run.sampler_steps, seed=run.seed, execution=job.execution) as applied:
        for b, ks in enumerate(gen.batches(list(todo), run.batch)):
            prompts = [job.prompts[k % n] for k in ks]
            cond = gen.encode_prompts(model, prompts, run.scale, run.precision, size=run.size)
            x_T = gen.start_noise([run.seed + k for k in ks], shape)
            result = gen.sample_latents(model, cond, x_T, sampler=run.sampler, steps=run.steps, scale=run.scale,
                                        seed=run.seed + ks[0], method=applied, precision=run.precision)
            timing.seconds += result.seconds
            if b >= job.warmup_batches:
                timing.timed_seconds += result.seconds
                timing.timed_images += len(ks)
            images = to_uint8_images(gen.decode(model, result.latents, run.precision))
            for k, prompt, image in zip(ks, prompts, images):
                atomic_save_png(image, png_path(job.outdir, k), dict(base_text, prompt=prompt, index=k,
                                                                      seed=run.seed + k))
            bar.update(len(ks))
    bar.close()
    return timing


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def merge_manifest(outdir: Path, total: int, method: Method, settings: Dict[str, Any],
                   previous: Optional[Dict[str, Any]], run: Dict[str, Any], file_names: str,
                   timing_what: str) -> Dict[str, Any]:
    """Rank 0: merge this run (`run`: its date, generated, sampling / timed seconds, timed images, ...) into
    OUTDIR/manifest.json; runs are kept and the timing is summed over them. Returns the manifest."""
    present = sum(png_path(outdir, k).is_file() for k in range(total))
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
    atomic_write_text(Path(outdir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def run_record(info: DistInfo, device: torch.device, totals: Sequence[float], generated: int,
               wall_seconds: float, **settings) -> Dict[str, Any]:
    """One run's entry of the manifest. totals: (sampling seconds, timed seconds, timed images)."""
    all_s, timed_s, timed_n = totals
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "generated": int(generated),
            "processes": info.world, "device": device_name(device), **settings, "sampling_seconds": all_s,
            "timed_seconds": timed_s, "timed_images": int(timed_n), "wall_seconds": wall_seconds}


def write_manifest(job: PromptSetJob, previous: Optional[Dict[str, Any]], info: DistInfo, device: torch.device,
                   totals: Sequence[float], generated: int, wall_seconds: float) -> Dict[str, Any]:
    """Rank 0: merge this run into OUTDIR/manifest.json (runs are kept, timing summed over them)."""
    run = run_record(info, device, totals, generated, wall_seconds, batch_size=job.run.batch,
                     warmup_batches=job.warmup_batches)
    return merge_manifest(
        job.outdir, job.total, job.method, job.settings(), previous, run,
        file_names="{k:06d}.png, k = repeat * n_prompts + prompt_index; prompt = line (k mod n_prompts) + 1",
        timing_what="sampler UNet loop per image (x_T to latents; no text encoder, no VAE decode), mean over the "
                    "timed batches of every process and run")


def run_prompt_set(job: PromptSetJob, info: DistInfo, device: torch.device, progress: bool = True,
                   load_model: Optional[Callable[..., torch.nn.Module]] = None,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Make every missing image of `job` on this rank (of `info.world`), then rank 0 writes the manifest.
    Returns the manifest (rank 0) or {}."""
    return run_image_job(job, check_job(job), generate_images, write_manifest, info, device, progress, load_model,
                         log)


def run_image_job(job, previous: Optional[Dict[str, Any]], make_images: Callable[..., Timing],
                  write: Callable[..., Dict[str, Any]], info: DistInfo, device: torch.device, progress: bool,
                  load_model: Optional[Callable[..., torch.nn.Module]], log: Callable[[str], None]) -> Dict[str, Any]:
    """Run an image job (a prompt set, an img2img set) sharded: this rank makes its missing images with
    make_images(model, job, todo, progress) (the model loaded by `load_model`, default `generate.load_model`,
    only when there is something to make), then rank 0 writes the manifest with write(job, previous, info, ...)
    and says the sampling time. Returns the manifest (rank 0) or {}."""

    def make(device: torch.device, todo: Sequence[int]) -> Tuple[float, float, int]:
        ref = job.model
        model = (load_model or gen.load_model)(ref.config, ref.ckpt, device, use_ema=ref.use_ema, demo=ref.demo,
                                               verbose=info.is_main)
        timing = make_images(model, job, todo, progress=progress and info.is_main)
        return timing.seconds, timing.timed_seconds, timing.timed_images

    def manifest(device: torch.device, totals: Sequence[float], generated: int, wall_seconds: float):
        written = write(job, previous, info, device, totals, generated, wall_seconds)
        if written["seconds_per_image"] is not None:
            log(f"sampling time: {written['seconds_per_image']:.4f} s per image "
                f"(over {written['timing']['timed_images']} timed images)")
        return written

    return run_sharded(job.outdir, job.total, info, device, make, manifest, log)
