#!/usr/bin/env bash
# Table 1, SD v1.5 on COCO-30k (one image per caption): FID, latency and speed-up of the Table 1 methods.
# Rows, needs (environment) and settings: table1_coco30k_sd15.sh --help; the specs: sd1/dato_tables/data/tables.yaml.
# Usage: scripts/tables/table1_coco30k_sd15.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables table1_coco30k_sd15 "$@"
