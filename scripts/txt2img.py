"""Text-to-image sampling with the CompVis command-line interface: see `sdgen.cli.txt2img` (or --help)."""
import sys

from sdgen.cli.txt2img import cli

if __name__ == "__main__":
    sys.exit(cli())
