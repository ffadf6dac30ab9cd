"""Evaluating one candidate strategy: sample it on a fixed prompt set and score its quality.

Sampling goes through the generation API (``sdgen.generate``): the prompts are encoded once per batch, image
k starts from the noise of its own seed (``start_noise``, drawn on the CPU), and the candidate runs as a DaTo
``Method`` of the registry, applied once and re-seeded with the first seed of each batch (DaTo's random base
tokens). So a strategy scores the same in any process, and a search on Dask workers matches a serial one.

Latency, when measured here, is the wall clock of the sampler loop (UNet calls and sampler arithmetic; text
encoding and VAE decoding are not included), summed over the batches and divided by the number of images.
The cost-table latency is in ``dato_search.latency``.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from datosd.strategy import Strategy
from sdgen import generate as gen
from sdgen.methods import dato_method
from sdgen.runtime import set_threads
from sdgen.settings import RunSettings

from .objectives import QualityObjective

__all__ = ["CandidateSampler", "EvalResult", "SamplingSpec", "StrategyEvaluator"]


@dataclass(frozen=True)
class SamplingSpec:
    """The fixed sampling every candidate gets: one prompt and one seed per image (image k starts from the noise
    of seeds[k]), and the run settings (`run.steps` is S as given to the sampler, ``--steps``; the strategy has
    one entry per step actually run, `run.sampler_steps`; eta 0; `run.batch` images per sampler call)."""

    prompts: Tuple[str, ...]
    seeds: Tuple[int, ...]
    run: RunSettings

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds) or not self.prompts:
            raise ValueError(f"need one seed per prompt, got {len(self.prompts)} prompts and {len(self.seeds)} seeds")

    @property
    def n_images(self) -> int:
        return len(self.prompts)

    def batches(self) -> List[range]:
        """Image index ranges of the sampler calls, in order."""
        size = self.run.batch
        return [range(i, min(i + size, self.n_images)) for i in range(0, self.n_images, size)]

    def identity(self) -> Dict[str, Any]:
        run = self.run
        return {"prompts": list(self.prompts), "seeds": list(self.seeds), "steps": run.steps, "sampler": run.sampler,
                "scale": run.scale, "height": run.height, "width": run.width, "batch_size": run.batch,
                "precision": run.precision}


@dataclass
class EvalResult:
    """One candidate's scores.

    quality: in the objective's units (see ``dato_search.objectives``), lower is better; +inf when not finite.
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


class CandidateSampler:
    """Samples strategies on the fixed prompt set of `sampling` with one model (built once per process).

    The conditioning of every batch is encoded on first use and kept.
    """

    def __init__(self, model: torch.nn.Module, sampling: SamplingSpec, threads: Optional[int] = None) -> None:
        self.model = model
        self.sampling = sampling
        self.threads = threads
        self.device = gen.model_device(model)
        self.shape = sampling.run.latent_shape
        self._conditioning: Optional[List[gen.Conditioning]] = None
        self.warmed_up = False

    def conditioning(self) -> List[gen.Conditioning]:
        """One Conditioning per batch: cond (B, 77, D) and the empty prompt's uncond (None without guidance)."""
        if self._conditioning is None:
            spec, run = self.sampling, self.sampling.run
            self._conditioning = [gen.encode_prompts(self.model, [spec.prompts[k] for k in batch], run.scale,
                                                     run.precision, size=run.size) for batch in spec.batches()]
        return self._conditioning

    def sample(self, strategy: Optional[Strategy], n_batches: Optional[int] = None) -> Tuple[torch.Tensor, float]:
        """Sample every image (or the first ``n_batches`` batches) with ``strategy`` (None: the unpatched model).

        Returns: (latents: (N, C, h, w) float32 on the CPU, sampler seconds summed over the batches). The
        unaccelerated run must end in finite latents (NonFiniteLatents); a candidate's NaN latents are returned,
        for the objective to score them +inf.
        """
        set_threads(self.threads)  # per calling thread with OpenMP: set it where sampling runs
        spec, run = self.sampling, self.sampling.run
        applied = (dato_method(strategy).apply(self.model, run.sampler_steps, seed=spec.seeds[0])
                   if strategy is not None else nullcontext())
        latents, seconds = [], 0.0
        with applied as method:
            for batch, cond in list(zip(spec.batches(), self.conditioning()))[:n_batches]:
                x_T = gen.start_noise([spec.seeds[k] for k in batch], self.shape)
                result = gen.sample_latents(self.model, cond, x_T, sampler=run.sampler, steps=run.steps,
                                            scale=run.scale, eta=0.0, seed=spec.seeds[batch.start], method=method,
                                            precision=run.precision, check_finite=strategy is None)
                latents.append(result.latents.float().cpu())
                seconds += result.seconds
        return torch.cat(latents), seconds

    def warm_up(self) -> None:
        """One unpatched run of the first batch, so measured latencies do not pay first-call costs."""
        if not self.warmed_up:
            self.sample(None, n_batches=1)
            self.warmed_up = True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) -> images (N, 3, H, W) float32 on the CPU, about [-1, 1], in sampler batches."""
        size, precision = self.sampling.run.batch, self.sampling.run.precision
        return torch.cat([gen.decode(self.model, latents[start:start + size], precision)
                          for start in range(0, latents.shape[0], size)])


class StrategyEvaluator:
    """Samples a strategy with `sampler` and scores it with `objective` (see ``dato_search.objectives``)."""

    def __init__(self, sampler: CandidateSampler, objective: QualityObjective) -> None:
        self.sampler = sampler
        self.objective = objective

    def evaluate(self, strategy: Strategy, measure_latency: bool = False) -> EvalResult:
        """Sample ``strategy`` on every prompt and score it."""
        started = time.perf_counter()
        if measure_latency:
            self.sampler.warm_up()
        latents, seconds = self.sampler.sample(strategy)
        quality, extras = self.objective.score(latents, self.sampler.decode)
        if not math.isfinite(quality):
            extras["non_finite"] = 1.0
            quality = math.inf
        latency = seconds / self.sampler.sampling.n_images if measure_latency else None
        return EvalResult(quality=quality, latency=latency, extras=extras,
                          eval_seconds=time.perf_counter() - started)
