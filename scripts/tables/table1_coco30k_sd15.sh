#!/usr/bin/env bash
# Table 1, SD v1.5 on COCO-30k: one image per caption of data/coco30k-prompts.txt (30000 images), FID
# against COCO, latency and speed-up of each method over the Original (PLMS, 50 steps).
#
# Rows: Original PLMS 50 | DDIM 10 steps | ToMeSD | DeepCache | DeepCache + ToMeSD | DaTo b1 (+ DATO_EXTRA).
#
# Needs (environment):
#   SD15_CKPT          Stable Diffusion v1.5 checkpoint (.safetensors or .ckpt)
#   COCO_REF           FID reference: .npz of Inception statistics of COCO images (scripts/eval_fid.py
#                      --save-stats on e.g. the val2014 images) or a folder of those images
#   INCEPTION_WEIGHTS  pytorch-fid's pt_inception-2015-12-05-6726825d.pth
#   OUT_DIR            output folder (or --out DIR)
# Optional: METRICS (fid; "fid,clip" adds the CLIP score, then CLIP_WEIGHTS [CLIP_ARCH]), NPROC, BATCH_SIZE,
#   LIMIT (e.g. 5000 for a quicker, more biased FID), SEED, SCALE, STEPS, FEW_STEPS, TOME_RATIO, DC_INTERVAL,
#   DC_DEPTH, DATO_STRATEGY, DATO_EXTRA, SD15_CONFIG, PYTHON (see table1_imagenet_sd15.sh).
#
# Usage: scripts/tables/table1_coco30k_sd15.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N]
#        [--batch-size N]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TABLE_ID=table1_coco30k_sd15
TABLE_TITLE="Table 1: SD v1.5, COCO-30k"
MODEL=sd15
DATASET=coco
METRICS=${METRICS:-fid}
setup "$@"
table1_rows
finish
