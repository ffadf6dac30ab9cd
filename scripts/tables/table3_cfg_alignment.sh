#!/usr/bin/env bash
# Table 3, CFG alignment of the base tokens: DaTo with CFG-aligned vs per-half base tokens at the prune
# ratios RATIOS (b1's cache depths). SD v1.5, ImageNet.
# Rows, needs (environment) and settings: table3_cfg_alignment.sh --help; the specs: sd1/dato_tables/data/tables.yaml.
# Usage: scripts/tables/table3_cfg_alignment.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables table3_cfg_alignment "$@"
