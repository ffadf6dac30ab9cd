"""The table driver's one link to sdeval: measure a folder of images (FID, CLIP score, Inception Score).

The metric networks are built once per table run and reused for every row; a folder reference's Inception
statistics are computed once. Kept in this one module so that it can move onto sdeval's evaluation library
(the scripts/eval_fid.py functions) in one place.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdeval.clip_score import clip_scores, load_open_clip
from sdeval.images import list_images
from sdeval.prompts import prompts_for_images

METRICS = ("fid", "clip", "is")
SMOKE_INCEPTION_SEED = 0  # smoke runs: a seeded random-init Inception (numbers mean nothing)


def check_inputs(metrics: Sequence[str], reference: Optional[str], clip_arch: str) -> List[str]:
    """Problems with a run's evaluation inputs that would otherwise show only after the images are made: an
    unreadable .npz reference, an unknown CLIP architecture."""
    problems = []
    if "fid" in metrics and reference and Path(reference).is_file():
        from sdeval.fid import load_statistics

        try:
            load_statistics(reference)
        except Exception as err:  # any failure to read it (numpy, zip, shapes) is reported the same way
            problems.append(f"FID reference {reference} is not an .npz of Inception statistics (mu, sigma): "
                            f"{str(err).split('. ')[0]}; make one with scripts/eval_fid.py --save-stats")
    if "clip" in metrics:
        from sdeval.clip_score import resolve_arch

        try:
            resolve_arch(clip_arch)
        except ValueError as err:
            problems.append(f"CLIP_ARCH: {err}")
    return problems


class Evaluator:
    """Measures image folders with the networks of one table run.

    metrics: subset of METRICS. inception_weights: pytorch-fid's .pth, or inception_seed for a seeded
    random-init network (tests and smoke runs only). clip_arch / clip_weights: an open_clip model.
    """

    def __init__(self, metrics: Sequence[str], *, inception_weights: Optional[str] = None,
                 inception_seed: Optional[int] = None, clip_arch: str = "", clip_weights: Optional[str] = None,
                 is_splits: int = 10, device: str = "cpu", batch_size: int = 50, num_workers: int = 0,
                 progress: bool = False):
        self.metrics = tuple(m for m in METRICS if m in metrics)
        self.inception_weights, self.inception_seed = inception_weights, inception_seed
        self.clip_arch, self.clip_weights = clip_arch, clip_weights
        self.is_splits = is_splits
        self.loader = dict(batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
        self._inception = None
        self._clip = None
        self._references: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}

    @property
    def inception(self):
        if self._inception is None:
            from sdeval.inception import build_fid_inception  # pytorch-fid and torchvision: imported when used

            if self.inception_seed is not None:
                self._inception = build_fid_inception(random_init_seed=self.inception_seed)
            else:
                self._inception = build_fid_inception(self.inception_weights)
        return self._inception

    @property
    def clip(self):
        """(model, preprocess, tokenizer) of the open_clip model."""
        if self._clip is None:
            self._clip = load_open_clip(self.clip_arch, self.clip_weights, self.loader["device"])
        return self._clip

    def reference_statistics(self, reference: str) -> Tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of an .npz of Inception statistics, or of a folder of images (computed once)."""
        from sdeval.fid import feature_statistics, load_statistics
        from sdeval.inception import extract_inception

        if reference not in self._references:
            if Path(reference).is_dir():
                pool, _ = extract_inception(list_images(reference), self.inception, **self.loader)
                self._references[reference] = feature_statistics(pool)
            else:
                self._references[reference] = load_statistics(reference)
        return self._references[reference]

    def evaluate(self, samples, reference: Optional[str] = None, prompts: Sequence[str] = (),
                 prompts_cycle: bool = False) -> Dict[str, float]:
        """metric -> value for the images in folder `samples` (file k.png pairs with prompts[k] for CLIP)."""
        paths = list_images(samples)
        values: Dict[str, float] = {}
        if "fid" in self.metrics or "is" in self.metrics:
            from sdeval.fid import feature_statistics, frechet_distance
            from sdeval.inception import extract_inception
            from sdeval.inception_score import inception_score

            pool, logits = extract_inception(paths, self.inception, **self.loader)
            if "fid" in self.metrics:
                mu, sigma = feature_statistics(pool)
                values["fid"] = frechet_distance(mu, sigma, *self.reference_statistics(reference))
            if "is" in self.metrics:
                values["is"], _ = inception_score(logits, splits=self.is_splits)
        if "clip" in self.metrics:
            model, preprocess, tokenizer = self.clip
            paired = prompts_for_images(paths, list(prompts), cycle=prompts_cycle)
            values["clip"] = float(clip_scores(model, preprocess, tokenizer, paths, paired, **self.loader).mean())
        return values
