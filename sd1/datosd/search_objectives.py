"""Objectives of the strategy search: sample one strategy on a fixed prompt set and score its quality.

Everything here is deterministic for a given model, prompt set, seeds, device and thread count: image k
always starts from the noise of its own seed (``torch.Generator().manual_seed(seeds[k])``, drawn on the CPU),
the batches are fixed, and DaTo's random base tokens are seeded by the first seed of their batch. So a
strategy scores the same in any process, and a search on Dask workers matches a serial one.

Quality (the first objective, lower is better), in these units:

- ``fidelity`` (default, needs no extra weights): the relative RMS error, in percent, of the candidate's
  final latents (``fidelity_space="latent"``, default) or decoded images (``"image"``, pixels in [-1, 1])
  against the unaccelerated run of the same prompts and seeds,
  ``100 * sqrt(sum (x - x_ref)^2 / sum x_ref^2)``. It is a monotone function of the mean squared distance
  (kept as ``mse`` in the extras), so both rank strategies alike; 0 means "identical to the original model".
- ``fid``: FID (``sdeval.fid``) of the decoded images against a pytorch-fid ``.npz`` of reference statistics.
  Meaningful only with a few hundred images or more (the paper: 500 ImageNet-class images).
- ``clip``: minus the mean CLIP score ``100 * max(cos, 0)`` (``sdeval.clip_score``), from local weights.
- ``imagereward``: minus the mean ImageReward (``sdeval.imagereward``, optional extra), from local files.

Latency (the second objective) is in seconds per image. When measured here it is the wall clock of the
sampler loop (UNet calls and sampler arithmetic; text encoding and VAE decoding are not included), summed
over the batches and divided by the number of images. The cost-table latency lives in ``datosd.search``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ldm.runtime import DEMO_CONFIG, latent_shape, load_model, precision_scope, to_uint8_images

from .patch import apply_patch, remove_patch
from .strategy import Strategy

__all__ = [
    "QUALITIES",
    "QUALITY_AXIS",
    "QUALITY_UNITS",
    "EvalResult",
    "ModelSpec",
    "ObjectiveError",
    "QualitySpec",
    "SamplingSpec",
    "StrategyEvaluator",
    "file_sha256",
]

QUALITIES = ("fidelity", "fid", "clip", "imagereward")
QUALITY_UNITS = {
    "fidelity": "relative RMS error vs the unaccelerated run, percent (0 = identical)",
    "fid": "FID against --fid-ref",
    "clip": "minus the mean CLIP score (100 * max(cos, 0))",
    "imagereward": "minus the mean ImageReward",
}
QUALITY_AXIS = {
    "fidelity": "fidelity: relative RMS error, %",
    "fid": "FID",
    "clip": "minus CLIP score",
    "imagereward": "minus ImageReward",
}
FIDELITY_SPACES = ("latent", "image")


class ObjectiveError(ValueError):
    """An objective that cannot be computed (missing weights, extra or reference); raised before any work."""


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_identity(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """Resolved path and size of a weights file: enough to tell two files apart without hashing gigabytes."""
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- what is evaluated --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build: the tiny demo model, or a CompVis config with a checkpoint.

    A spec is small and picklable, so each Dask worker builds its own copy of the model from it.
    """

    demo: bool
    config: str
    ckpt: str
    ema: bool = False
    device: str = "cpu"

    def check(self) -> None:
        """Raise ObjectiveError when the config or checkpoint file is missing (nothing is loaded)."""
        if self.demo:
            return
        if not Path(self.config).is_file():
            raise ObjectiveError(f"config file not found: {self.config}")
        if not Path(self.ckpt).is_file():
            raise ObjectiveError(
                f"checkpoint not found: {self.ckpt}. Pass --ckpt PATH to a .ckpt or .safetensors file, "
                f"or run with --demo to try the search on the built-in tiny model with random weights."
            )

    def identity(self) -> Dict[str, Any]:
        """What the model's outputs depend on: 'demo' (its config hash) or config hash + checkpoint path/size."""
        if self.demo:
            return {"model": "demo", "config_sha256": file_sha256(DEMO_CONFIG)}
        return {"model": "checkpoint", "config_sha256": file_sha256(self.config), "ckpt": _file_identity(self.ckpt),
                "ema": self.ema}

    def build(self) -> torch.nn.Module:
        """Load the LatentDiffusion on ``device``, in eval mode."""
        return load_model(self.config, self.ckpt, torch.device(self.device), use_ema=self.ema, demo=self.demo,
                          verbose=False)


