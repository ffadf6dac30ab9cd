"""Per-UNet-call timing of DaTo's pruning and caching against ToMeSD, interleaved in one process.

Times one UNet call of the full-size SD 1.5 architecture (random weights: speed does not depend on weight
values) for: a full step with DaTo pruning at each --ratios value (ratio 0 = the unpatched cost), ToMeSD
(tomesd package) at the same ratios, and a depth-1 (DeepCache shallow branch) step at ratio 0 and 0.5.
Every kind of call runs once untimed first; then medians over --repeats interleaved passes, and ratios to
the full step at ratio 0.

    python scripts/bench/unet_calls.py --repeats 3 --out outputs/bench/unet_calls.json
    python scripts/bench/unet_calls.py --device cuda --precision autocast --repeats 10 --profile
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from ..costs import hardware_name, unet_inputs
from ldm.util import instantiate_from_config

from .. import generate as gen
from ..compiled import COMPILE_MODES
from ..images import atomic_write_text, check_output_file
from ..runtime import UsageError, pick_device, precision_name, set_threads
from ..unet_calls import UnetShell, medians, profile_entries, report, time_calls
from . import run
from .flags import DEFAULT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="model config (its UNet is built, random weights)")
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--W", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x with CFG)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="full", choices=["full", "autocast"],
                        help="full = float32; autocast = bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators for a full step at r=0 and r=0.5")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="also time DaTo's calls torch.compile-d in this mode (each entry compiles once, untimed)")
    parser.add_argument("--out", default="outputs/bench/unet_calls.json", help="JSON file of every number")
    return parser


def check_options(opt):
    """Reject bad input before the UNet is built. Returns (device, model config, latent shape)."""
    if opt.repeats < 1 or opt.batch < 1:
        raise UsageError("--repeats and --batch must be at least 1")
    if not all(math.isfinite(r) and 0.0 <= r < 1.0 for r in opt.ratios):
        raise UsageError(f"--ratios must be in [0, 1), got {opt.ratios}")
    config = gen.read_config(opt.config)
    shape = gen.latent_shape(gen.model_geometry(config), opt.H, opt.W)
    check_output_file(opt.out, "--out")
    return pick_device(opt.device), config, shape


def main(argv=None) -> int:
    opt = build_parser().parse_args(argv)
    try:
        device, config, (_, h, w) = check_options(opt)
        threads = set_threads(opt.threads)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shell = UnetShell(instantiate_from_config(config.model.params.unet_config).eval().to(device))
    inputs = unet_inputs(shell.unet, h, w, opt.batch, device)

    def show(repeat, times):
        print(f"pass {repeat + 1}/{opt.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)

    times = time_calls(shell, opt.ratios, opt.repeats, opt.precision, inputs, on_pass=show, compile_mode=opt.compile)
    dtype = precision_name(opt.precision, device)
    where = hardware_name(device) if device.type == "cuda" else f"{threads} threads"
    header = (f"UNet of {Path(opt.config).name} (random weights), latent {h}x{w}, batch {2 * opt.batch} (CFG), "
              f"{dtype}, {where}, median of {opt.repeats} interleaved passes after one untimed warm-up call of "
              f"each kind")
    print("\n" + report(times, opt.ratios, header))
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(opt.out, json.dumps({"raw": times, "median": medians(times), "torch": torch.__version__,
                                           "device": where, "dtype": dtype, "threads": threads,
                                           "latent": [h, w], "batch": opt.batch, "compile": opt.compile},
                                          indent=1))
    print(f"wrote {opt.out}")
    if opt.profile:
        print("\n" + profile_entries(shell.unet, inputs, opt.precision, [(12, 0.0), (12, 0.5)]))
    return 0


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
