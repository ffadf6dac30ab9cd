"""Generate one image per (prompt, repeat) of a prompt file, for evaluation: seeded per image, sharded, resumable.

    # ImageNet "2 per class": 2 passes over the 1000 class prompts = 2000 images
    python scripts/sample_prompts.py --from-file data/imagenet-class-prompts.txt --repeats 2 \\
        --outdir outputs/imagenet/plms50 --plms --ckpt /path/to/v1-5-pruned-emaonly.safetensors
    # the same, DaTo b1, on 8 GPUs (any number of processes gives the same images)
    torchrun --nproc_per_node 8 scripts/sample_prompts.py --from-file data/imagenet-class-prompts.txt \\
        --repeats 2 --outdir outputs/imagenet/dato-b1 --plms --dato --ckpt ...
    # the pipeline on the tiny random-weight demo model, 4 images
    python scripts/sample_prompts.py --demo --from-file data/imagenet-class-prompts.txt --limit 4 --outdir /tmp/x

Image k (k = repeat * number_of_prompts + prompt_index) uses prompt line (k mod number_of_prompts) + 1 and the
seed --seed + k: its starting noise x_T is drawn from its own CPU generator, so it is the same whatever the
batch size or the number of processes; the other random draws of a sampler call (DaTo's random base tokens,
tomesd's random partition) come from the seed of the batch's first image. It is written to OUTDIR/{k:06d}.png
(through a temp file and a rename). A run skips every index whose PNG is complete (an empty or truncated file is
made again), so an interrupted run is resumed by running it again.

With torchrun, rank r of W makes the indices r, r + W, r + 2W, ...; rank 0 then writes OUTDIR/manifest.json:
method, settings, image count and the measured sampling time per image (the sampler's UNet loop only, x_T to
latents; the first --warmup_batches batches of each process are not timed). Runs that share a folder at once
each add their run to it (it is read again and written under a lock).

Bit-for-bit reproducibility: the same command gives the same PNG bytes with any number of processes when
--batch_size is 1 (and the processes use the same number of CPU threads, or the same GPU type). With larger
batches the float math of a batched matrix product can differ from the unbatched one in the last bits, so an
image can change by about one grey level when it lands in a different batch, and the per-batch random draws
of DaTo and ToMeSD follow the batch's first image.
"""
import argparse
import sys
from pathlib import Path

import torch
from ldm.checkpoint import CheckpointError

from .. import generate as gen
from ..generate import ModelRef
from ..methods import REGISTRY, MethodError, Registry
from ..image_jobs import check_job, run_image_job
from ..prompt_set import PromptSetJob, image_count
from ..prompts import long_prompt_warning, read_prompts
from ..runtime import UsageError, pick_device, seed_everything
from ..settings import RunSettings, SettingFlags
from ..sharding import dist_info_from_env
from . import run
from .flags import add_acceleration_args, add_model_args, execution_from_args, method_from_args, resolve_model_args


def build_parser(registry: Registry = REGISTRY) -> argparse.ArgumentParser:
    """The flags; the method flags are those of `registry`'s kinds."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-file", "--from_file", dest="from_file", type=str, required=True,
                   help="prompt file, one prompt per line (e.g. data/imagenet-class-prompts.txt)")
    p.add_argument("--outdir", type=str, required=True, help="folder for the PNGs and manifest.json")
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over the prompt file (ImageNet '2 per class' = 2); images = repeats x prompts")
    p.add_argument("--limit", type=int, default=None, help="make only the first LIMIT images (global indices)")
    p.add_argument("--seed", type=int, default=0, help="image k gets seed SEED + k")
    p.add_argument("--batch_size", type=int, default=1, help="images per sampler call (prompts may differ)")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use plms sampling (default ddim, eta 0)")
    p.add_argument("--scale", type=float, default=7.5,
                   help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    p.add_argument("--H", type=int, default=None, help="image height, in pixel space (default: the size the model "
                                                       "was trained at, e.g. 512; the shapes model 64)")
    p.add_argument("--W", type=int, default=None, help="image width, in pixel space (default: as --H)")
    p.add_argument("--C", type=int, default=None, help="latent channels (fixed by the model; default its own)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (fixed by the model; default its own)")
    p.add_argument("--warmup_batches", type=int, default=1,
                   help="batches per process left out of the timing (GPU warm-up); they are still saved")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_acceleration_args(p, registry)
    return p


FLAGS = SettingFlags(sampler="--plms", steps="--ddim_steps", batch="--batch_size")


def job_from_args(opt) -> PromptSetJob:
    """Check every flag and build the job; raises UsageError/CheckpointError/StrategyError. Writes nothing."""
    if opt.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {opt.repeats}")
    if opt.limit is not None and opt.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {opt.limit}")
    if opt.warmup_batches < 0:
        raise UsageError(f"--warmup_batches must be 0 or more, got {opt.warmup_batches}")
    model = ModelRef(opt.config, opt.ckpt, opt.ema, opt.demo)
    geometry = model.geometry()
    opt.H = geometry.default_size if opt.H is None else opt.H
    opt.W = geometry.default_size if opt.W is None else opt.W
    gen.check_geometry(geometry, opt.C, opt.f)
    try:
        prompts = read_prompts(opt.from_file)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--from-file: {err}") from None
    total = image_count(len(prompts), opt.repeats, opt.limit)
    run = RunSettings.resolve(flags=FLAGS, sampler="plms" if opt.plms else "ddim", steps=opt.ddim_steps,
                              scale=opt.scale, precision=opt.precision, height=opt.H, width=opt.W,
                              batch=min(opt.batch_size, total), seed=opt.seed, seed_count=total,
                              device=str(pick_device(opt.device)), geometry=geometry)
    model.check()
    method = method_from_args(opt)
    return PromptSetJob(outdir=Path(opt.outdir), prompts=tuple(prompts), prompt_file=opt.from_file, method=method,
                        model=model, run=run.for_method(method, FLAGS), repeats=opt.repeats, limit=opt.limit,
                        warmup_batches=opt.warmup_batches, execution=execution_from_args(opt))


def main(argv=None, registry: Registry = REGISTRY) -> int:
    opt = resolve_model_args(build_parser(registry).parse_args(argv))
    try:
        job = job_from_args(opt)
        info = dist_info_from_env()
        device = pick_device(opt.device)
        if device.type == "cuda" and info.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                             f"start at most that many processes per node")
        check_job(job)
    except (UsageError, CheckpointError, MethodError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seed_everything(opt.seed)
    if info.is_main:
        if (banner := gen.model_banner(opt.config, opt.demo)) is not None:
            print(banner)
        print(f"{job.total} images ({len(job.prompts)} prompts x {job.repeats} repeats"
              f"{'' if job.limit is None else f', limit {job.limit}'}) in {job.outdir}, {info.world} process(es); "
              f"method: {job.method.name} = {job.method.label}")
        if (note := job.run.method_note(job.method, FLAGS)) is not None:
            print(f"note: {note}")
        if (warning := long_prompt_warning(job.prompts[:job.total])) is not None:
            print(f"warning: {warning}", file=sys.stderr)
    run_image_job(job, info, device, progress=not opt.no_progress)
    return 0


def cli() -> int:
    return run(main, resumable=True)


if __name__ == "__main__":
    sys.exit(cli())
