"""Every table of the paper next to ours: see `dato_tables.report` (or --help).

    python scripts/tables/collect.py $OUT_DIR [--out report.md]
"""
import sys

from dato_tables.report import cli

if __name__ == "__main__":
    sys.exit(cli())
