"""Peak memory of loading a full-size checkpoint with random weights: see `sdgen.cli.load_memory` (or --help)."""
import sys

from sdgen.cli.load_memory import cli

if __name__ == "__main__":
    sys.exit(cli())
