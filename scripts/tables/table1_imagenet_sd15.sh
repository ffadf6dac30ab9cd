#!/usr/bin/env bash
# Table 1, SD v1.5 on ImageNet: 2 images per class (2 passes over data/imagenet-class-prompts.txt, 2000
# images), FID against ImageNet, latency and speed-up of each method over the Original (PLMS, 50 steps).
#
# Rows: Original PLMS 50 | DDIM 10 steps | ToMeSD | DeepCache | DeepCache + ToMeSD | DaTo b1 (+ DATO_EXTRA).
#
# Needs (environment):
#   SD15_CKPT          Stable Diffusion v1.5 checkpoint (.safetensors or .ckpt)
#   IMAGENET_REF       FID reference: .npz of Inception statistics (scripts/eval_fid.py --save-stats on the
#                      ImageNet images you compare with) or a folder of those images
#   INCEPTION_WEIGHTS  pytorch-fid's pt_inception-2015-12-05-6726825d.pth
#   OUT_DIR            output folder (or --out DIR)
# Optional: NPROC (torchrun processes, one per GPU), BATCH_SIZE (1), LIMIT (first N images), SEED (0),
#   SCALE (7.5), STEPS (50), FEW_STEPS (10), TOME_RATIO (0.5), DC_INTERVAL (3), DC_DEPTH (1),
#   DATO_STRATEGY (configs/dato/b1.yaml), DATO_EXTRA ("b2=path.yaml b3=path.yaml"), SD15_CONFIG, PYTHON.
#
# Usage: scripts/tables/table1_imagenet_sd15.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N]
#        [--batch-size N]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TABLE_ID=table1_imagenet_sd15
TABLE_TITLE="Table 1: SD v1.5, ImageNet (2 images per class)"
MODEL=sd15
DATASET=imagenet
METRICS=${METRICS:-fid}
setup "$@"
table1_rows
finish
