"""`scripts/train_shapes.py`: train the shapes model on this CPU and export it as a CompVis checkpoint.

    python scripts/train_shapes.py                      # the shipped model: about 95 minutes on 2 CPU cores
    python scripts/train_shapes.py --steps 20 --vae-steps 20 --pool-size 512 --outdir /tmp/t --export /tmp/t/m.safetensors

The run lives in --outdir (state.pt, pool.pt, loss.png): Ctrl-C stops at the end of a step and the same command
resumes. The checkpoint goes to --export with its record (.json: command, seed, settings, steps, final losses,
seconds per phase, commit); an existing file is replaced only with --force.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from sdgen.cli import run
from sdgen.resources import SHAPES_CONFIG, SHAPES_WEIGHTS
from sdgen.runtime import UsageError, set_threads

from .export import git_commit, write_checkpoint
from .plots import plot_losses, smoothed
from .train import TrainSettings, Trainer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainSettings(config=str(SHAPES_CONFIG))
    p.add_argument("--config", default=str(SHAPES_CONFIG), help="model config (default: %(default)s)")
    p.add_argument("--outdir", default="outputs/train-shapes", help="the run's folder (resumable)")
    p.add_argument("--export", default=str(SHAPES_WEIGHTS), help="checkpoint to write at the end (default: the "
                   "shipped demo model, %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --export file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for f in dataclasses.fields(TrainSettings):
        if f.name in ("config", "world"):
            continue
        value = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value,
                       help=f"(default: {value})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parser().parse_args(argv)
    export = Path(opt.export)
    if export.exists() and not opt.force:
        raise UsageError(f"{export} exists; pass --force to replace it, or --export another path")
    if Path(opt.outdir).is_file():
        raise UsageError(f"--outdir {opt.outdir} is a file")
    names = {f.name for f in dataclasses.fields(TrainSettings)} - {"world"}
    settings = TrainSettings(**{k: v for k, v in vars(opt).items() if k in names})
    try:
        settings.check()
    except ValueError as err:
        raise UsageError(str(err)) from None
    set_threads(opt.threads)
    try:
        trainer = Trainer(settings, Path(opt.outdir), progress=not opt.no_progress)
    except ValueError as err:
        raise UsageError(str(err)) from None
    state = trainer.run()
    plot_losses(state.losses, Path(opt.outdir) / "loss.png", title=f"shapes model, seed {settings.seed}")
    final = {phase: float(smoothed([v for _, v in rows], 100)[-1]) for phase, rows in state.losses.items() if rows}
    record = {
        "command": "python scripts/train_shapes.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "seed": settings.seed, "settings": dataclasses.asdict(settings),
        "commit": git_commit(Path(__file__).resolve().parent),
        "steps": {"vae": settings.vae_steps, "diffusion": settings.steps, "layout": settings.layout_steps,
                  "placement": settings.placement_steps, "polish": settings.polish_steps},
        "final_losses_mean_of_last_100": final, "seconds": state.seconds,
        "minutes_total": round(sum(state.seconds.values()) / 60, 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "weights": "EMA of the UNet and text encoder, float16",
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    record = write_checkpoint(trainer.ema_model(), export, record)
    print(f"wrote {export} ({record['bytes'] / 1e6:.1f} MB) and {export.with_suffix('.json')}; "
          f"losses {final}; {record['minutes_total']} minutes")
    return 0


def cli() -> int:
    return run(main, resumable=True)
