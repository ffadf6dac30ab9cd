"""Search a per-step cache depth for DaTo with NSGA-II (pruning off, or a fixed --prune_ratio).

    python scripts/search_depth.py --demo --H 64 --W 64 --steps 5 --n-prompts 2 --pop 8 --gens 5
    python scripts/search_depth.py --ckpt sd-v1-5.safetensors --run-dir outputs/search-depth

A thin wrapper around datosd.search (see its docstring, or --help); --mode joint searches depths and ratios.
"""
import sys

from datosd.search import main

if __name__ == "__main__":
    sys.exit(main(mode="depth"))
