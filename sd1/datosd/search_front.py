"""The Pareto front of the strategy search, the choice of one point on it, and writing points to files."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .strategy import Strategy


# --- the front and the choice -------------------------------------------------------------------------


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


def selection_scores(front: Sequence[Point], w_m: float, select: str) -> List[float]:
    """quality + w_M * latency per front point (see ``datosd.search``'s docstring for the two scalings)."""
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


# --- outputs ------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def point_dict(point: Point, score: Optional[float], full_latency: Optional[float]) -> Dict[str, Any]:
    data: Dict[str, Any] = {
        "key": point.key,
        "quality": finite(point.quality),
        "latency": point.latency,
        "latency_ms": point.latency_ms,
        "speedup": full_latency / point.latency if full_latency and point.latency > 0 else None,
        "gmacs_per_image": point.gmacs,
        "score": finite(score),
        "summary": point.strategy.describe(),
        "cache_depth": list(point.strategy.cache_depth),
        "prune_ratio": list(point.strategy.prune_ratio),
        "extras": point.extras,
    }
    return data


def plot_front(path: Path, points: Sequence[Point], front: Sequence[Point], best: Point, quality_label: str,
               latency_label: str, title: str) -> None:
    """PNG of quality vs latency: every evaluated point faint, the front highlighted, the chosen point starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [p for p in points if math.isfinite(p.quality)]
    ax.scatter([p.latency_ms for p in shown], [p.quality for p in shown], s=14, color="0.55", alpha=0.3,
               linewidths=0, label=f"evaluated ({len(points)})")
    front_shown = [p for p in front if math.isfinite(p.quality)]
    ax.step([p.latency_ms for p in front_shown], [p.quality for p in front_shown], where="post", color="C0",
            alpha=0.6, linewidth=1)
    ax.scatter([p.latency_ms for p in front_shown], [p.quality for p in front_shown], s=28, color="C0", zorder=3,
               label=f"Pareto front ({len(front)})")
    if math.isfinite(best.quality):
        ax.scatter([best.latency_ms], [best.quality], marker="*", s=260, color="C3", edgecolors="black",
                   linewidths=0.7, zorder=4, label=f"chosen ({best.latency_ms:.3g} ms, {best.quality:.4g})")
    ax.set_xlabel(latency_label)
    ax.set_ylabel(quality_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png")
    os.replace(tmp, path)
