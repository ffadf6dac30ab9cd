"""Train the shapes model (the demo model) on this CPU: see `shapesworld.cli` (or --help)."""
import sys

from shapesworld.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
