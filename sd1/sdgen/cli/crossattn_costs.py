"""What cross-attention costs in one UNet call, and what prompt-token pruning and T-GATE save of it.

Exact MACs (torch FlopCounterMode on the meta device, attention on the math backend) of one call of the
full-size architecture of --config (default SD 1.5) at --H x --W with a CFG batch (2 x --batch), split into
the cross-attention (`attn2`: to_q, to_k, to_v, to_out and the two attention matmuls) and the rest, for:
the plain call; text pruning after the warm-up keeping each --keep count (static and dynamic mode) and
during the warm-up (where importance is measured); a T-GATE gated call ("cfg_mean": one CFG half runs;
"per_half": the whole batch). With --repeats N > 0 it also times the same calls on the CPU with random
weights (speed does not depend on weight values), interleaved over N passes in one process, and reports
medians and ratios to the plain call. With --layer_repeats N > 0 it times, on the CPU, the share of one
plain call spent inside the cross-attention layers (forward hooks, one call) and each cross-attention layer
alone at 77 tokens and at every --keep count (N interleaved repeats, medians): small, quick measurements
whose ratios survive a busy machine better than whole calls.

    python scripts/bench/crossattn_costs.py --repeats 0 --out outputs/bench/crossattn_costs.json
    python scripts/bench/crossattn_costs.py --repeats 2 --threads 2
    python scripts/bench/crossattn_costs.py --layer_repeats 20 --threads 2
"""
import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from datosd import apply_text_pruning, apply_tgate, remove_text_pruning, remove_tgate
from datosd.text_pruning import TextPruneRun
from datosd.text_tokens import KeptTokens
from ldm.util import instantiate_from_config

from ..costs import context_width
from ..runtime import set_threads, timed
from . import run, write_result

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
STEPS = 10  # the pretend run the patched calls belong to (warm-up 0.2: steps 0 and 1)


