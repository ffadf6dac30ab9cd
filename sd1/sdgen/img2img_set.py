"""img2img over a folder of init images, one prompt each, for evaluation: seeded per image, sharded over
torchrun processes, resumable (the image-to-image sibling of prompt_set.py).

Init image i (the i-th file of the folder in index-then-name order, as sdeval lists them) gets prompt i and
seed `seed + i`, and is transformed exactly as `img2img.py --init-img FILE --prompt PROMPT --seed SEED+i
--n_samples 1` does it (the same random draws), so any one image can be re-made with the script. It is
written to OUTDIR/{i:06d}.png through a temp file and a rename; a run skips every index whose PNG exists.
OUTDIR/manifest.json records the settings (a rerun with other settings is refused), every run and the
sampling time per image (the DDIM loop; the first image of each process is a warm-up and not timed).
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from . import generate as gen
from .images import atomic_save_png, check_output_dir, load_init_image, to_uint8_images
from .compiled import EAGER, Execution
from .methods import Method
from .prompt_set import MANIFEST, Timing, file_sha256, merge_manifest, read_manifest, run_image_job, run_record
from .runtime import UsageError
from .settings import RunSettings
from .sharding import DistInfo, png_path


@dataclass(frozen=True)
class Img2ImgJob:
    """Everything that decides the images of an img2img set, and where they go.

    init_images: the init image files, image i uses prompts[i]; run: the run settings, resolved for the method
    (DDIM, run.steps the schedule, run.strength; run.sampler_steps the int(strength * steps) steps it runs).
    """

    outdir: Path
    init_dir: str
    init_images: Tuple[Path, ...]
    prompts: Tuple[str, ...]
    prompt_file: str
    method: Method
    model: gen.ModelRef
    run: RunSettings
    execution: Execution = EAGER  # how UNet calls run (not part of the images' settings)
    warmup_images: int = 1

    @property
    def total(self) -> int:
        return len(self.init_images)

    def settings(self) -> Dict[str, Any]:
        """What decides the images (compared with a previous run's manifest); the image count is not in it,
        so a run with a higher limit resumes."""
        run = self.run
        strategy = self.method.patch_strategy(run.sampler_steps)
        return {
            "model": self.model.settings(),
            "init_dir": os.path.abspath(self.init_dir), "prompt_sha256": file_sha256(self.prompt_file),
            "seed": run.seed, "sampler": "ddim", "ddim_steps": run.steps, "strength": run.strength,
            "encode_steps": run.sampler_steps, "scale": run.scale, "eta": run.eta, "precision": run.precision,
            "method": self.method.name, "strategy": strategy.to_dict() if strategy is not None else None,
        }


def check_img2img_job(job: Img2ImgJob) -> Optional[Dict[str, Any]]:
    """Raise UsageError for mismatched inputs or an output folder of other settings; returns the previous
    manifest (None for a new folder). Writes nothing."""
    check_output_dir(job.outdir)
    if len(job.prompts) < job.total:
        raise UsageError(f"{job.total} init images but only {len(job.prompts)} prompts in {job.prompt_file}")
    previous = read_manifest(job.outdir)
    old, new = (previous or {}).get("settings") or {}, job.settings()
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if previous is not None and differing:
        raise UsageError(f"{job.outdir} holds images made with other settings (differing: {', '.join(differing)}; "
                         f"see its {MANIFEST}). Use another output folder, or delete that one to start over.")
    return previous


def transform_image(model, job: Img2ImgJob, applied, k: int) -> Tuple[torch.Tensor, float]:
    """Init image k -> (decoded image (1, 3, H, W), sampler seconds), with img2img.py's random draws."""
    run = job.run
    seed = run.seed + k
    init = load_init_image(job.init_images[k], multiple=gen.latent_multiple(run.geometry))
    init_latent = gen.encode_image(model, init, seed, run.precision)
    noise_generator = torch.Generator().manual_seed(seed)
    shape = (1, *init_latent.shape[1:])
    torch.randn(shape, generator=noise_generator)  # img2img.py draws its --fixed_code noise first
    noise = torch.randn(shape, generator=noise_generator)
    cond = gen.encode_prompts(model, [job.prompts[k]], run.scale, run.precision)
    result = gen.img2img_latents(model, init_latent, cond, noise, steps=run.steps, encode_steps=run.sampler_steps,
                                 scale=run.scale, eta=run.eta, seed=seed, method=applied, precision=run.precision)
    return gen.decode(model, result.latents, run.precision), result.seconds


def transform_images(model, job: Img2ImgJob, todo: Sequence[int], progress: bool = True) -> Timing:
    """Make the images `todo` (init image indices) into job.outdir; returns their sampling time."""
    run = job.run
    base_text = {"strength": run.strength, "steps": run.steps, "scale": run.scale, "eta": run.eta,
                 "method": job.method.name, "model": job.model.label}
    timing = Timing()
    with job.method.apply(model, run.sampler_steps, seed=run.seed, execution=job.execution) as applied:
        for n, k in enumerate(tqdm(todo, desc=f"img2img ({job.method.name})", unit="img", disable=not progress)):
            image, seconds = transform_image(model, job, applied, k)
            timing.seconds += seconds
            if n >= job.warmup_images:
                timing.timed_seconds += seconds
                timing.timed_images += 1
            atomic_save_png(to_uint8_images(image)[0], png_path(job.outdir, k),
                            dict(base_text, init_img=str(job.init_images[k]), prompt=job.prompts[k], index=k,
                                 seed=run.seed + k))
    return timing


def write_manifest(job: Img2ImgJob, previous: Optional[Dict[str, Any]], info: DistInfo, device: torch.device,
                   totals: Sequence[float], generated: int, wall_seconds: float) -> Dict[str, Any]:
    """Rank 0: merge this run into OUTDIR/manifest.json (runs are kept, timing summed over them)."""
    run = run_record(info, device, totals, generated, wall_seconds, warmup_images=job.warmup_images)
    return merge_manifest(
        job.outdir, job.total, job.method, job.settings(), previous, run,
        file_names="{i:06d}.png: init image i (the folder's i-th image file), prompt line i + 1, seed + i",
        timing_what="img2img's DDIM loop per image (no VAE encode/decode, no text encoder), mean over the timed "
                    "images of every process and run")


def run_img2img_set(job: Img2ImgJob, info: DistInfo, device: torch.device, progress: bool = True,
                    load_model: Optional[Callable[..., torch.nn.Module]] = None,
                    log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Make every missing image of `job` on this rank (of `info.world`), then rank 0 writes the manifest.
    Returns the manifest (rank 0) or {}."""
    return run_image_job(job, check_img2img_job(job), transform_images, write_manifest, info, device, progress,
                         load_model, log)
