#!/usr/bin/env bash
# Table 2, SDXL (1024 x 1024, EulerEDM 50 steps, guidance 7.0) on a captions file: Original, DeepCache,
# DeepCache + ToMeSD and DaTo, sampled through sdgen.generate (the sgm package).
# Rows, needs (environment) and settings: table2_sdxl.sh --help; the specs: sd1/dato_tables/data/tables.yaml.
# Usage: scripts/tables/table2_sdxl.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables table2_sdxl "$@"
