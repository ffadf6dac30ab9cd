"""Image-to-image with the CompVis command-line interface: see `sdgen.cli.img2img` (or --help)."""
import sys

from sdgen.cli.img2img import cli

if __name__ == "__main__":
    sys.exit(cli())
