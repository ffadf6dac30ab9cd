"""Generate one image per (prompt, repeat) of a prompt file, for evaluation: seeded per image, sharded, resumable.

    # ImageNet "2 per class": 2 passes over the 1000 class prompts = 2000 images
    python scripts/sample_prompts.py --from-file data/imagenet-class-prompts.txt --repeats 2 \
        --outdir outputs/imagenet/plms50 --plms --ckpt /path/to/v1-5-pruned-emaonly.safetensors
    # the same, DaTo b1, on 8 GPUs (any number of processes gives the same images)
    torchrun --nproc_per_node 8 scripts/sample_prompts.py --from-file data/imagenet-class-prompts.txt \
        --repeats 2 --outdir outputs/imagenet/dato-b1 --plms --dato --ckpt ...
    # the pipeline on the tiny random-weight demo model, 4 images
    python scripts/sample_prompts.py --demo --from-file data/imagenet-class-prompts.txt --limit 4 --outdir /tmp/x

Image k (k = repeat * number_of_prompts + prompt_index) uses prompt line (k mod number_of_prompts) + 1 and the
seed --seed + k: its starting noise x_T is drawn from its own CPU generator, so it is the same whatever the
batch size or the number of processes. It is written to OUTDIR/{k:06d}.png (through a temp file and a rename).
A run skips every index whose PNG exists, so an interrupted run is resumed by running it again.

With torchrun, rank r of W makes the indices r, r + W, r + 2W, ...; rank 0 then writes OUTDIR/manifest.json:
method, settings, image count and the measured sampling time per image (the sampler's UNet loop only, x_T to
latents; the first --warmup_batches batches of each process are not timed).

Bit-for-bit reproducibility: the same command gives the same PNG bytes with any number of processes when
--batch_size is 1 (and the processes use the same number of CPU threads, or the same GPU type). With larger
batches the float math of a batched matrix product can differ from the unbatched one in the last bits, so an
image can change by about one grey level when it lands in a different batch; and with --dato the random base
tokens of the first steps (spec section 3) are drawn per sampler call, so they too depend on the batch.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

try:
    import sdeval  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sd1"))

import torch
from tqdm import tqdm

from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.runtime import DEMO_LABEL, UsageError, latent_shape, load_model, pick_device, precision_scope, to_uint8_images
from sdeval.prompts import read_prompts
from sdeval.sharding import (atomic_save_png, all_reduce_sum, barrier, dist_info_from_env, finish_distributed,
                             image_noise, init_distributed, missing_indices, png_path, shard_indices, temp_path)

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
MANIFEST = "manifest.json"
LOCATION_KEYS = ("prompt_file",)  # where the prompts were read from: the content (prompt_sha256) is what counts


def build_parser():
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
    p.add_argument("--H", type=int, default=None, help="image height, in pixel space (default 512; 128 with --demo)")
    p.add_argument("--W", type=int, default=None, help="image width, in pixel space (default 512; 128 with --demo)")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="path to config which constructs model")
    p.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="path to checkpoint (.ckpt or .safetensors)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (model_ema.*) if it has them")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                   help="autocast = float16 on CUDA, bfloat16 on CPU; full = float32")
    p.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: CUDA when available; with torchrun each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--demo", action="store_true",
                   help="use the built-in tiny model with seeded random weights (no checkpoint needed)")
    p.add_argument("--warmup_batches", type=int, default=1,
                   help="batches per process left out of the timing (GPU warm-up); they are still saved")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    from datosd.cli import add_acceleration_args

    add_acceleration_args(p)
    return p


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def acceleration_settings(acceleration):
    """The resolved acceleration as plain data (what decides the images, not how the flags were spelled)."""
    return {"strategy": acceleration.strategy.to_dict() if acceleration.strategy is not None else None,
            "dato_options": acceleration.dato_options, "tome_ratio": acceleration.tome_ratio}


def check_options(opt):
    """Reject bad input before anything is loaded or written. Returns the plan (a dict)."""
    if opt.H is None:
        opt.H = 128 if opt.demo else 512
    if opt.W is None:
        opt.W = 128 if opt.demo else 512
    for name in ("ddim_steps", "repeats", "batch_size"):
        if getattr(opt, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(opt, name)}")
    if opt.limit is not None and opt.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {opt.limit}")
    if opt.warmup_batches < 0:
        raise UsageError(f"--warmup_batches must be 0 or more, got {opt.warmup_batches}")
    if opt.ddim_steps > 1000:
        raise UsageError("--ddim_steps must be at most 1000 (the number of training timesteps)")
    if not math.isfinite(opt.scale):
        raise UsageError(f"--scale must be a finite number, got {opt.scale}")
    if opt.seed < 0:
        raise UsageError(f"--seed must be 0 or more (image k uses seed + k), got {opt.seed}")
    latent_shape(None, opt.H, opt.W, factor=opt.f, channels=opt.C)
    try:
        prompts = read_prompts(opt.from_file)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--from-file: {err}") from None
    if not opt.demo:
        if not os.path.isfile(opt.config):
            raise UsageError(f"config file not found: {opt.config}")
        if not os.path.exists(opt.ckpt):
            raise CheckpointError(f"checkpoint not found: {opt.ckpt}. Pass --ckpt PATH to a .ckpt or .safetensors "
                                  f"file, or run with --demo to try the pipeline on the tiny random-weight model.")
    steps = len(make_ddim_timesteps("uniform", opt.ddim_steps, 1000, verbose=False))
    from datosd.cli import resolve_acceleration

    acceleration = resolve_acceleration(opt, steps)
    total = len(prompts) * opt.repeats
    if opt.limit is not None:
        total = min(total, opt.limit)
    settings = {
        "model": DEMO_LABEL if opt.demo else {"ckpt": os.path.abspath(opt.ckpt), "config": os.path.abspath(opt.config),
                                              "ema": opt.ema},
        "prompt_file": os.path.abspath(opt.from_file), "prompt_sha256": file_sha256(opt.from_file),
        "n_prompts": len(prompts), "repeats": opt.repeats, "seed": opt.seed,
        "sampler": "plms" if opt.plms else "ddim", "ddim_steps": opt.ddim_steps, "sampler_steps": steps,
        "scale": opt.scale, "H": opt.H, "W": opt.W, "C": opt.C, "f": opt.f, "precision": opt.precision,
        "acceleration": acceleration_settings(acceleration),
    }
    previous = read_manifest(opt.outdir)
    old = (previous or {}).get("settings") or {}
    differing = sorted(k for k in set(old) | set(settings)
                       if k not in LOCATION_KEYS and old.get(k) != settings.get(k))
    if previous is not None and differing:
        raise UsageError(f"{opt.outdir} holds images made with other settings (differing: {', '.join(differing)}; "
                         f"see its {MANIFEST}). Use another --outdir, or delete that folder to start over.")
    return {"prompts": prompts, "total": total, "steps": steps, "acceleration": acceleration,
            "settings": settings, "previous": previous}


def read_manifest(outdir):
    path = Path(outdir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; delete it (the PNGs are kept) and run again") from None


def batches(indices, size):
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def generate(opt, plan, info, device, todo):
    """Make the images `todo` (global indices) of this rank. Returns (timed seconds, timed images, all seconds)."""
    prompts, n = plan["prompts"], len(plan["prompts"])
    model = load_model(opt.config, opt.ckpt, device, use_ema=opt.ema, demo=opt.demo, verbose=info.is_main)
    method = plan["acceleration"].apply(model, seed=opt.seed)
    sampler = PLMSSampler(model) if opt.plms else DDIMSampler(model)
    shape = latent_shape(model, opt.H, opt.W, factor=opt.f, channels=opt.C)
    base_text = {"seed_rule": "seed = base + index", "steps": opt.ddim_steps, "sampler": plan["settings"]["sampler"],
                 "scale": opt.scale, "method": method, "model": DEMO_LABEL if opt.demo else opt.ckpt}
    timed_s = timed_n = all_s = 0.0
    bar = tqdm(total=len(todo), desc=f"sampling ({method})", unit="img", disable=opt.no_progress or not info.is_main)
    with torch.no_grad(), precision_scope(opt.precision, device):
        for b, ks in enumerate(batches(todo, opt.batch_size)):
            batch_prompts = [prompts[k % n] for k in ks]
            x_T = image_noise([opt.seed + k for k in ks], shape).to(device)
            uc = model.get_learned_conditioning(len(ks) * [""]) if opt.scale != 1.0 else None
            c = model.get_learned_conditioning(batch_prompts)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            samples, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=len(ks), shape=list(shape),
                                        verbose=False, unconditional_guidance_scale=opt.scale,
                                        unconditional_conditioning=uc, eta=0.0, x_T=x_T, disable_progress=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            all_s += seconds
            if b >= opt.warmup_batches:
                timed_s += seconds
                timed_n += len(ks)
            images = to_uint8_images(model.decode_first_stage(samples))
            for k, prompt, image in zip(ks, batch_prompts, images):
                text = dict(base_text, prompt=prompt, index=k, seed=opt.seed + k)
                atomic_save_png(image, png_path(opt.outdir, k), text)
            bar.update(len(ks))
    bar.close()
    plan["acceleration"].remove(model)
    return timed_s, timed_n, all_s


def write_manifest(opt, plan, info, device, totals, generated, started_wall):
    """Rank 0: merge this run into OUTDIR/manifest.json (runs are kept, timing summed over them)."""
    timed_s, timed_n, all_s = totals
    present = sum(png_path(opt.outdir, k).is_file() for k in range(plan["total"]))
    runs = list((plan["previous"] or {}).get("runs", []))
    runs.append({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "generated": int(generated),
                 "processes": info.world, "batch_size": opt.batch_size, "device": device_name(device),
                 "warmup_batches": opt.warmup_batches, "sampling_seconds": all_s, "timed_seconds": timed_s,
                 "timed_images": int(timed_n), "wall_seconds": time.perf_counter() - started_wall})
    run_timed_s = sum(r["timed_seconds"] for r in runs)
    run_timed_n = sum(r["timed_images"] for r in runs)
    includes_warmup = run_timed_n == 0
    if includes_warmup:  # every batch was a warm-up one: report them rather than nothing
        run_timed_s = sum(r["sampling_seconds"] for r in runs)
        run_timed_n = sum(r["generated"] for r in runs)
    manifest = {
        "script": "scripts/sample_prompts.py",
        "method": plan["acceleration"].label,
        "settings": plan["settings"],
        "total": plan["total"], "count": present, "complete": present == plan["total"],
        "file_names": "{k:06d}.png, k = repeat * n_prompts + prompt_index; prompt = line (k mod n_prompts) + 1",
        "seconds_per_image": run_timed_s / run_timed_n if run_timed_n else None,
        "timing": {"what": "sampler UNet loop per image (x_T to latents; no text encoder, no VAE decode), "
                           "mean over the timed batches of every process and run",
                   "timed_images": int(run_timed_n), "seconds": run_timed_s, "includes_warmup": includes_warmup},
        "runs": runs,
    }
    path = Path(opt.outdir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return manifest


def device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv=None):
    opt = build_parser().parse_args(argv)
    try:
        plan = check_options(opt)
        info = dist_info_from_env()
        device = pick_device(opt.device)
        if device.type == "cuda" and info.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                             f"start at most that many processes per node")
    except (UsageError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started_wall = time.perf_counter()
    device = init_distributed(info, device)
    try:
        os.makedirs(opt.outdir, exist_ok=True)
        mine = list(shard_indices(plan["total"], info))
        for k in mine:  # leftovers of an interrupted write of one of this rank's images
            temp_path(png_path(opt.outdir, k)).unlink(missing_ok=True)
        todo = missing_indices(opt.outdir, mine)
        if info.is_main:
            if opt.demo:
                print(f"*** {DEMO_LABEL}: images are noise-like by design ***")
            print(f"{plan['total']} images ({len(plan['prompts'])} prompts x {opt.repeats} repeats"
                  f"{'' if opt.limit is None else f', limit {opt.limit}'}) in {opt.outdir}, {info.world} process(es); "
                  f"method: {plan['acceleration'].label}")
        local = generate(opt, plan, info, device, todo) if todo else (0.0, 0, 0.0)
        timed_s, timed_n, all_s, generated = all_reduce_sum(info, device, [*local, len(todo)])
        barrier(info, device)
        if info.is_main:
            manifest = write_manifest(opt, plan, info, device, (timed_s, timed_n, all_s), generated, started_wall)
            per_image = manifest["seconds_per_image"]
            print(f"generated {int(generated)} images, {manifest['count']} of {manifest['total']} now in {opt.outdir}")
            if per_image is not None:
                print(f"sampling time: {per_image:.4f} s per image "
                      f"(over {manifest['timing']['timed_images']} timed images)")
    finally:
        finish_distributed(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