@dataclass(frozen=True)
class SamplingSpec:
    """The fixed sampling every candidate gets: prompts, one seed per image, sampler settings.

    Attributes:
        prompts: one prompt per image.
        seeds: one seed per image (image k starts from the noise of seeds[k]).
        steps: S as given to the sampler (``--steps``); the strategy has one entry per step actually run.
        sampler: 'plms' or 'ddim' (eta 0).
        scale: classifier-free guidance scale.
        height, width: image size in pixels.
        batch_size: images per sampler call.
        precision: 'full' (float32) or 'autocast'.
    """

    prompts: Tuple[str, ...]
    seeds: Tuple[int, ...]
    steps: int
    sampler: str
    scale: float
    height: int
    width: int
    batch_size: int
    precision: str

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds) or not self.prompts:
            raise ValueError(f"need one seed per prompt, got {len(self.prompts)} prompts and {len(self.seeds)} seeds")

    @property
    def n_images(self) -> int:
        return len(self.prompts)

    def batches(self) -> List[range]:
        """Image index ranges of the sampler calls, in order."""
        return [range(i, min(i + self.batch_size, self.n_images)) for i in range(0, self.n_images, self.batch_size)]

    def identity(self) -> Dict[str, Any]:
        data = asdict(self)
        data["prompts"], data["seeds"] = list(self.prompts), list(self.seeds)
        return data


