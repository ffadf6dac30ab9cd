"""Speed of DaTo against the diffusers baselines, in one process: `compare(...)` times the same pipeline as it is
(original), with DeepCache's `DeepCacheSDHelper` (registry `deepcache-helper-n<N>-b<b>`), with tomesd
(`tome-<r>`) and with datosd (`dato`), all applied through the method registry, the methods interleaved in every
repeat, and returns each method's mean seconds and speed-up over the original.

    from sdgen.diffusers_bench import compare, format_table
    print(format_table(compare(steps=10, size=512, repeats=2)))

The default pipeline is the full SD 1.5 architecture with random weights (`sdgen.diffusers_models.sd15_pipeline`
of the shipped v1-inference.yaml). A
run is prompt encoding plus the denoising loop (`output_type="latent"`: no VAE decode, the same for every method).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from datosd.strategy import DEFAULT_STRATEGY, Strategy

from .diffusers_models import sd15_pipeline
from .methods import Method, MissingPackageError, dato_method, parse_method
from .resources import packaged

B1 = DEFAULT_STRATEGY
SD15_CONFIG = packaged("configs", "stable-diffusion", "v1-inference.yaml")
METHODS = ("original", "deepcache", "tomesd", "dato")
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class BenchRow:
    """One method: its setting, the seconds of every timed run, and its speed-up over the original."""

    method: str
    setting: str
    seconds: List[float] = field(default_factory=list)
    speedup: Optional[float] = None
    skipped: Optional[str] = None  # why the method did not run (e.g. DeepCache not importable)

    @property
    def mean(self) -> float:
        return sum(self.seconds) / len(self.seconds)


def every_nth_step(strategy: Strategy, steps: int) -> Strategy:
    """The strategy's steps 0, n, 2n, ... (n = strategy.steps / steps): a shorter run that keeps its schedule."""
    if steps < 1 or strategy.steps % steps:
        raise ValueError(f"cannot take {steps} evenly spaced steps of the {strategy.steps}-step strategy "
                         f"{strategy.name!r}; use a divisor of {strategy.steps}")
    return strategy.every(strategy.steps // steps)


def _methods(strategy: Strategy, deepcache: Tuple[int, int], tome_ratio: float,
             names: Sequence[str]) -> List[Tuple[BenchRow, Method]]:
    """(row, registry method) per method name of this benchmark: 'deepcache' is DeepCache's own helper."""
    interval, branch = deepcache
    table = {
        "original": (f"{strategy.steps} steps", parse_method("original")),
        "deepcache": (f"DeepCacheSDHelper cache_interval={interval}, cache_branch_id={branch}",
                      parse_method(f"deepcache-helper-n{interval}-b{branch}")),
        "tomesd": (f"tomesd.apply_patch ratio={tome_ratio}", parse_method(f"tome-{tome_ratio:g}")),
        "dato": (f"datosd.apply_patch {strategy.name}", dato_method(strategy)),
    }
    unknown = set(names) - set(table)
    if unknown or "original" not in names:
        raise ValueError(f"methods must include 'original' and come from {METHODS}, got {list(names)}")
    return [(BenchRow(name, f"{table[name][0]} ({table[name][1].name})"), table[name][1]) for name in names]


def compare(pipe: Any = None, *, steps: int = 50, size: int = 512, strategy: Union[Strategy, str, Path] = B1,
            deepcache: Tuple[int, int] = (3, 0), tome_ratio: float = 0.5, repeats: int = 3, warmup: int = 1,
            guidance_scale: float = 7.5, prompt: str = PROMPT, seed: int = 0,
            methods: Sequence[str] = METHODS, config_path=SD15_CONFIG) -> List[BenchRow]:
    """Time `methods` on one pipeline, interleaved: every repeat runs each method once, in order.

    pipe: a StableDiffusionPipeline (default: the architecture of `config_path`, SD 1.5, with random weights).
    strategy: DaTo's strategy;
    a longer one is cut to `steps` evenly spaced steps (`every_nth_step`: b1's 50 steps -> every 5th for 10).
    deepcache: (cache_interval, cache_branch_id). The first `warmup` repeats are not counted. A baseline whose
    package cannot be imported is reported as skipped, not timed.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if not isinstance(strategy, Strategy):
        strategy = Strategy.load(strategy)
    if strategy.steps != steps:
        strategy = every_nth_step(strategy, steps)
    pipe = sd15_pipeline(config_path, image_size=size) if pipe is None else pipe
    device = pipe.unet.device
    plan = _methods(strategy, deepcache, tome_ratio, methods)

    def generate():
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
                               size // pipe.vae_scale_factor), generator=generator).to(device)
        with torch.no_grad():
            pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                 latents=latents, output_type="latent")

    for repeat in range(warmup + repeats):
        for row, method in plan:
            if row.skipped:
                continue
            try:
                applied = method.apply(pipe, steps, seed=seed)
            except MissingPackageError as e:
                row.skipped = f"not importable: {e}"
                continue
            with applied:
                started = _synchronized(device)
                generate()
                seconds = _synchronized(device) - started
            if repeat >= warmup:
                row.seconds.append(seconds)
    rows = [row for row, _ in plan]
    original = rows[0].mean
    for row in rows:
        if not row.skipped:
            row.speedup = original / row.mean
    return rows


def _synchronized(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table: method, setting, mean seconds (and every run), speed-up."""
    lines = ["| method | setting | mean s (runs) | speed-up |", "| --- | --- | --- | --- |"]
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.method} | {row.setting} | skipped: {row.skipped} | - |")
            continue
        runs = ", ".join(f"{s:.1f}" for s in row.seconds)
        lines.append(f"| {row.method} | {row.setting} | {row.mean:.2f} ({runs}) | {row.speedup:.2f}x |")
    return "\n".join(lines)
