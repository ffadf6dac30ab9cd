"""Search a per-step prune ratio for DaTo with NSGA-II, under a fixed cache strategy (--cache_strategy FILE,
default configs/dato/b1.yaml's depths).

    python scripts/search_ratio.py --ckpt sd-v1-5.safetensors --run-dir outputs/search-ratio
    python scripts/search_ratio.py --demo --steps 5 --cache_strategy outputs/search-depth/best.yaml ...

A thin wrapper around datosd.search (see its docstring, or --help); --mode joint searches depths and ratios.
"""
import sys

from datosd.search import main

if __name__ == "__main__":
    sys.exit(main(mode="ratio"))
