"""img2img over a folder of init images, one prompt each, for evaluation: seeded per image, sharded over
torchrun processes, resumable (the image-to-image sibling of prompt_set.py).

Init image i (the i-th file of the folder in index-then-name order, as sdeval lists them) gets prompt i and
seed `seed + i`, and is transformed exactly as `img2img.py --init-img FILE --prompt PROMPT --seed SEED+i
--n_samples 1` does it (the same random draws), so any one image can be re-made with the script. It is
written to OUTDIR/{i:06d}.png through a temp file and a rename; a run skips every index whose PNG is complete.
OUTDIR/manifest.json records the settings (a rerun with other settings is refused), every run and the
sampling time per image (the DDIM loop; the first image of each process is a warm-up and not timed):
`image_jobs`, whose `run_image_job(job, ...)` runs the job.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch
from tqdm import tqdm

from . import generate as gen
from .compiled import EAGER, Execution
from .image_jobs import Timing, file_sha256
from .images import atomic_save_png, load_init_image, to_uint8_images
from .methods import Method
from .runtime import UsageError
from .settings import RunSettings
from .sharding import png_path


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

    IGNORED_SETTINGS = ()
    FILE_NAMES = "{i:06d}.png: init image i (the folder's i-th image file), prompt line i + 1, seed + i"
    TIMING_WHAT = ("img2img's DDIM loop per image (no VAE encode/decode, no text encoder), mean over the timed "
                   "images of every process and run")

    def __post_init__(self) -> None:
        if len(self.prompts) < self.total:
            raise UsageError(f"{self.total} init images but only {len(self.prompts)} prompts in {self.prompt_file}")

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

    def record_settings(self) -> Dict[str, Any]:
        return {"warmup_images": self.warmup_images}

    def make_images(self, model, todo: Sequence[int], progress: bool = True) -> Timing:
        """Make the images `todo` (init image indices) into outdir; returns their sampling time."""
        run = self.run
        base_text = {"strength": run.strength, "steps": run.steps, "scale": run.scale, "eta": run.eta,
                     "method": self.method.name, "model": self.model.label}
        timing = Timing()
        with self.method.apply(model, run.sampler_steps, seed=run.seed, execution=self.execution) as applied:
            for n, k in enumerate(tqdm(todo, desc=f"img2img ({self.method.name})", unit="img",
                                       disable=not progress)):
                image, seconds = self.transform_image(model, applied, k)
                timing.seconds += seconds
                if n >= self.warmup_images:
                    timing.timed_seconds += seconds
                    timing.timed_images += 1
                atomic_save_png(to_uint8_images(image)[0], png_path(self.outdir, k),
                                dict(base_text, init_img=str(self.init_images[k]), prompt=self.prompts[k], index=k,
                                     seed=run.seed + k))
        return timing

    def transform_image(self, model, applied, k: int) -> Tuple[torch.Tensor, float]:
        """Init image k -> (decoded image (1, 3, H, W), sampler seconds), with img2img.py's random draws."""
        run = self.run
        seed = run.seed + k
        init = load_init_image(self.init_images[k], multiple=gen.latent_multiple(run.geometry))
        init_latent = gen.encode_image(model, init, seed, run.precision)
        noise_generator = torch.Generator().manual_seed(seed)
        shape = (1, *init_latent.shape[1:])
        torch.randn(shape, generator=noise_generator)  # img2img.py draws its --fixed_code noise first
        noise = torch.randn(shape, generator=noise_generator)
        cond = gen.encode_prompts(model, [self.prompts[k]], run.scale, run.precision)
        result = gen.img2img_latents(model, init_latent, cond, noise, steps=run.steps, encode_steps=run.sampler_steps,
                                     scale=run.scale, eta=run.eta, seed=seed, method=applied, precision=run.precision)
        return gen.decode(model, result.latents, run.precision), result.seconds