@dataclass(frozen=True)
class QualitySpec:
    """The quality objective and the local files it needs."""

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
    def units(self) -> str:
        return QUALITY_UNITS[self.kind]

    def check(self, n_images: int) -> None:
        """Raise ObjectiveError, with what to do, when the objective cannot run. Creates nothing."""
        if self.kind not in QUALITIES:
            raise ObjectiveError(f"unknown quality objective {self.kind!r}; expected one of {', '.join(QUALITIES)} "
                                 f"(fidelity needs no extra weights).")
        unused = {"--fid-ref": self.fid_ref if self.kind != "fid" else None,
                  "--inception-weights": self.inception_weights if self.kind != "fid" else None,
                  "--clip-weights": self.clip_weights if self.kind != "clip" else None,
                  "--imagereward-weights": self.imagereward_weights if self.kind != "imagereward" else None,
                  "--imagereward-med-config": self.imagereward_med_config if self.kind != "imagereward" else None}
        for flag, value in unused.items():
            if value is not None:
                raise ObjectiveError(f"{flag} is not used by --quality {self.kind}; drop it or pick the quality "
                                     f"objective it belongs to.")
        if self.kind == "fidelity":
            if self.fidelity_space not in FIDELITY_SPACES:
                raise ObjectiveError(f"--fidelity-space must be one of {', '.join(FIDELITY_SPACES)}, "
                                     f"got {self.fidelity_space!r}")
        elif self.kind == "fid":
            self._check_fid(n_images)
        elif self.kind == "clip":
            self._check_clip()
        else:
            self._check_imagereward()

    def _check_fid(self, n_images: int) -> None:
        if self.fid_ref is None:
            raise ObjectiveError("--quality fid needs --fid-ref FILE.npz: reference Inception statistics (mu, sigma), "
                                 "e.g. from scripts/eval_fid.py --save-stats.")
        if not Path(self.fid_ref).is_file():
            raise ObjectiveError(f"--fid-ref file not found: {self.fid_ref}. Make it once with "
                                 f"scripts/eval_fid.py --samples REF_IMAGES/ --save-stats {self.fid_ref}.")
        if importlib.util.find_spec("pytorch_fid") is None:
            raise ObjectiveError("--quality fid needs the pytorch-fid package: pip install pytorch-fid "
                                 "(or pip install -e '.[metrics]').")
        from sdeval.fid import load_statistics
        from sdeval.inception import missing_weights_message

        try:
            load_statistics(self.fid_ref)
        except (OSError, ValueError) as err:
            raise ObjectiveError(f"--fid-ref {self.fid_ref} is not a pytorch-fid statistics .npz with mu (2048,) "
                                 f"and sigma (2048, 2048): {err}") from None
        if self.random_inception_seed is None:
            if self.inception_weights is None:
                raise ObjectiveError("--quality fid needs --inception-weights PATH (pytorch-fid's "
                                     "pt_inception-2015-12-05-6726825d.pth).")
            if not Path(self.inception_weights).is_file():
                raise ObjectiveError(missing_weights_message(self.inception_weights))
        if n_images < 2:
            raise ObjectiveError(f"FID needs at least 2 images per candidate, got --n-prompts {n_images} "
                                 f"(the paper uses 500).")

    def _check_clip(self) -> None:
        if importlib.util.find_spec("open_clip") is None:
            raise ObjectiveError("--quality clip needs the open_clip package: pip install open-clip-torch")
        from sdeval.clip_score import missing_weights_message, resolve_arch

        try:
            resolve_arch(self.clip_arch)
        except ValueError as err:
            raise ObjectiveError(str(err)) from None
        if self.clip_weights is None:
            raise ObjectiveError(f"--quality clip needs --clip-weights PATH, a local open_clip checkpoint for "
                                 f"{self.clip_arch}")
        if not Path(self.clip_weights).is_file():
            raise ObjectiveError(missing_weights_message(self.clip_weights, self.clip_arch))

    def _check_imagereward(self) -> None:
        from sdeval import imagereward

        if not imagereward.is_available():
            raise ObjectiveError(imagereward.INSTALL_HINT)
        for path, what, flag in ((self.imagereward_weights, "weights", "--imagereward-weights"),
                                 (self.imagereward_med_config, "med_config", "--imagereward-med-config")):
            if path is None:
                raise ObjectiveError(f"--quality imagereward needs {flag} PATH")
            if not Path(path).is_file():
                raise ObjectiveError(imagereward.missing_file_message(path, what))

    def identity(self) -> Dict[str, Any]:
        """The settings and files the quality values depend on (part of every evaluation's key)."""
        if self.kind == "fidelity":
            return {"kind": "fidelity", "space": self.fidelity_space}
        if self.kind == "fid":
            inception = (_file_identity(self.inception_weights) if self.random_inception_seed is None
                         else {"random_init_seed": self.random_inception_seed})
            return {"kind": "fid", "ref_sha256": file_sha256(self.fid_ref), "inception": inception}
        if self.kind == "clip":
            return {"kind": "clip", "arch": self.clip_arch, "weights": _file_identity(self.clip_weights)}
        return {"kind": "imagereward", "weights": _file_identity(self.imagereward_weights),
                "med_config_sha256": file_sha256(self.imagereward_med_config)}


@dataclass
class EvalResult:
    """One candidate's scores.

    quality: in the objective's units (see ``QUALITY_UNITS``), lower is better; +inf when not finite.
    latency: measured seconds per image, or None when not measured (the caller uses its cost table).
    extras: further numbers (``mse`` for fidelity, ``clip_score``, ...).
    eval_seconds: wall clock of the whole evaluation (sampling and scoring).
    worker: where it ran ('main' or a Dask worker's address).
    """

    quality: float
    latency: Optional[float]
    extras: Dict[str, float] = field(default_factory=dict)
    eval_seconds: float = 0.0
    worker: str = "main"


# --- the evaluator ------------------------------------------------------------------------------------


