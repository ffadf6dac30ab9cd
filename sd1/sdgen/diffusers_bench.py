"""Speed and fidelity of DaTo against the diffusers baselines, in one process: `compare(...)` times the same
pipeline as it is (original), with DeepCache's `DeepCacheSDHelper` (registry `deepcache-helper-n<N>-b<b>`), with
DaTo's prune ratios on the helper's schedule (`dato-matched`: as many full steps as DeepCache, at the same depth),
with tomesd (`tome-<r>`, merging down to the first level with attention) and with datosd's strategy (`dato`), all
applied through the method registry, the methods interleaved in every repeat. Every row gives its full steps, mean
seconds, speed-up over the original and its fidelity to the original run (same prompt, seed and starting noise):
the relative RMS error of the final latents and the PSNR of the decoded images (`sdgen.fidelity`).

    from sdgen.diffusers_bench import compare, format_table
    print(format_table(compare(steps=10, size=512, repeats=2)))

The default pipeline is the full SD 1.5 architecture with random weights (`sdgen.diffusers_models.sd15_pipeline`
of the shipped v1-inference.yaml). A timed run is prompt encoding plus the denoising loop (`output_type="latent"`:
no VAE decode, the same for every method); the images for the PSNR are decoded after the timing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from datosd.diffusers_patch import UNetLayout
from datosd.strategy import DEFAULT_STRATEGY, Strategy
from datosd.utils import attention_downsample

from .diffusers_models import sd15_pipeline
from .fidelity import psnr, relative_rms_error
from .methods import Method, MissingPackageError, dato_method, parse_method
from .resources import packaged

B1 = DEFAULT_STRATEGY
SD15_CONFIG = packaged("configs", "stable-diffusion", "v1-inference.yaml")
METHODS = ("original", "deepcache", "dato-matched", "tomesd", "dato")
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class BenchRow:
    """One method: its setting, full steps, the seconds of every timed run, its speed-up over the original and its
    fidelity to the original's output."""

    method: str
    setting: str
    full_steps: int  # steps that run the whole UNet (spec 2: step 0 and depth >= the UNet's block count)
    seconds: List[float] = field(default_factory=list)
    speedup: Optional[float] = None
    rel_error: Optional[float] = None  # relative RMS error of the final latents against the original's
    psnr: Optional[float] = None  # dB, decoded image against the original's (None: not decoded)
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


def _methods(pipe: Any, strategy: Strategy, deepcache: Tuple[int, int], tome_ratio: float,
             names: Sequence[str]) -> List[Tuple[BenchRow, Method]]:
    """(row, registry method) per method name of this benchmark: 'deepcache' is DeepCache's own helper,
    'dato-matched' DaTo's prune ratios on the helper's schedule."""
    unknown = set(names) - set(METHODS)
    if unknown or "original" not in names:
        raise ValueError(f"methods must include 'original' and come from {METHODS}, got {list(names)}")
    steps = strategy.steps
    interval, branch = deepcache
    helper = parse_method(f"deepcache-helper-n{interval}-b{branch}")
    schedule = helper.patch_strategy(steps)
    table = {
        "original": (f"{steps} steps", parse_method("original")),
        "deepcache": (helper.label, helper),
        "dato-matched": (f"datosd.apply_patch {strategy.name}'s prune ratios on {helper.name}'s schedule",
                         dato_method(strategy.with_depths(schedule))),
        "tomesd": (f"tomesd.apply_patch ratio={tome_ratio}, max_downsample={attention_downsample(pipe)}",
                   parse_method(f"tome-{tome_ratio:g}")),
        "dato": (f"datosd.apply_patch {strategy.name}", dato_method(strategy)),
    }
    n_blocks = len(UNetLayout.of(pipe.unet).output_blocks)
    plan = []
    for name in names:
        setting, method = table[name]
        method_strategy = method.patch_strategy(steps)
        full = steps if method_strategy is None else method_strategy.summary(n_blocks).full
        plan.append((BenchRow(name, f"{setting} ({method.name})", full), method))
    return plan


