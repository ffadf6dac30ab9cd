"""Peak memory of loading a full-size checkpoint with `ldm.util.load_model_from_config` (random weights).

    python scripts/load_memory.py write --config configs/stable-diffusion/sd_xl_base.yaml \
        --dtype bfloat16 --out /tmp/sdxl-random-bf16.safetensors
    python scripts/load_memory.py load --config configs/stable-diffusion/sd_xl_base.yaml \
        --ckpt /tmp/sdxl-random-bf16.safetensors --dtype bfloat16

`write` streams a .safetensors file with the config's key set (in the checkpoint naming of real files: the
CLIP text model under `text_model.`; without the computed `denoiser.sigmas`) and random values, one tensor at
a time, so writing needs no copy of the model in memory. `load` runs in a fresh process and prints the resident set before loading, the peak
(VmHWM of /proc/self/status) and the seconds taken.
"""
import argparse
import json
import struct
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import COMPUTED_KEYS
from ldm.util import instantiate_from_config, load_model_from_config

DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16")}
CHUNK = 1 << 24  # values drawn per randn call


def checkpoint_key(key: str) -> str:
    """Our key -> the naming of real checkpoints: a transformers-5 CLIP text model gets its `text_model.` level."""
    head, anchor, rest = key.partition("transformer.")
    clip_parts = ("embeddings.", "encoder.layers.", "final_layer_norm.")
    if anchor and head.endswith(("cond_stage_model.", "embedders.0.")) and rest.startswith(clip_parts):
        return head + anchor + "text_model." + rest
    return key


def write_random_checkpoint(config_path: Path, out: Path, dtype_name: str, seed: int = 0) -> int:
    """Write a .safetensors file with the model's keys and shapes and N(0, 0.02) values; returns its bytes."""
    dtype, tag = DTYPES[dtype_name]
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(str(config_path)).model)
    entries, offset = [], 0
    for key, tensor in model.state_dict().items():
        if key in COMPUTED_KEYS:
            continue  # the model computes it (denoiser.sigmas); real checkpoints may leave it out
        nbytes = tensor.numel() * torch.empty((), dtype=dtype).element_size()
        entries.append((checkpoint_key(key), tuple(tensor.shape), offset, nbytes))
        offset += nbytes
    header = {key: {"dtype": tag, "shape": list(shape), "data_offsets": [start, start + n]}
              for key, shape, start, n in entries}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for key, shape, _, _ in entries:
            numel = int(torch.Size(shape).numel())
            for start in range(0, numel, CHUNK):
                values = 0.02 * torch.randn(min(CHUNK, numel - start), generator=generator)
                f.write(values.to(dtype).view(torch.uint8).numpy().tobytes())
    return out.stat().st_size


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakSampler(threading.Thread):
    """Samples RssAnon (memory the process allocated) and RssFile (mapped file pages, e.g. the checkpoint
    read by safetensors through mmap: page cache the kernel can reclaim) every 20 ms; keeps their maxima."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            for field in self.peaks:
                self.peaks[field] = max(self.peaks[field], status_kib(field))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["write", "load"])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, help="write: the file to create")
    parser.add_argument("--ckpt", type=Path, help="load: the checkpoint to load")
    opt = parser.parse_args(argv)
    if opt.action == "write":
        if opt.out is None:
            parser.error("write needs --out")
        size = write_random_checkpoint(opt.config, opt.out, opt.dtype)
        print(f"wrote {opt.out}: {size / 2 ** 30:.2f} GiB")
        return 0
    if opt.ckpt is None:
        parser.error("load needs --ckpt")
    before = status_kib("VmRSS")
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    model = load_model_from_config(OmegaConf.load(str(opt.config)), str(opt.ckpt), dtype=DTYPES[opt.dtype][0])
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    gib = 2 ** 20  # KiB per GiB
    print(f"weights {weights / 2 ** 30:.2f} GiB ({opt.dtype}); RSS before loading {before / gib:.2f} GiB; "
          f"peak RSS (VmHWM) {status_kib('VmHWM') / gib:.2f} GiB, of which at most "
          f"{sampler.peaks['RssAnon'] / gib:.2f} GiB allocated and {sampler.peaks['RssFile'] / gib:.2f} GiB mapped "
          f"file pages; RSS after {status_kib('VmRSS') / gib:.2f} GiB; {seconds:.1f} s")
    # safetensors maps the file: tensors taken over unconverted stay file-backed until first read. Read all.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.sum()
    print(f"after reading every weight once: RSS {status_kib('VmRSS') / gib:.2f} GiB = "
          f"{status_kib('RssAnon') / gib:.2f} GiB allocated + {status_kib('RssFile') / gib:.2f} GiB file pages; "
          f"peak RSS (VmHWM) {status_kib('VmHWM') / gib:.2f} GiB")
    return 0


def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())
