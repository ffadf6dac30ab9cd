"""Per-UNet-call timing of DaTo's pruning and caching against ToMeSD: see `sdgen.cli.unet_calls` (or --help)."""
import sys

from sdgen.cli.unet_calls import cli

if __name__ == "__main__":
    sys.exit(cli())
