"""The search space of the strategy search: decision variables and their decoding into canonical strategies."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import List, Optional, Sequence, Tuple

import numpy as np

from sdgen.costs import table_entries
from datosd.strategy import MAX_DEPTH, Strategy

UNIFORM_INTERVALS = (2, 3, 4, 5)  # DeepCache "every N-th step full" seeds of the first population (the paper's)


@dataclass(frozen=True)
class SearchSpace:
    """Decision variables of a search and their decoding into canonical strategies.

    Attributes:
        mode: 'depth', 'ratio' or 'joint'.
        steps: sampler steps S (the strategy length).
        depths: the depth search space, e.g. (0, 1, 12).
        ratios: the ratio search space, e.g. (0.3, ..., 0.7).
        fixed_ratio: the prune ratio of every running step in depth mode.
        fixed_depths: the cache depths of ratio mode (from ``--cache_strategy``).
        intervals: the N of the uniform "every N-th step full" seeds of the first population (``--seed-intervals``).
    """

    mode: str
    steps: int
    depths: Tuple[int, ...]
    ratios: Tuple[float, ...]
    fixed_ratio: float = 0.0
    fixed_depths: Optional[Tuple[int, ...]] = None
    intervals: Tuple[int, ...] = UNIFORM_INTERVALS

    def base_depths(self) -> List[int]:
        """Ratio mode's fixed depths with step 0 at 12 (it computes everything anyway, spec 2)."""
        assert self.fixed_depths is not None
        return [MAX_DEPTH] + list(self.fixed_depths[1:])

    @property
    def depth_steps(self) -> Tuple[int, ...]:
        """Steps whose depth is a variable: 1..S-1 in depth and joint mode."""
        return tuple(range(1, self.steps)) if self.mode in ("depth", "joint") else ()

    @property
    def ratio_steps(self) -> Tuple[int, ...]:
        """Steps whose ratio is a variable: all in joint mode, the running (depth > 0) ones in ratio mode."""
        if self.mode == "joint":
            return tuple(range(self.steps))
        if self.mode == "ratio":
            return tuple(i for i, d in enumerate(self.base_depths()) if d != 0)
        return ()

    @property
    def n_var(self) -> int:
        return len(self.depth_steps) + len(self.ratio_steps)

    @property
    def upper(self) -> np.ndarray:
        """Largest index of every variable (the lower bounds are 0)."""
        return np.array([len(self.depths) - 1] * len(self.depth_steps) + [len(self.ratios) - 1] * len(self.ratio_steps),
                        dtype=int)

    @property
    def size(self) -> int:
        """Number of distinct index vectors."""
        return math.prod(int(u) + 1 for u in self.upper)

    def decode(self, x: Sequence[int]) -> Strategy:
        """Index vector -> canonical strategy (step 0 at depth 12, ratio 0 at depth-0 steps)."""
        x = [int(v) for v in x]
        if len(x) != self.n_var:
            raise ValueError(f"expected {self.n_var} decision variables, got {len(x)}")
        n_depth = len(self.depth_steps)
        if self.mode == "ratio":
            depths = self.base_depths()
        else:
            depths = [MAX_DEPTH] * self.steps
            for step, index in zip(self.depth_steps, x[:n_depth]):
                depths[step] = self.depths[index]
        ratios = [self.fixed_ratio if self.mode == "depth" else 0.0] * self.steps
        for step, index in zip(self.ratio_steps, x[n_depth:]):
            ratios[step] = self.ratios[index]
        ratios = [0.0 if step > 0 and depth == 0 else ratio for step, (depth, ratio) in enumerate(zip(depths, ratios))]
        return Strategy(depths, ratios, name=f"searched-{self.mode}")

    def _depth_seeds(self) -> List[Tuple[int, ...]]:
        """All-full, then uniform DeepCache (every N-th step full, N in `intervals`) at each partial depth, 1 first."""
        full_depth = max(self.depths)
        full = self.depths.index(full_depth)
        partial = sorted((d for d in self.depths if d != full_depth), key=lambda d: (d != 1, -d))
        rows = [tuple(full for _ in self.depth_steps)]
        for depth in partial:
            index = self.depths.index(depth)
            for interval in self.intervals:
                rows.append(tuple(full if step % interval == 0 else index for step in self.depth_steps))
        return rows

    def _ratio_seeds(self) -> List[Tuple[int, ...]]:
        """One constant-ratio row per value of the ratio space."""
        return [tuple(index for _ in self.ratio_steps) for index in range(len(self.ratios))]

    def seed_rows(self) -> List[Tuple[int, ...]]:
        """Uniform (not step-aware) strategies for the first population, most distinct first, no duplicates."""
        if self.mode == "depth":
            rows = self._depth_seeds()
        elif self.mode == "ratio":
            rows = self._ratio_seeds()
        else:
            depth_rows, ratio_rows = self._depth_seeds(), self._ratio_seeds()
            pairs = sorted(product(range(len(depth_rows)), range(len(ratio_rows))), key=lambda ij: (sum(ij), ij[0]))
            rows = [depth_rows[i] + ratio_rows[j] for i, j in pairs]
        return list(dict.fromkeys(rows))

    def table_entries(self) -> List[Tuple[int, float]]:
        """Every (depth, ratio) a UNet call of a candidate can run with: the cost table's entries."""
        depths = {MAX_DEPTH}
        depths.update(self.depths if self.mode != "ratio" else self.base_depths())
        ratios = {0.0, self.fixed_ratio} if self.mode == "depth" else {0.0, *self.ratios}
        return table_entries(sorted(depths), sorted(ratios))

    def describe(self) -> str:
        parts = [f"{self.mode} search over {self.steps} steps, {self.n_var} variables"]
        if self.mode != "ratio":
            parts.append(f"depths {list(self.depths)}")
        if self.mode != "depth":
            parts.append(f"ratios {list(self.ratios)}")
        if self.mode == "depth":
            parts.append(f"prune ratio {self.fixed_ratio:g}")
        if self.mode != "ratio" and self.intervals != UNIFORM_INTERVALS:
            parts.append(f"seeds every N-th step full for N in {list(self.intervals)}")
        return ", ".join(parts)
