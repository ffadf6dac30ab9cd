#!/usr/bin/env bash
# Table 5, image-to-image: DDIM at STRENGTH 0.75 over a folder of init images, one prompt each; FID, CLIP
# score and Inception Score of Original, ToMeSD, DeepCache, DeepCache + ToMeSD and DaTo (b1's last 37 steps).
# Rows, needs (environment) and settings: table5_img2img.sh --help; the specs: sd1/dato_tables/data/tables.yaml.
# Usage: scripts/tables/table5_img2img.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables table5_img2img "$@"
