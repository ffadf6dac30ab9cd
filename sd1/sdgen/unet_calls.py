"""Per-UNet-call timing: DaTo's pruned and cached calls (the cost model's entries, `sdgen.costs`) next to
ToMeSD (tomesd, through the method registry), interleaved over repeats in one process.

A call is one UNet forward of a CFG batch (2B latents). DaTo calls are timed by `costs.time_entries` (two
untimed full steps fill the caches, then one call per (cache depth, prune ratio) entry); ToMeSD calls are
one forward of the UNet patched with `tome-<r>`.
"""
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from datosd.caching import compute_blocks
from ldm.models.diffusion.hooks import SamplingHooks

from .compiled import CompiledCall, Execution
from .costs import entry_name, time_entries
from .methods import parse_method
from .runtime import precision_scope, timed

Entry = Tuple[int, float]  # (cache depth, prune ratio)
UNPRUNED_FULL = "dato_d12_r0.00"
UNPRUNED_DEPTH1 = "dato_d1_r0.00"


class UnetShell(torch.nn.Module):
    """A bare UNetModel dressed as an ldm model (`.model.diffusion_model`, `.sampling_hooks`), so that registry
    methods patch it without an autoencoder or a text encoder (e.g. on the meta device, to count MACs)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet
        self.sampling_hooks = SamplingHooks()

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.diffusion_model


def dato_entries(ratios: Sequence[float]) -> List[Entry]:
    """A full step at ratio 0 and at each ratio, and a depth-1 (DeepCache shallow branch) step at 0 and 0.5."""
    return [(12, 0.0)] + [(12, float(r)) for r in ratios] + [(1, 0.0), (1, 0.5)]


def time_tome_call(shell: UnetShell, ratio: float, inputs, precision: str) -> float:
    """Seconds of one forward of the UNet under ToMeSD at `ratio`. inputs: (x, t, cond) of `unet_inputs`."""
    x, t, cond = inputs
    with parse_method(f"tome-{ratio:g}").apply(shell, steps=1), torch.no_grad(), precision_scope(precision, x.device):
        return timed(lambda: shell.unet(x, t, **cond), x.device)[1]


def time_calls(shell: UnetShell, ratios: Sequence[float], repeats: int, precision: str, inputs,
               on_pass: Optional[Callable[[int, Dict[str, List[float]]], None]] = None,
               compile_mode: str = "none") -> Dict[str, List[float]]:
    """{'dato_<entry>' | 'tome_d12_r<r>' | 'compiled_dato_<entry>': seconds of each repeat}: after one untimed
    warm-up call of every kind (where the compiled calls compile), `repeats` passes, the order reversed every
    other pass. compile_mode: also time the DaTo calls torch.compile-d in this mode ('none': not).
    on_pass(repeat, times) after each pass."""
    x, t, cond = inputs
    entries = dato_entries(ratios)
    scope = precision_scope(precision, x.device)
    compiled = None
    if compile_mode != "none":
        compiled = CompiledCall(compute_blocks, Execution(compile_mode), fullgraph=True)
        time_entries(shell.unet, entries, x, t, cond, scope, compute=compiled)
    time_entries(shell.unet, entries, x, t, cond, scope)
    for ratio in ratios:
        time_tome_call(shell, ratio, inputs, precision)
    times: Dict[str, List[float]] = {}
    for repeat in range(repeats):
        forward = repeat % 2 == 0
        for name, value in time_entries(shell.unet, entries if forward else entries[::-1], x, t, cond,
                                        scope).items():
            times.setdefault(f"dato_{name}", []).append(value)
        for ratio in (ratios if forward else ratios[::-1]):
            times.setdefault(f"tome_d12_r{ratio:.2f}", []).append(time_tome_call(shell, ratio, inputs, precision))
        if compiled is not None:
            for name, value in time_entries(shell.unet, entries if forward else entries[::-1], x, t, cond,
                                            scope, compute=compiled).items():
                times.setdefault(f"compiled_dato_{name}", []).append(value)
        if on_pass is not None:
            on_pass(repeat, times)
    return times


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def report(times: Dict[str, List[float]], ratios: Sequence[float], header: str) -> str:
    """Markdown table of the medians relative to the unpruned full step, then the DaTo / ToMeSD ratios."""
    median = medians(times)
    base = median[UNPRUNED_FULL]
    lines = [header, "| call | median s | vs full step at r=0 |", "|---|---|---|"]
    lines += [f"| {name} | {median[name]:.2f} | {median[name] / base:.3f} |" for name in sorted(median)]
    lines.append("")
    lines.append(f"depth-1 step at r=0.5 / depth-1 step at r=0: "
                 f"{median['dato_d1_r0.50'] / median[UNPRUNED_DEPTH1]:.3f}")
    for ratio in ratios:
        dato, tome = median[f"dato_d12_r{ratio:.2f}"], median[f"tome_d12_r{ratio:.2f}"]
        lines.append(f"ratio {ratio:g}: DaTo / ToMeSD time = {dato / tome:.3f}")
    compiled = sorted(name for name in median if name.startswith("compiled_"))
    if compiled:
        lines.append("")
        lines.append("compiled / eager time of each call: " + ", ".join(
            f"{name[len('compiled_dato_'):]} {median[name] / median[name[len('compiled_'):]]:.3f}"
            for name in compiled))
        full = median.get("compiled_" + UNPRUNED_FULL)
        if full:
            lines.append("compiled full step at r / compiled full step at r=0: " + ", ".join(
                f"r={ratio:g} {median[f'compiled_dato_d12_r{ratio:.2f}'] / full:.3f}" for ratio in ratios))
    return "\n".join(lines)


def profile_entries(unet: torch.nn.Module, inputs, precision: str, entries: Sequence[Entry],
                    rows: int = 12) -> str:
    """torch.profiler's top operators (self time) of one calibration pass per entry (after an untimed one)."""
    from torch.profiler import ProfilerActivity, profile

    x, t, cond = inputs
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    parts = []
    for entry in entries:
        time_entries(unet, [entry], x, t, cond, precision_scope(precision, x.device))
        with profile(activities=activities) as prof:
            time_entries(unet, [entry], x, t, cond, precision_scope(precision, x.device))
        parts.append(f"profile of 2 warm-up full steps + one {entry_name(*entry)} step:\n"
                     + prof.key_averages().table(sort_by=sort_by, row_limit=rows))
    return "\n\n".join(parts)

