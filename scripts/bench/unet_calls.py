"""Per-UNet-call timing of DaTo's pruning and caching against ToMeSD, interleaved in one process.

Times one UNet call of the full-size SD 1.5 architecture (random weights: speed does not depend on weight
values) for: a full step with DaTo pruning at each --ratios value (ratio 0 = the unpatched cost), ToMeSD
(tomesd package) at the same ratios, and a depth-1 (DeepCache shallow branch) step at ratio 0 and 0.5.
Reports medians over --repeats interleaved passes and ratios to the full step at ratio 0.

    python scripts/bench/unet_calls.py --repeats 3 --out outputs/bench/unet_calls.json
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from datosd.costs import _inputs, _run_entries
from ldm.util import instantiate_from_config


class _LdmShell(torch.nn.Module):
    """What tomesd.apply_patch expects of an ldm model: `.model.diffusion_model`."""

    def __init__(self, unet):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet


def time_tome(shell, ratio, x, t, context):
    import tomesd

    tomesd.apply_patch(shell, ratio=ratio)
    try:
        with torch.no_grad():
            started = time.perf_counter()
            shell.model.diffusion_model(x, t, context=context)
            return time.perf_counter() - started
    finally:
        tomesd.remove_patch(shell)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--W", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x with CFG)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="outputs/bench/unet_calls.json")
    opt = parser.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    torch.manual_seed(0)
    config = OmegaConf.load(opt.config)
    unet = instantiate_from_config(config.model.params.unet_config).eval()
    shell = _LdmShell(unet)
    h, w = opt.H // 8, opt.W // 8
    x, t, context = _inputs(unet, h, w, opt.batch, "cpu")
    dato_entries = [(12, 0.0)] + [(12, r) for r in opt.ratios] + [(1, 0.0), (1, 0.5)]
    times = {}
    for repeat in range(opt.repeats):
        order = dato_entries if repeat % 2 == 0 else dato_entries[::-1]
        for name, value in _run_entries(unet, order, x, t, context, torch.no_grad()).items():
            times.setdefault(f"dato_{name}", []).append(value)
        for ratio in (opt.ratios if repeat % 2 == 0 else opt.ratios[::-1]):
            times.setdefault(f"tome_d12_r{ratio:.2f}", []).append(time_tome(shell, ratio, x, t, context))
        print(f"pass {repeat + 1}/{opt.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["dato_d12_r0.00"]
    depth1 = medians["dato_d1_r0.00"]
    print(f"\nfull-size UNet, latent {h}x{w}, batch {2 * opt.batch} (CFG), float32, "
          f"{torch.get_num_threads()} threads, median of {opt.repeats} interleaved passes")
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
    out.write_text(json.dumps({"raw": times, "median": medians, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "latent": [h, w], "batch": opt.batch},
                              indent=1))


if __name__ == "__main__":
    main()
