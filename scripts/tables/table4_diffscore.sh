#!/usr/bin/env bash
# Table 4, the source of the dynamics score (DiffScore) that picks the base tokens: the paper's feature-map
# difference (output_blocks[11], --diff_source features, the default) vs the noise-prediction difference the
# authors' released code uses (--diff_source eps), and the released code's three choices together
# (--dato_parity). SD v1.5, ImageNet 2 images per class, PLMS 50 steps, DaTo b1.
#
# Random base tokens at every step are not offered by datosd (only the first steps, before two score maps
# exist, draw them at random), so that ablation row is not produced.
# Rows: Original PLMS 50 | DaTo features | DaTo eps | DaTo released-code choices.
#
# Needs (environment): SD15_CKPT, IMAGENET_REF, INCEPTION_WEIGHTS, OUT_DIR (see table1_imagenet_sd15.sh).
# Optional: DATO_STRATEGY (b1), NPROC, BATCH_SIZE, LIMIT, SEED, SCALE, STEPS, PYTHON.
#
# Usage: scripts/tables/table4_diffscore.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N]
#        [--batch-size N]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TABLE_ID=table4_diffscore
TABLE_TITLE="Table 4: DiffScore source (SD v1.5, ImageNet)"
MODEL=sd15
DATASET=imagenet
METRICS=${METRICS:-fid}
setup "$@"
dato=(--plms --ddim_steps "$STEPS" --dato --strategy "$DATO_STRATEGY")
row original "Original (PLMS, $STEPS steps)" --baseline -- --plms --ddim_steps "$STEPS"
row dato_features "DaTo, DiffScore from features (paper)" -- "${dato[@]}" --diff_source features
row dato_eps "DaTo, DiffScore from noise prediction" -- "${dato[@]}" --diff_source eps
row dato_released "DaTo, released-code choices (--dato_parity)" -- "${dato[@]}" --dato_parity
finish
