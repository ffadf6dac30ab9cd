"""Where candidates are evaluated: in this process (SerialBackend) or on a Dask cluster (DaskBackend).

A backend takes (key, strategy) jobs and yields (key, EvalResult) as they finish. On Dask, every worker builds
its evaluator once, in a worker plugin (``dato_search.dask_worker``), from an ``EvaluatorRecipe``; evaluation
is deterministic, so the results equal the serial ones. Dask (the `search` extra) is imported only when used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch

from datosd.strategy import Strategy
from sdgen.runtime import set_threads

from sdgen.generate import ModelRef

from .evaluator import CandidateSampler, EvalResult, SamplingSpec, StrategyEvaluator
from .objectives import QualitySpec, build_objective

CONNECT_TIMEOUT_S = 5  # joining a scheduler that does not answer fails after this long


class BackendError(RuntimeError):
    """A cluster that cannot be reached or started."""


@dataclass
class EvaluatorRecipe:
    """Everything a process needs to build a StrategyEvaluator (small enough to send to Dask workers)."""

    model: ModelRef
    device: str
    sampling: SamplingSpec
    quality: QualitySpec
    reference: Optional[torch.Tensor]
    threads: int
    measure_latency: bool

    def build(self) -> StrategyEvaluator:
        set_threads(self.threads)
        model = self.model.load(torch.device(self.device), verbose=False)
        sampler = CandidateSampler(model, self.sampling, threads=self.threads)
        objective = build_objective(self.quality, self.sampling.prompts, sampler.device, reference=self.reference)
        return StrategyEvaluator(sampler, objective)


class SerialBackend:
    """Evaluates in this process, one strategy after another."""

    def __init__(self, evaluator: StrategyEvaluator, measure_latency: bool) -> None:
        self.evaluator = evaluator
        self.measure_latency = measure_latency

    def evaluate(self, jobs: Sequence[Tuple[str, Strategy]]) -> Iterator[Tuple[str, EvalResult]]:
        for key, strategy in jobs:
            yield key, self.evaluator.evaluate(strategy, self.measure_latency)

    def close(self) -> None:
        pass


class DaskBackend:
    """Evaluates a generation's strategies in parallel on a Dask cluster: a local one of `workers` processes
    (1 thread each), or the running one at `scheduler`. Connecting happens here, before any model is built,
    so an unreachable scheduler fails within ``CONNECT_TIMEOUT_S`` seconds."""

    def __init__(self, workers: int, scheduler: Optional[str]) -> None:
        from distributed import Client, LocalCluster

        self.cluster = None
        self.plugin_name: Optional[str] = None
        if scheduler:
            self.description = f"joined the cluster at {scheduler}"
            try:
                self.client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, ValueError) as err:
                raise BackendError(f"--scheduler {scheduler}: no Dask scheduler answered within "
                                   f"{CONNECT_TIMEOUT_S} s ({err}); start one (`dask scheduler`, then "
                                   f"`dask worker {scheduler}`) or search without --scheduler") from None
        else:
            self.description = f"started a local cluster of {workers} worker processes, 1 thread each"
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)

    def start(self, recipe: EvaluatorRecipe, plugin_name: str) -> None:
        """Give every worker the recipe of its evaluator (built on its first task)."""
        from .dask_worker import SearchWorkerPlugin

        self.client.register_plugin(SearchWorkerPlugin(recipe), name=plugin_name)
        self.plugin_name = plugin_name

    def evaluate(self, jobs: Sequence[Tuple[str, Strategy]]) -> Iterator[Tuple[str, EvalResult]]:
        from distributed import as_completed

        from .dask_worker import evaluate_on_worker

        futures = {self.client.submit(evaluate_on_worker, self.plugin_name, strategy.to_dict(),
                                      key=f"dato-eval-{key}", pure=False): key
                   for key, strategy in jobs}
        for future in as_completed(list(futures)):
            yield futures[future], future.result()
            future.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
