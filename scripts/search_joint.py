"""Search per-step cache depths and prune ratios for DaTo with NSGA-II: see `dato_search.cli` (or --help)."""
import sys

from dato_search.cli import cli

if __name__ == "__main__":
    sys.exit(cli(mode="joint"))
