"""Sharded, resumable image generation: ranks, rank-strided indices, per-image seeds, atomic PNG writes.

The shape follows DiT's `sample_ddp.py`: `torchrun` starts W processes, rank r takes the global image
indices r, r + W, r + 2W, ... and writes one PNG per image named by its global index. As in EDM, image k
gets its own seed (base + k) and its own generator, so its starting noise does not depend on the batch
size or on the number of processes.
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

from .images import is_complete_png, made_folder, temp_path
from .runtime import synchronize

PNG_NAME = "{:06d}.png"  # image k of a prompt set


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank r of `world` processes, GPU `local_rank` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Rank, world size and local rank from the variables torchrun sets (1 process without them)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank=rank, world=world, local_rank=local_rank)


def init_distributed(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group when there is more than one process; returns the device this rank uses.

    gloo on CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK). With one process nothing is initialised.
    """
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.world > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier(info: DistInfo, device: torch.device) -> None:
    if info.world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def all_reduce_sum(info: DistInfo, device: torch.device, values: Sequence[float]) -> List[float]:
    """Sum a few numbers over all ranks (float64); returns them unchanged with one process."""
    if info.world == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def finish_distributed(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard_indices(total: int, info: DistInfo) -> range:
    """The global indices rank r of W owns: r, r + W, r + 2W, ... below `total`."""
    return range(info.rank, total, info.world)


def png_path(outdir, k: int) -> Path:
    return Path(outdir) / PNG_NAME.format(k)


def missing_indices(outdir, indices) -> List[int]:
    """The indices without a complete PNG yet (a resumed run makes only these; a 0-byte or truncated file is
    made again)."""
    return [k for k in indices if not is_complete_png(png_path(outdir, k))]


def run_sharded(outdir, total: int, info: DistInfo, device: torch.device,
                make_images: Callable[[torch.device, List[int]], Sequence[float]],
                write_manifest: Callable[[torch.device, Sequence[float], int, float], Dict[str, Any]],
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """One rank's part of a sharded image set of `total` images in `outdir` (DiT's sample_ddp shape).

    Joins the process group, drops this rank's leftover temp files, calls `make_images(device, todo)` for its
    missing indices (only when there are some, so the model is loaded only then) -> (seconds, timed_seconds,
    timed_images), sums those and the image count over the ranks, and rank 0 calls
    `write_manifest(device, (seconds, timed_seconds, timed_images), generated, wall_seconds)`.
    Returns the manifest (rank 0) or {}.
    """
    started = time.perf_counter()
    device = init_distributed(info, device)
    try:
        mine = list(shard_indices(total, info))
        todo = missing_indices(outdir, mine)
        broken = [png_path(outdir, k).name for k in todo if png_path(outdir, k).exists()]
        if broken:
            log(f"{len(broken)} image(s) are not complete PNG files and are made again: {', '.join(broken[:5])}"
                f"{' ...' if len(broken) > 5 else ''}")
        timing = [0.0, 0.0, 0]
        with made_folder(outdir):  # removed again if this run made it and fails before writing into it
            for k in mine:  # leftovers of an interrupted write of one of this rank's images
                temp_path(png_path(outdir, k)).unlink(missing_ok=True)
            if todo:
                timing = list(make_images(device, todo))
                synchronize(device)
        *totals, generated = all_reduce_sum(info, device, [*timing, len(todo)])
        barrier(info, device)
        if not info.is_main:
            return {}
        manifest = write_manifest(device, totals, int(generated), time.perf_counter() - started)
        log(f"generated {int(generated)} images, {manifest['count']} of {manifest['total']} now in {outdir}")
        return manifest
    finally:
        finish_distributed(info)
