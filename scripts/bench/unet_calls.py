"""Per-UNet-call timing of DaTo's pruning and caching against ToMeSD, interleaved in one process.

Times one UNet call of the full-size SD 1.5 architecture (random weights: speed does not depend on weight
values) for: a full step with DaTo pruning at each --ratios value (ratio 0 = the unpatched cost), ToMeSD
(tomesd package) at the same ratios, and a depth-1 (DeepCache shallow branch) step at ratio 0 and 0.5.
Reports medians over --repeats interleaved passes and ratios to the full step at ratio 0.

    python scripts/bench/unet_calls.py --repeats 3 --out outputs/bench/unet_calls.json
    python scripts/bench/unet_calls.py --device cuda --precision autocast --repeats 10 --profile
"""
import argparse
import json
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from datosd.costs import _inputs, _run_entries, entry_name
from ldm.runtime import timed
from ldm.util import instantiate_from_config


class _LdmShell(torch.nn.Module):
    """What tomesd.apply_patch expects of an ldm model: `.model.diffusion_model`."""

    def __init__(self, unet):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet


def time_tome(shell, ratio, x, t, context, autocast):
    import tomesd

    tomesd.apply_patch(shell, ratio=ratio)
    try:
        with torch.no_grad(), autocast:
            return timed(lambda: shell.model.diffusion_model(x, t, context=context), x.device)[1]
    finally:
        tomesd.remove_patch(shell)


def profile_entries(unet, x, t, context, autocast, entries, rows=12):
    """Print the operators that take the most self time in one calibration pass of each entry."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    for entry in entries:
        _run_entries(unet, [entry], x, t, context, autocast)
        with profile(activities=activities) as prof:
            _run_entries(unet, [entry], x, t, context, autocast)
        print(f"\nprofile of 2 warm-up full steps + one {entry_name(*entry)} step:")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--W", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x with CFG)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="full", choices=["full", "autocast"],
                        help="full = float32; autocast = bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators for a full step at r=0 and r=0.5")
    parser.add_argument("--out", default="outputs/bench/unet_calls.json")
    opt = parser.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    torch.manual_seed(0)
    config = OmegaConf.load(opt.config)
    device = torch.device(opt.device)
    unet = instantiate_from_config(config.model.params.unet_config).eval().to(device)
    shell = _LdmShell(unet)
    h, w = opt.H // 8, opt.W // 8
    x, t, context = _inputs(unet, h, w, opt.batch, device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    dtype_label = "float32" if opt.precision == "full" else str(half).replace("torch.", "")
    autocast = torch.autocast(device.type, dtype=half, enabled=opt.precision == "autocast")
    _run_entries(unet, [(12, 0.0), (12, 0.5), (1, 0.5)], x, t, context, autocast)  # warm-up
    dato_entries = [(12, 0.0)] + [(12, r) for r in opt.ratios] + [(1, 0.0), (1, 0.5)]
    times = {}
    for repeat in range(opt.repeats):
        order = dato_entries if repeat % 2 == 0 else dato_entries[::-1]
        for name, value in _run_entries(unet, order, x, t, context, autocast).items():
            times.setdefault(f"dato_{name}", []).append(value)
        for ratio in (opt.ratios if repeat % 2 == 0 else opt.ratios[::-1]):
            times.setdefault(f"tome_d12_r{ratio:.2f}", []).append(time_tome(shell, ratio, x, t, context, autocast))
        print(f"pass {repeat + 1}/{opt.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["dato_d12_r0.00"]
    depth1 = medians["dato_d1_r0.00"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\nfull-size UNet, latent {h}x{w}, batch {2 * opt.batch} (CFG), {dtype_label}, {where}, "
          f"median of {opt.repeats} interleaved passes")
    print("| call | median s | vs full step at r=0 |")
    print("|---|---|---|")
    for key in sorted(medians):
        print(f"| {key} | {medians[key]:.2f} | {medians[key] / base:.3f} |")
    print(f"\ndepth-1 step at r=0.5 / depth-1 step at r=0: {medians['dato_d1_r0.50'] / depth1:.3f}")
    for ratio in opt.ratios:
        d, tm = medians[f"dato_d12_r{ratio:.2f}"], medians[f"tome_d12_r{ratio:.2f}"]
        print(f"ratio {ratio}: DaTo / ToMeSD time = {d / tm:.3f}")
    out = Path(opt.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"raw": times, "median": medians, "torch": torch.__version__, "device": where,
                               "dtype": dtype_label, "threads": torch.get_num_threads(), "latent": [h, w],
                               "batch": opt.batch}, indent=1))
    if opt.profile:
        profile_entries(unet, x, t, context, autocast, [(12, 0.0), (12, 0.5)])


if __name__ == "__main__":
    main()
