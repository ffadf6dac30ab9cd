"""Generate one image per (prompt, repeat) of a prompt list, for evaluation: seeded per image, sharded over
torchrun processes, resumable.

Image k (k = repeat * number_of_prompts + prompt_index) uses prompt (k mod number_of_prompts) and seed
`seed + k`: its start noise comes from its own CPU generator, so it is the same whatever the batch size or
the number of processes, and every other random draw of its sampler call (DaTo's base tokens, tomesd's
partition, eta noise) comes from the seed of the first image of the batch. It is written to
OUTDIR/{k:06d}.png through a temp file and a rename; a run skips every index whose PNG is complete.
`OUTDIR/manifest.json` records the settings (a rerun with other settings is refused), every run and the
sampling time per image (`image_jobs`; `image_jobs.run_image_job(job, ...)` runs the job). With
`save_latents`, image k's final latents (the sampler's output, before the VAE) are kept too, as
OUTDIR/latents/{k:06d}.npy ((C, h, w) float32, `latent_path`), written before the PNG.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from . import generate as gen
from .compiled import EAGER, Execution
from .image_jobs import Timing, file_sha256
from .images import atomic_output, atomic_save_png, to_uint8_images
from .methods import Method
from .settings import RunSettings
from .sharding import png_path

LATENT_DIR = "latents"


def latent_path(outdir, k: int) -> Path:
    """Where a prompt set made with `save_latents` keeps image k's final latents."""
    return Path(outdir) / LATENT_DIR / f"{k:06d}.npy"


def save_latent(latent, path: Path) -> None:
    """Write one image's latents (C, h, w) as float32 .npy through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, latent.detach().float().cpu().numpy())


def image_count(n_prompts: int, repeats: int = 1, limit: Optional[int] = None) -> int:
    """Images of a prompt set: repeats passes over n_prompts prompts, at most `limit`."""
    total = n_prompts * repeats
    return total if limit is None else min(total, limit)


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
    save_latents: bool = False  # keep each image's final latents (`latent_path`)

    IGNORED_SETTINGS = ("prompt_file",)  # where the prompts were read from: their content (prompt_sha256) counts
    FILE_NAMES = "{k:06d}.png, k = repeat * n_prompts + prompt_index; prompt = line (k mod n_prompts) + 1"
    TIMING_WHAT = ("sampler UNet loop per image (x_T to latents; no text encoder, no VAE decode), mean over the "
                   "timed batches of every process and run")

    @property
    def total(self) -> int:
        return image_count(len(self.prompts), self.repeats, self.limit)

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
            **({"latents": True} if self.save_latents else {}),  # (absent when off: older folders stay valid)
        }

    def record_settings(self) -> Dict[str, Any]:
        return {"batch_size": self.run.batch, "warmup_batches": self.warmup_batches}

    def make_images(self, model, todo: Sequence[int], progress: bool = True) -> Timing:
        """Make the images `todo` (global indices) into outdir; returns their sampling time."""
        n, run = len(self.prompts), self.run
        shape = run.latent_shape
        base_text = {"seed_rule": "seed = base + index", "steps": run.steps, "sampler": run.sampler,
                     "scale": run.scale, "method": self.method.name, "model": self.model.label}
        timing = Timing()
        bar = tqdm(total=len(todo), desc=f"sampling ({self.method.name})", unit="img", disable=not progress)
        with self.method.apply(model, run.sampler_steps, seed=run.seed, execution=self.execution) as applied:
            for b, ks in enumerate(gen.batches(list(todo), run.batch)):
                prompts = [self.prompts[k % n] for k in ks]
                cond = gen.encode_prompts(model, prompts, run.scale, run.precision, size=run.size)
                x_T = gen.start_noise([run.seed + k for k in ks], shape)
                result = gen.sample_latents(model, cond, x_T, sampler=run.sampler, steps=run.steps, scale=run.scale,
                                            seed=run.seed + ks[0], method=applied, precision=run.precision)
                timing.seconds += result.seconds
                if b >= self.warmup_batches:
                    timing.timed_seconds += result.seconds
                    timing.timed_images += len(ks)
                images = to_uint8_images(gen.decode(model, result.latents, run.precision))
                for k, prompt, image, latent in zip(ks, prompts, images, result.latents):
                    if self.save_latents:
                        save_latent(latent, latent_path(self.outdir, k))
                    atomic_save_png(image, png_path(self.outdir, k), dict(base_text, prompt=prompt, index=k,
                                                                          seed=run.seed + k))
                bar.update(len(ks))
        bar.close()
        return timing
