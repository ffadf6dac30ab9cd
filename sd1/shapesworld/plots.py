"""Figures of the shapes model: its training losses."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def smoothed(values: Sequence[float], window: int) -> np.ndarray:
    """Moving average over `window` values (shorter at the start): (N,) -> (N,)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot_losses(losses: Dict[str, List[List[float]]], path: Path, title: str = "") -> None:
    """One panel per phase: every step's loss (faint) and its moving average, log scale; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [(name, rows) for name, rows in losses.items() if rows]
    labels = {"vae": "VAE: object-weighted L1 + L2", "diffusion": "UNet + text: epsilon MSE",
              "layout": "layout: epsilon MSE (1/2 at t >= 700)", "placement": "placement: epsilon MSE (3/4 at t >= 800)",
              "polish": "polish: epsilon MSE (1/4 at t >= 800)"}
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(5 * max(1, len(phases)), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], phases):
        steps, values = np.array(rows).T
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.6)
        ax.plot(steps, smoothed(values, max(1, len(values) // 40)), color="tab:blue", linewidth=1.6)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(labels.get(name, name), fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
