"""Prompt-token pruning and T-GATE on the tiny golden model: kept tokens over the steps and fidelity.
See `sdgen.cli.text_pruning_tiny` (or --help)."""
import sys

from sdgen.cli.text_pruning_tiny import cli

if __name__ == "__main__":
    sys.exit(cli())
