"""Generate one image per (prompt, repeat) of a prompt file, for evaluation: see `sdgen.cli.sample_prompts`."""
import sys

from sdgen.cli.sample_prompts import cli

if __name__ == "__main__":
    sys.exit(cli())
