"""FID, CLIP score, Inception Score and ImageReward of a folder of images: see `sdeval.cli` (or --help)."""
import sys

from sdeval.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
