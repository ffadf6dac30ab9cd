#!/usr/bin/env bash
# Table 1, Stable Diffusion 2: the Table 1 methods on SD 2.x, DATASET=imagenet (default) or coco; guidance 9.0.
# Rows, needs (environment) and settings: table1_sd2.sh --help; the specs: sd1/dato_tables/data/tables.yaml.
# Usage: scripts/tables/table1_sd2.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables table1_sd2 "$@"
