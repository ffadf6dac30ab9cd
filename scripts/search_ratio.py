"""Search a per-step prune ratio for DaTo with NSGA-II: see `dato_search.cli` (or --help)."""
import sys

from dato_search.cli import cli

if __name__ == "__main__":
    sys.exit(cli(mode="ratio"))