def inputs(unet, height, width, batch, device):
    """CFG-shaped inputs: x (2B, C, h, w) with equal halves, t (2B,), context (2B, 77, D)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet.in_channels, height, width, generator=g).repeat(2, 1, 1, 1)
    t = torch.full((2 * batch,), 500, dtype=torch.long)
    context = torch.randn(2 * batch, 77, context_width(unet), generator=g)
    return x.to(device), t.to(device), context.to(device)


def kept_first(batch, keep, device, length=77):
    """Every row keeps positions 0 .. keep - 1 (what is kept does not change the cost, only how many)."""
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, :keep] = True
    index = torch.arange(keep, device=device).expand(batch, keep)
    return KeptTokens(mask=mask, index=index, valid=None)


@contextmanager
def text_pruned(unet, keep, mode, batch, device):
    """The UNet text-pruned, at a step after the warm-up (keep None: at a warm-up step)."""
    state = apply_text_pruning(unet, threshold=0.0, mode=mode)  # the run below fixes what is kept
    try:
        state.sampling_started(STEPS)
        step = 0 if keep is None else state.warmup_steps
        state.run = TextPruneRun(num_steps=STEPS, step=step,
                                 kept=None if keep is None else kept_first(batch, keep, device))
        protected = torch.zeros(batch, 77, dtype=torch.bool, device=device)
        protected[:, 0] = True
        state.protected_for = lambda context: protected
        yield unet
    finally:
        remove_text_pruning(unet)


@contextmanager
def gated(unet, cache, x, t, context):
    """The UNet T-GATE'd, after one pre-gate CFG call filled the caches, at a gated step (halves announced
    as such: a "cfg_mean" call then runs one half)."""
    state = apply_tgate(unet, gate_step=1, cache=cache)
    try:
        state.sampling_started(STEPS)
        state.step_started(0)
        state.model_call(True)
        with torch.no_grad():
            unet(x, t, context=context)
        state.step_started(1)
        state.model_call(True)
        yield unet
    finally:
        remove_tgate(unet)


def variants(keeps, timing=False):
    """(name, context manager factory) of every call measured; the factory takes (unet, batch, x, t, c).
    timing: only the calls worth timing (no warm-up step, no dynamic mode: their MACs tell their cost)."""
    out = [("plain", None)]
    if not timing:
        out.append(("textprune warm-up step", lambda u, b, x, t, c: text_pruned(u, None, "static", b, x.device)))
    for keep in keeps:
        out.append((f"textprune keep {keep}", lambda u, b, x, t, c, k=keep: text_pruned(u, k, "static", b,
                                                                                        x.device)))
        if not timing:
            out.append((f"textprune {keep} kept dynamic", lambda u, b, x, t, c, k=keep: text_pruned(
                u, k, "dynamic", b, x.device)))
    out.append(("tgate gated cfg_mean", lambda u, b, x, t, c: gated(u, "cfg_mean", x, t, c)))
    out.append(("tgate gated per_half", lambda u, b, x, t, c: gated(u, "per_half", x, t, c)))
    return out


def call_macs(unet, x, t, context, halve):
    """(total MACs, attn2 MACs by part) of one call; halve: feed one CFG half (what a gated cfg_mean call
    runs; on the meta device the equal-halves check cannot run)."""
    if halve:
        half = x.shape[0] // 2
        x, t, context = x[:half], t[:half], context[:half]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        unet(x, t, context=context)
    counts = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    parts = {part: sum(v for k, v in counts.items() if k.endswith(f"attn2.{part}")) for part in PROJECTIONS}
    attn2 = sum(v for k, v in counts.items() if k.endswith("attn2"))
    parts["attention matmuls"] = attn2 - sum(parts.values())
    parts["attn2 total"] = attn2
    return counts["Global"], parts


def count_all(config, height, width, batch, keeps):
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    x, t, context = inputs(unet, height, width, batch, "meta")
    rows = {}
    for name, make in variants(keeps):
        if make is None:
            rows[name] = call_macs(unet, x, t, context, halve=False)
            continue
        with make(unet, 2 * batch, x, t, context):
            rows[name] = call_macs(unet, x, t, context, halve=name.endswith("cfg_mean"))
    return rows


def time_all(config, height, width, batch, keeps, repeats):
    torch.manual_seed(0)
    unet = instantiate_from_config(config.model.params.unet_config).eval()
    x, t, context = inputs(unet, height, width, batch, "cpu")
    seconds = {name: [] for name, _ in variants(keeps, timing=True)}
    with torch.no_grad():
        unet(x, t, context=context)  # untimed: allocator and caches
        for repeat in range(repeats):
            for name, make in variants(keeps, timing=True):
                if make is None:
                    seconds[name].append(timed(lambda: unet(x, t, context=context), x.device)[1])
                    continue
                with make(unet, 2 * batch, x, t, context):
                    seconds[name].append(timed(lambda: unet(x, t, context=context), x.device)[1])
                print(f"pass {repeat + 1}/{repeats} {name}: {seconds[name][-1]:.2f} s", flush=True)
    return seconds


def attn2_share(unet, x, t, context):
    """Seconds of one plain call, and the part of it spent inside the attn2 layers (forward hooks)."""
    spent, started = [], {}
    layers = [m.attn2 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda m, a: started.__setitem__(m, time.perf_counter())))
        handles.append(layer.register_forward_hook(
            lambda m, a, out: spent.append(time.perf_counter() - started[m])))
    try:
        with torch.no_grad():
            total = timed(lambda: unet(x, t, context=context), x.device)[1]
    finally:
        for handle in handles:
            handle.remove()
    return total, sum(spent)


def time_layers(config, height, width, batch, keeps, repeats):
    """Seconds of one plain call and of its attn2 layers (hooks), and the summed median seconds of every
    attn2 layer run alone on its own input at 77 tokens and at each keep count."""
    torch.manual_seed(0)
    unet = instantiate_from_config(config.model.params.unet_config).eval()
    x, t, context = inputs(unet, height, width, batch, "cpu")
    layer_inputs = []
    layers = [m.attn2 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: layer_inputs.append((m, a[0], kw["context"])),
                                               with_kwargs=True) for layer in layers]
    with torch.no_grad():
        unet(x, t, context=context)
    for handle in handles:
        handle.remove()
    total, inside = attn2_share(unet, x, t, context)
    counts = [77] + list(keeps)
    seconds = {count: [] for count in counts}
    with torch.no_grad():
        for _ in range(repeats):
            for count in counts:
                spent = 0.0
                for layer, hidden, ctx in layer_inputs:
                    rows = ctx[:, :count]  # the cost depends on how many rows, not which
                    spent += timed(lambda: layer(hidden, context=rows), x.device)[1]
                seconds[count].append(spent)
    return {"call_seconds": total, "attn2_seconds_in_call": inside,
            "attn2_alone_seconds": {str(c): statistics.median(v) for c, v in seconds.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--W", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x with CFG)")
    parser.add_argument("--keep", type=int, nargs="+", default=[20, 10])
    parser.add_argument("--repeats", type=int, default=0, help="timed passes on the CPU (0: MACs only)")
    parser.add_argument("--layer_repeats", type=int, default=0,
                        help="interleaved repeats of the cross-attention layer timing (0: skip it)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="outputs/bench/crossattn_costs.json")
    opt = parser.parse_args(argv)
    if opt.threads:
        set_threads(opt.threads)
    config = OmegaConf.load(opt.config)
    height, width = opt.H // 8, opt.W // 8
    macs = count_all(config, height, width, opt.batch, opt.keep)
    plain_total, plain_parts = macs["plain"]
    print(f"one UNet call, {opt.config}, {opt.H}x{opt.W}, CFG batch {2 * opt.batch}: "
          f"{plain_total / 1e9:.1f} GMACs, cross-attention {plain_parts['attn2 total'] / 1e9:.2f} GMACs "
          f"({100 * plain_parts['attn2 total'] / plain_total:.2f} %)")
    print("  cross-attention parts: " + ", ".join(
        f"{part} {v / 1e9:.2f} G ({100 * v / plain_total:.2f} %)" for part, v in plain_parts.items()
        if part != "attn2 total"))
    result = {"config": opt.config, "H": opt.H, "W": opt.W, "cfg_batch": 2 * opt.batch, "macs": {}}
    for name, (total, parts) in macs.items():
        result["macs"][name] = {"total": total, "attn2": parts}
        print(f"{name:32s} {total / 1e9:8.1f} GMACs  {total / plain_total:6.3f} x plain  "
              f"attn2 {parts['attn2 total'] / 1e9:6.2f} G")
    if opt.repeats > 0:
        seconds = time_all(config, height, width, opt.batch, opt.keep, opt.repeats)
        medians = {name: statistics.median(v) for name, v in seconds.items()}
        result["seconds"] = seconds
        result["threads"] = torch.get_num_threads()
        print(f"CPU float32, {torch.get_num_threads()} threads, median of {opt.repeats} interleaved passes:")
        for name, value in medians.items():
            print(f"{name:32s} {value:7.2f} s  {value / medians['plain']:6.3f} x plain  "
                  f"(per pass: {', '.join(f'{s / p:.3f}' for s, p in zip(seconds[name], seconds['plain']))})")
    if opt.layer_repeats > 0:
        layers = time_layers(config, height, width, opt.batch, opt.keep, opt.layer_repeats)
        result["layers"] = layers
        share = layers["attn2_seconds_in_call"] / layers["call_seconds"]
        alone = layers["attn2_alone_seconds"]
        print(f"CPU float32, {torch.get_num_threads()} threads: one plain call {layers['call_seconds']:.2f} s, "
              f"{100 * share:.2f} % of it inside attn2")
        for count, value in alone.items():
            ratio = value / alone["77"]
            print(f"  attn2 layers alone at {count:>2s} tokens: {value:.3f} s ({ratio:.3f} x 77 tokens) -> "
                  f"call about {1 - share * (1 - ratio):.3f} x plain")
    write_result(opt.out, result)


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    cli()
