"""What cross-attention costs in one UNet call, and what prompt-token pruning and T-GATE save of it.
See `sdgen.cli.crossattn_costs` (or --help)."""
import sys

from sdgen.cli.crossattn_costs import cli

if __name__ == "__main__":
    sys.exit(cli())