def compare(pipe: Any = None, *, steps: int = 50, size: int = 512, strategy: Union[Strategy, str, Path] = B1,
            deepcache: Tuple[int, int] = (3, 0), tome_ratio: float = 0.5, repeats: int = 3, warmup: int = 1,
            guidance_scale: float = 7.5, prompt: str = PROMPT, seed: int = 0, decode: bool = True,
            methods: Sequence[str] = METHODS, config_path=SD15_CONFIG) -> List[BenchRow]:
    """Time `methods` on one pipeline, interleaved: every repeat runs each method once, in order; then compare
    each method's output with the original's.

    pipe: a StableDiffusionPipeline or StableDiffusionXLPipeline (default: the architecture of `config_path`,
    SD 1.5, with random weights). strategy: DaTo's strategy; a longer one is cut to `steps` evenly spaced steps
    (`every_nth_step`: b1's 50 steps -> every 5th for 10). deepcache: (cache_interval, cache_branch_id). The first
    `warmup` repeats are not counted. decode: decode every method's latents (untimed) for the PSNR column. A
    baseline whose package cannot be imported is reported as skipped, not timed.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if not isinstance(strategy, Strategy):
        strategy = Strategy.load(strategy)
    if strategy.steps != steps:
        strategy = every_nth_step(strategy, steps)
    pipe = sd15_pipeline(config_path, image_size=size) if pipe is None else pipe
    device = pipe.unet.device
    plan = _methods(pipe, strategy, deepcache, tome_ratio, methods)

    def generate() -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
                               size // pipe.vae_scale_factor), generator=generator).to(device)
        with torch.no_grad():
            return pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                        latents=latents, output_type="latent").images

    outputs: Dict[str, torch.Tensor] = {}
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
                outputs[row.method] = generate()
                seconds = _synchronized(device) - started
            if repeat >= warmup:
                row.seconds.append(seconds)
    rows = [row for row, _ in plan]
    _fidelity(pipe, rows, outputs, decode)
    original = rows[0].mean
    for row in rows:
        if not row.skipped:
            row.speedup = original / row.mean
    return rows


def _fidelity(pipe: Any, rows: Sequence[BenchRow], outputs: Dict[str, torch.Tensor], decode: bool) -> None:
    """Fill each row's relative RMS error of its final latents (1, C, h, w) against the original's, and with
    `decode` the PSNR of its decoded image against the original's."""
    reference = outputs["original"]
    reference_image = _decoded(pipe, reference) if decode else None
    for row in rows:
        if row.skipped:
            continue
        row.rel_error = relative_rms_error(outputs[row.method], reference)
        if reference_image is not None:
            row.psnr = psnr(_decoded(pipe, outputs[row.method]), reference_image)


def _decoded(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's VAE decoding of latents (1, C, h, w): an image (1, 3, H, W) in [-1, 1] (not clamped)."""
    vae = pipe.vae
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()


def _synchronized(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table: method, setting, full steps, mean seconds (and every run), speed-up, and the fidelity to
    the original: relative RMS error of the final latents (%) and PSNR of the decoded image."""
    lines = ["| method | setting | full steps | mean s (runs) | speed-up | latent rel. RMS error vs original | "
             "PSNR vs original dB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.method} | {row.setting} | {row.full_steps} | skipped: {row.skipped} | - | - | - |")
            continue
        runs = ", ".join(f"{s:.1f}" for s in row.seconds)
        image = "-" if row.psnr is None else f"{row.psnr:.2f}"
        lines.append(f"| {row.method} | {row.setting} | {row.full_steps} | {row.mean:.2f} ({runs}) | "
                     f"{row.speedup:.2f}x | {100 * row.rel_error:.2f}% | {image} |")
    return "\n".join(lines)
