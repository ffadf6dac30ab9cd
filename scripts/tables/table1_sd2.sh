#!/usr/bin/env bash
# Table 1, Stable Diffusion 2: the same method rows as for SD v1.5, on SD 2.x.
#
# Rows: Original PLMS 50 | DDIM 10 steps | ToMeSD | DeepCache | DeepCache + ToMeSD | DaTo (+ DATO_EXTRA).
# The DaTo row uses DATO_STRATEGY, by default configs/dato/b1.yaml, which the paper searched for SD v1.5:
# give the SD 2 strategy there if you have one (scripts/search_*.py find one).
#
# Needs (environment):
#   SD2_CKPT           Stable Diffusion 2.x checkpoint (default config: v2-inference.yaml, 512 x 512, eps; for
#                      the 768-v model set SD2_CONFIG=configs/stable-diffusion/v2-inference-v.yaml H=768 W=768)
#   DATASET            imagenet (default) or coco: the prompt set, and which reference the FID uses:
#   IMAGENET_REF | COCO_REF   .npz of Inception statistics or a folder of images
#   INCEPTION_WEIGHTS  pytorch-fid's pt_inception-2015-12-05-6726825d.pth
#   OUT_DIR            output folder (or --out DIR)
# Optional: SD2_CONFIG, H, W, NPROC, BATCH_SIZE, LIMIT, SEED, SCALE, STEPS, FEW_STEPS, TOME_RATIO,
#   DC_INTERVAL, DC_DEPTH, DATO_STRATEGY, DATO_EXTRA, PYTHON.
#
# Usage: scripts/tables/table1_sd2.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N] [--batch-size N]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATASET=${DATASET:-imagenet}
TABLE_ID=table1_sd2
TABLE_TITLE="Table 1: SD 2, $DATASET"
MODEL=sd2
METRICS=${METRICS:-fid}
setup "$@"
table1_rows
finish
