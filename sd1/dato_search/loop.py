"""The NSGA-II loop (pymoo's ask/tell): ask a generation, serve stored candidates, evaluate the new ones, tell.

The algorithm is re-run from its seed on every invocation and every candidate already in the store is served
from it, so a restarted search replays the finished generations without computing anything and continues
where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from sdgen.costs import CostTable
from sdgen.settings import RunSettings
from datosd.strategy import Strategy

from .front import Point, choose, feasible_points, pareto_front, speedup_shortfall
from .report import write_outputs
from .settings import SearchSettings, SearchUsageError
from .space import SearchSpace
from .store import EvalStore, StoredEval

# NSGA-II operators (spec 8)
SBX_PROB, SBX_ETA = 0.7, 7.0
PM_PROB, PM_ETA = 0.4, 15.0
OPERATORS = {"sbx": {"prob": SBX_PROB, "eta": SBX_ETA}, "pm": {"prob": PM_PROB, "eta": PM_ETA},
             "repair": "rounding", "eliminate_duplicates": True}


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    run_dir: Path
    front: List[Point]
    best: Point
    points: List[Point]
    generations: int
    evaluated: int
    cached: int
    stored: int


def build_algorithm(space: SearchSpace, pop: int, seed: int, constrained: bool = False) -> Tuple[Any, Any]:
    """pymoo NSGA-II with the paper's operators, its first population seeded with uniform strategies;
    `constrained`: the problem has one inequality constraint (``--min-speedup``; pymoo ranks feasible points
    first and infeasible ones by how far they miss).

    Returns: (problem, algorithm).
    """
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    problem = Problem(n_var=space.n_var, n_obj=2, n_ieq_constr=int(constrained), xl=np.zeros(space.n_var, dtype=int),
                      xu=space.upper, vtype=int)
    rows = space.seed_rows()[:pop]
    seen = set(rows)
    rng = np.random.default_rng(seed)
    sampler = IntegerRandomSampling()
    for _ in range(1000):
        if len(rows) >= pop:
            break
        for x in sampler.do(problem, pop, random_state=rng).get("X"):
            row = tuple(int(v) for v in x)
            if row not in seen and len(rows) < pop:
                seen.add(row)
                rows.append(row)
    if len(rows) < pop:
        raise SearchUsageError(f"could not draw {pop} distinct strategies from the search space; lower --pop")
    algorithm = NSGA2(pop_size=pop, sampling=np.array(rows, dtype=int),
                      crossover=SBX(prob=SBX_PROB, eta=SBX_ETA, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=PM_PROB, eta=PM_ETA, vtype=float, repair=RoundingRepair()),
                      eliminate_duplicates=True)
    return problem, algorithm


class _Latency:
    """Latency (seconds per image) and GMACs per image of stored evaluations: from the cost table, or measured."""

    def __init__(self, table: Optional[CostTable], run: RunSettings) -> None:
        self.table, self.run = table, run

    def _predict(self, strategy: Strategy, macs: bool = False) -> float:
        predict = self.table.predict_macs if macs else self.table.predict
        return predict(strategy, self.run.sampler, self.run.geometry.blocks) / self.run.batch

    def of(self, entry: StoredEval) -> float:
        if self.table is None:
            assert entry.latency is not None, "a measured-latency evaluation without its latency"
            return float(entry.latency)
        return self._predict(entry.strategy)

    def gmacs(self, strategy: Strategy) -> Optional[float]:
        if self.table is None or not self.table.macs:
            return None
        try:
            return self._predict(strategy, macs=True) / 1e9
        except KeyError:  # a shared table measured without some MAC counts
            return None

    def full_model(self, steps: int) -> Optional[float]:
        return self._predict(Strategy.full(steps)) if self.table else None


def search_loop(settings: SearchSettings, store: EvalStore, backend: Any, table: Optional[CostTable],
                invocation: int, log: Callable[[str], None]) -> SearchOutcome:
    """Run NSGA-II for ``settings.gens`` generations, writing the outputs after each one."""
    from pymoo.core.evaluator import Evaluator
    from pymoo.problems.static import StaticProblem

    space = settings.space
    latency = _Latency(table, settings.sampling.run)
    full_latency = latency.full_model(space.steps)
    min_speedup = settings.min_speedup
    problem, algorithm = build_algorithm(space, settings.pop, settings.seed, constrained=min_speedup is not None)
    algorithm.setup(problem, termination=("n_gen", settings.gens), seed=settings.seed, verbose=False)
    points: Dict[str, Point] = {}
    evaluated = cached = generation = 0
    front: List[Point] = []
    best: Optional[Point] = None
    gen_bar = tqdm(total=settings.gens, desc="generations", unit="gen", dynamic_ncols=True)
    try:
        while algorithm.has_next():
            population = algorithm.ask()
            generation += 1
            strategies = [space.decode(x) for x in np.rint(population.get("X")).astype(int)]
            keys = [store.key(s) for s in strategies]
            known = store.get_many(keys)
            jobs: Dict[str, Strategy] = {}
            sources = []
            for key, strategy in zip(keys, strategies):
                if key in known or key in jobs:
                    sources.append("cached")
                else:
                    jobs[key] = strategy
                    sources.append("evaluated")
            with tqdm(total=len(keys), initial=len(keys) - len(jobs), desc=f"gen {generation} evaluations",
                      unit="eval", leave=False, dynamic_ncols=True) as eval_bar:
                for key, result in backend.evaluate(list(jobs.items())):
                    known[key] = store.put(key, jobs[key], result, invocation, generation)
                    eval_bar.update()
            evaluated += len(jobs)
            cached += len(keys) - len(jobs)
            objectives = np.array([[known[k].quality, latency.of(known[k])] for k in keys], dtype=float)
            objectives[~np.isfinite(objectives)] = 1e30  # NSGA-II needs finite values; such points are dominated
            if min_speedup is None:
                static = StaticProblem(problem, F=objectives)
            else:
                shortfall = [[speedup_shortfall(lat, full_latency, min_speedup)] for lat in objectives[:, 1]]
                static = StaticProblem(problem, F=objectives, G=np.array(shortfall, dtype=float))
            Evaluator().eval(static, population)
            algorithm.tell(infills=population)
            store.record_generation(invocation, generation, keys, sources, evaluated, cached)

            for key, strategy in zip(keys, strategies):
                if key not in points:
                    entry = known[key]
                    points[key] = Point(key, strategy, entry.quality, latency.of(entry), latency.gmacs(strategy),
                                        entry.extras)
            feasible = feasible_points(list(points.values()), full_latency, min_speedup)
            front = pareto_front(feasible or list(points.values()))  # none feasible yet: the front of all
            best = choose(front, settings.w_m, settings.select)
            stored = store.count()
            write_outputs(settings, list(points.values()), front, best, full_latency, generation, evaluated, cached,
                          stored, finished=not algorithm.has_next())
            gen_bar.update()
            log(f"gen {generation}/{settings.gens}: best quality {min(p.quality for p in front):.4g} "
                f"({settings.quality.kind}), best latency {front[0].latency_ms:.4g} ms/image, front {len(front)}, "
                f"evaluations {evaluated} done / {cached} cached this run ({stored} stored)"
                + (f", {len(feasible)} at >= {min_speedup:g}x" if min_speedup is not None else ""))
    finally:
        gen_bar.close()
    store.finish_invocation(invocation)
    assert best is not None
    stored = store.count()
    log(f"search finished: {evaluated} evaluations performed, {cached} served from the store ({stored} stored); "
        f"front of {len(front)} points")
    log(f"chosen (w_M {settings.w_m:g}, {settings.select}): quality {best.quality:.4g}, latency "
        f"{best.latency_ms:.4g} ms/image, {best.strategy.describe()} -> {settings.run_dir / 'best.yaml'}")
    return SearchOutcome(settings.run_dir, front, best, list(points.values()), generation, evaluated, cached, stored)
