"""`python -m dato_tables TABLE [options]`: run one table of the paper (see dato_tables.cli)."""
import sys

from .cli import cli

sys.exit(cli())
