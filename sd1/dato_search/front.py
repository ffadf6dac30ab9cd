"""The Pareto front of the strategy search and the choice of one point on it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from datosd.strategy import Strategy


@dataclass
class Point:
    """An evaluated candidate: strategy, quality (objective units), latency (seconds per image)."""

    key: str
    strategy: Strategy
    quality: float
    latency: float
    gmacs: Optional[float] = None
    extras: Dict[str, float] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.latency


def pareto_front(points: Sequence[Point]) -> List[Point]:
    """The points no other point dominates (both objectives minimised), by increasing latency."""
    front: List[Point] = []
    best_quality, best_latency = math.inf, None
    for point in sorted(points, key=lambda p: (p.latency, p.quality, p.key)):
        if point.quality < best_quality:
            front.append(point)
            best_quality, best_latency = point.quality, point.latency
        elif point.quality == best_quality and point.latency == best_latency:
            front.append(point)  # an exact tie: neither dominates the other
    return front


def speedup_shortfall(latency: float, full_latency: float, min_speedup: float) -> float:
    """``min_speedup - full_latency / latency``: <= 0 when a point of that latency is at least `min_speedup`
    times faster than the full model (``--min-speedup``, NSGA-II's inequality constraint)."""
    return min_speedup - full_latency / max(latency, 1e-300)


def feasible_points(points: Sequence[Point], full_latency: Optional[float],
                    min_speedup: Optional[float]) -> List[Point]:
    """The points that meet ``--min-speedup`` (all of them without one)."""
    if min_speedup is None:
        return list(points)
    assert full_latency is not None, "--min-speedup needs the cost table's full-model latency"
    return [p for p in points if speedup_shortfall(p.latency, full_latency, min_speedup) <= 0]


def selection_scores(front: Sequence[Point], w_m: float, select: str) -> List[float]:
    """quality + w_M * latency per front point (see ``dato_search``'s docstring for the two scalings)."""
    if select == "raw":
        return [p.quality + w_m * p.latency_ms for p in front]
    qualities = [p.quality for p in front]
    latencies = [p.latency for p in front]
    q_lo, q_span = min(qualities), (max(qualities) - min(qualities)) or 1.0
    l_lo, l_span = min(latencies), (max(latencies) - min(latencies)) or 1.0
    return [(p.quality - q_lo) / q_span + w_m * (p.latency - l_lo) / l_span for p in front]


def choose(front: Sequence[Point], w_m: float, select: str = "raw") -> Point:
    """The front point minimising quality + w_M * latency (ties: the faster one)."""
    scores = selection_scores(front, w_m, select)
    return min(zip(scores, front), key=lambda sp: (sp[0], sp[1].latency, sp[1].key))[1]