class StrategyEvaluator:
    """Samples strategies on a fixed prompt set with one model and scores them.

    Build it once per process: the conditioning, the decoded reference and the scoring networks are
    computed or loaded on first use and kept. ``reference`` holds the unaccelerated final latents
    (N, C, h, w) that the fidelity objective compares against (see ``sample(None)``).
    """

    def __init__(self, model: torch.nn.Module, sampling: SamplingSpec, quality: QualitySpec,
                 reference: Optional[torch.Tensor] = None, threads: Optional[int] = None) -> None:
        self.model = model
        self.sampling = sampling
        self.quality = quality
        self.reference = reference
        self.threads = threads
        self.device = model.betas.device
        self._conditioning: Optional[List[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None
        self._reference_images: Optional[torch.Tensor] = None
        self._scorer: Any = None
        self.warmed_up = False

    @classmethod
    def build(cls, model_spec: ModelSpec, sampling: SamplingSpec, quality: QualitySpec,
              reference: Optional[torch.Tensor] = None, threads: Optional[int] = None) -> "StrategyEvaluator":
        """Build the model from its spec (once per process) and wrap it."""
        if threads is not None:
            torch.set_num_threads(threads)
        return cls(model_spec.build(), sampling, quality, reference=reference, threads=threads)

    # --- sampling ---
    def _sampler(self):
        from ldm.models.diffusion.ddim import DDIMSampler
        from ldm.models.diffusion.plms import PLMSSampler

        return PLMSSampler(self.model) if self.sampling.sampler == "plms" else DDIMSampler(self.model)

    def _scope(self):
        return precision_scope(self.sampling.precision, self.device)

    def conditioning(self) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(c, uc) per batch, computed once: c (B, 77, D), uc the empty prompt's (None without guidance)."""
        if self._conditioning is None:
            spec, out = self.sampling, []
            with torch.no_grad(), self._scope():
                for batch in spec.batches():
                    prompts = [spec.prompts[k] for k in batch]
                    c = self.model.get_learned_conditioning(prompts)
                    uc = self.model.get_learned_conditioning(len(prompts) * [""]) if spec.scale != 1.0 else None
                    out.append((c, uc))
            self._conditioning = out
        return self._conditioning

    def sample(self, strategy: Optional[Strategy], n_batches: Optional[int] = None) -> Tuple[torch.Tensor, float]:
        """Sample every image (or the first ``n_batches`` batches) with ``strategy`` (None: the unpatched model).

        Returns: (latents: (N, C, h, w) float32 on the CPU, sampler seconds summed over the batches).
        """
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # per calling thread with OpenMP: set it where sampling runs
        spec = self.sampling
        shape = latent_shape(self.model, spec.height, spec.width)
        sampler = self._sampler()
        latents, seconds = [], 0.0
        batches = list(zip(spec.batches(), self.conditioning()))[:n_batches]
        for batch, (c, uc) in batches:
            noise = [torch.randn(shape, generator=torch.Generator().manual_seed(spec.seeds[k])) for k in batch]
            x_T = torch.stack(noise).to(self.device)
            if strategy is not None:
                apply_patch(self.model, strategy, seed=spec.seeds[batch.start])
            try:
                with torch.no_grad(), self._scope():
                    _sync(self.device)
                    started = time.perf_counter()
                    samples, _ = sampler.sample(S=spec.steps, conditioning=c, batch_size=len(batch), shape=list(shape),
                                                verbose=False, unconditional_guidance_scale=spec.scale,
                                                unconditional_conditioning=uc, eta=0.0, x_T=x_T,
                                                disable_progress=True)
                    _sync(self.device)
                    seconds += time.perf_counter() - started
            finally:
                remove_patch(self.model)
            latents.append(samples.float().cpu())
        return torch.cat(latents), seconds

    def warm_up(self) -> None:
        """One unpatched run of the first batch, so measured latencies do not pay first-call costs."""
        if not self.warmed_up:
            self.sample(None, n_batches=1)
            self.warmed_up = True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) -> images (N, 3, H, W) float32 on the CPU, about [-1, 1]."""
        images = []
        with torch.no_grad(), self._scope():
            for start in range(0, latents.shape[0], self.sampling.batch_size):
                z = latents[start:start + self.sampling.batch_size].to(self.device)
                images.append(self.model.decode_first_stage(z).float().cpu())
        return torch.cat(images)

    # --- scoring ---
    def evaluate(self, strategy: Strategy, measure_latency: bool = False) -> EvalResult:
        """Sample ``strategy`` on every prompt and score it (see the module docstring for the units)."""
        started = time.perf_counter()
        if measure_latency:
            self.warm_up()
        latents, seconds = self.sample(strategy)
        quality, extras = self.score(latents)
        if not math.isfinite(quality):
            extras["non_finite"] = 1.0
            quality = math.inf
        latency = seconds / self.sampling.n_images if measure_latency else None
        return EvalResult(quality=quality, latency=latency, extras=extras,
                          eval_seconds=time.perf_counter() - started)

    def score(self, latents: torch.Tensor) -> Tuple[float, Dict[str, float]]:
        """Quality of final latents (N, C, h, w): (value, extras)."""
        kind = self.quality.kind
        if kind == "fidelity":
            return self._fidelity(latents)
        images = to_uint8_images(self.decode(latents))
        if kind == "fid":
            return self._fid(images)
        if kind == "clip":
            return self._clip(images)
        if kind == "imagereward":
            return self._imagereward(images)
        raise ObjectiveError(f"unknown quality objective {kind!r}")

    def _fidelity(self, latents: torch.Tensor) -> Tuple[float, Dict[str, float]]:
        if self.reference is None:
            raise RuntimeError("the fidelity objective needs the unaccelerated reference latents")
        if self.quality.fidelity_space == "latent":
            x, ref = latents, self.reference
        else:
            if self._reference_images is None:
                self._reference_images = self.decode(self.reference)
            x, ref = self.decode(latents), self._reference_images
        x, ref = x.double(), ref.double()
        squared = (x - ref).pow(2).sum().item()
        relative = 100.0 * math.sqrt(squared / max(ref.pow(2).sum().item(), 1e-300))
        return relative, {"mse": squared / ref.numel()}

    @staticmethod
    def _pil(images: List[np.ndarray]):
        from PIL import Image

        return [Image.fromarray(image) for image in images]

    def _fid(self, images: List[np.ndarray]) -> Tuple[float, Dict[str, float]]:
        from sdeval.fid import feature_statistics, frechet_distance, load_statistics
        from sdeval.images import to_inception_input
        from sdeval.inception import build_fid_inception

        if self._scorer is None:
            q = self.quality
            net = (build_fid_inception(q.inception_weights) if q.random_inception_seed is None
                   else build_fid_inception(random_init_seed=q.random_inception_seed))
            self._scorer = (net.to(self.device), load_statistics(q.fid_ref))
        net, (ref_mu, ref_sigma) = self._scorer
        pools = []
        with torch.inference_mode():
            pil = self._pil(images)
            for start in range(0, len(pil), 32):
                x = torch.stack([to_inception_input(img) for img in pil[start:start + 32]]).to(self.device)
                pools.append(net(x).double().cpu())
        mu, sigma = feature_statistics(torch.cat(pools).numpy())
        return frechet_distance(mu, sigma, ref_mu, ref_sigma), {}

    def _clip(self, images: List[np.ndarray]) -> Tuple[float, Dict[str, float]]:
        from sdeval.clip_score import load_open_clip

        if self._scorer is None:
            model, preprocess, tokenizer = load_open_clip(self.quality.clip_arch, self.quality.clip_weights,
                                                          self.device)
            with torch.inference_mode():
                text = model.encode_text(tokenizer(list(self.sampling.prompts)).to(self.device)).float()
            self._scorer = (model, preprocess, text)
        model, preprocess, text = self._scorer
        with torch.inference_mode():
            x = torch.stack([preprocess(img) for img in self._pil(images)]).to(self.device)
            cos = torch.nn.functional.cosine_similarity(model.encode_image(x).float(), text, dim=-1)
            score = float((100 * cos.clamp(min=0)).double().mean())
        return -score, {"clip_score": score}

    def _imagereward(self, images: List[np.ndarray]) -> Tuple[float, Dict[str, float]]:
        from sdeval.imagereward import load_imagereward

        if self._scorer is None:
            self._scorer = load_imagereward(self.quality.imagereward_weights, self.quality.imagereward_med_config,
                                            self.device)
        with torch.inference_mode():
            rewards = [float(self._scorer.score(prompt, img))
                       for prompt, img in zip(self.sampling.prompts, self._pil(images))]
        mean = float(np.mean(rewards))
        return -mean, {"imagereward": mean}
