#!/usr/bin/env bash
# Table 1, SD v1.5 on ImageNet (2 images per class): FID, latency and speed-up of Original (PLMS 50),
# DDIM 10, ToMeSD, DeepCache, DeepCache + ToMeSD and DaTo b1 (+ DATO_EXTRA rows).
# Rows, needs (environment) and settings: table1_imagenet_sd15.sh --help; the specs: sd1/dato_tables/data/tables.yaml.
# Usage: scripts/tables/table1_imagenet_sd15.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables table1_imagenet_sd15 "$@"
