#!/usr/bin/env bash
# Table 4, the DiffScore source: DaTo with the feature-map difference (the paper's), the noise-prediction
# difference (the released code's) and the released-code parity preset. SD v1.5, ImageNet.
# Rows, needs (environment) and settings: table4_diffscore.sh --help; the specs: sd1/dato_tables/data/tables.yaml.
# Usage: scripts/tables/table4_diffscore.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables table4_diffscore "$@"
