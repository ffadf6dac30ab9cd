"""Search per-step cache depths and prune ratios for DaTo together, with NSGA-II.

    python scripts/search_joint.py --ckpt sd-v1-5.safetensors --run-dir outputs/search-joint
    python scripts/search_joint.py --demo --H 64 --W 64 --steps 5 --n-prompts 2 --pop 8 --gens 5

A thin wrapper around datosd.search (see its docstring, or --help).
"""
import sys

from datosd.search import main

if __name__ == "__main__":
    sys.exit(main(mode="joint"))
