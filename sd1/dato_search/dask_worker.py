"""The worker side of the Dask backend: a plugin that keeps the worker's evaluator, and the evaluation task.

Imported only when a search runs on Dask (it needs the `search` extra, ``dask[distributed]``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from datosd.strategy import Strategy
from sdgen.runtime import set_threads

from .evaluator import EvalResult, StrategyEvaluator

if TYPE_CHECKING:
    from .backends import EvaluatorRecipe


class SearchWorkerPlugin(WorkerPlugin):
    """Dask worker plugin holding the worker's StrategyEvaluator: built on its first task, then reused.

    The evaluator (model, conditioning, scoring networks) lives on this plugin instance, i.e. in the worker's
    ``plugins`` mapping, not in a module-level cache.
    """

    def __init__(self, recipe: EvaluatorRecipe) -> None:
        self.recipe = recipe
        self.evaluator: Optional[StrategyEvaluator] = None

    def setup(self, worker: Any) -> None:
        set_threads(self.recipe.threads)
        self.evaluator = None

    def teardown(self, worker: Any) -> None:
        self.evaluator = None

    def get_evaluator(self) -> StrategyEvaluator:
        if self.evaluator is None:
            self.evaluator = self.recipe.build()
        return self.evaluator


def evaluate_on_worker(plugin_name: str, strategy: dict) -> EvalResult:
    """Dask task: evaluate one strategy with the worker's own evaluator (see SearchWorkerPlugin)."""
    worker = get_worker()
    plugin = worker.plugins[plugin_name]
    result = plugin.get_evaluator().evaluate(Strategy.from_dict(strategy), plugin.recipe.measure_latency)
    result.worker = str(worker.address)
    return result
