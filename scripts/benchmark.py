"""Side-by-side speed of DaTo and the paper's baselines: see `sdgen.cli.benchmark` (or --help)."""
import sys

from sdgen.cli.benchmark import cli

if __name__ == "__main__":
    sys.exit(cli())
