"""What a search writes after every generation: front.json, front.png, best.yaml, progress.json, and its log.

Every file is replaced in one rename (``sdgen.images.atomic_output``), so an interrupted search never leaves a
half-written one.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from datosd.strategy import MAX_DEPTH, Strategy
from sdgen.images import atomic_output, atomic_write_text

from .front import Point, feasible_points, selection_scores
from .settings import SearchSettings
from .store import now


class RunLog:
    """Log lines to stdout (above the progress bars) and to RUN_DIR/search.log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{now()} {message}\n")


def finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def point_dict(point: Point, score: Optional[float], full_latency: Optional[float]) -> Dict[str, Any]:
    return {
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


def plot_front(path: Path, points: Sequence[Point], front: Sequence[Point], best: Point, quality_label: str,
               latency_label: str, title: str, bound: Optional[Tuple[float, str]] = None) -> None:
    """PNG of quality vs latency: every evaluated point faint, the front highlighted, the chosen point starred;
    `bound`: (latency in ms, label) of ``--min-speedup``, drawn as a dashed vertical line."""
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
    if bound is not None:
        ax.axvline(bound[0], color="C2", linestyle="--", linewidth=1, label=bound[1])
    ax.set_xlabel(latency_label)
    ax.set_ylabel(quality_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png")


def write_outputs(settings: SearchSettings, points: List[Point], front: List[Point], best: Point,
                  full_latency: Optional[float], generation: int, evaluated: int, cached: int, stored: int,
                  finished: bool) -> None:
    """front.json, front.png, best.yaml and progress.json (each replaced atomically)."""
    run_dir = settings.run_dir
    quality = settings.quality
    scores = selection_scores(front, settings.w_m, settings.select)
    latency_units = "seconds per image (" + ("cost table" if settings.latency == "table" else "measured") + ")"
    full = next((p for p in points if list(p.strategy.cache_depth) == [MAX_DEPTH] * p.strategy.steps
                 and not any(p.strategy.prune_ratio)), None)  # the unaccelerated model, when it was a candidate
    constraint, bound = None, None
    if settings.min_speedup is not None and full_latency is not None:
        max_latency = full_latency / settings.min_speedup
        feasible = len(feasible_points(points, full_latency, settings.min_speedup))
        constraint = {"min_speedup": settings.min_speedup, "max_latency": max_latency, "feasible_points": feasible,
                      "front_of": "feasible points" if feasible else "all points (none feasible yet)"}
        bound = (1000.0 * max_latency, f">= {settings.min_speedup:g}x ({feasible} strategies)")
    report = {
        "mode": settings.mode,
        "generation": generation,
        "generations": settings.gens,
        "quality": {"kind": quality.kind, "units": quality.units, **quality.sources()},
        "latency": {"source": settings.latency, "units": latency_units, "full_model": full_latency},
        "selection": {"w_M": settings.w_m, "select": settings.select,
                      "score": "quality + w_M * latency_ms" if settings.select == "raw"
                      else "quality_norm + w_M * latency_norm (min-max over the front)"},
        "constraint": constraint,
        "evaluations": {"performed": evaluated, "cached": cached, "stored": stored, "points": len(points)},
        "full_model": point_dict(full, None, full_latency) if full is not None else None,
        "best": point_dict(best, scores[front.index(best)], full_latency),
        "front": [point_dict(p, s, full_latency) for p, s in zip(front, scores)],
    }
    atomic_write_text(run_dir / "front.json", json.dumps(report, indent=1))
    meta = {"sampler": settings.sampling.run.sampler, "sampler_steps_arg": settings.sampling.run.steps,
            "source": f"dato_search ({settings.mode} mode, generation {generation})",
            "quality": {"kind": quality.kind, "value": finite(best.quality)},
            "latency_ms": best.latency_ms, "w_M": settings.w_m, "select": settings.select}
    with atomic_output(run_dir / "best.yaml") as tmp:
        Strategy(best.strategy.cache_depth, best.strategy.prune_ratio, name=f"searched-{settings.mode}",
                 meta=meta).save(tmp)
    plot_front(run_dir / "front.png", points, front, best,
               quality_label=f"{quality.objective.axis} (lower is better)",
               latency_label=f"latency, ms per image ({settings.latency})",
               title=f"DaTo {settings.mode} search, generation {generation}/{settings.gens}", bound=bound)
    atomic_write_text(run_dir / "progress.json", json.dumps(
        {"generation": generation, "generations": settings.gens, "evaluated": evaluated, "cached": cached,
         "stored": stored, "front_size": len(front), "finished": finished}, indent=1))
