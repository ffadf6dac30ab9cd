#!/usr/bin/env bash
# Table 3, CFG alignment of the base tokens: DaTo with both classifier-free-guidance halves using the base
# tokens chosen from the conditional half (default) vs each half choosing its own (--no_align_cfg), at several
# prune ratios. SD v1.5, ImageNet 2 images per class, PLMS 50 steps.
#
# Each ratio r uses b1's cache depths (DATO_STRATEGY) with every step's prune ratio set to r
# (make_strategy.py --ratio r), so only the pruning ratio and the alignment change between rows.
# Rows: Original PLMS 50 | for r in RATIOS: DaTo r aligned | DaTo r per-half.
#
# Needs (environment): SD15_CKPT, IMAGENET_REF, INCEPTION_WEIGHTS, OUT_DIR (see table1_imagenet_sd15.sh).
# Optional: RATIOS ("0.3 0.5 0.7"), DATO_STRATEGY, NPROC, BATCH_SIZE, LIMIT, SEED, SCALE, STEPS, PYTHON.
#
# Usage: scripts/tables/table3_cfg_alignment.sh [--smoke] [--dry-run] [--out DIR] [--nproc N] [--limit N]
#        [--batch-size N]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TABLE_ID=table3_cfg_alignment
TABLE_TITLE="Table 3: CFG alignment of base tokens (SD v1.5, ImageNet)"
MODEL=sd15
DATASET=imagenet
METRICS=${METRICS:-fid}
RATIOS=${RATIOS:-0.3 0.5 0.7}
setup "$@"
plms=(--plms --ddim_steps "$STEPS")
row original "Original (PLMS, $STEPS steps)" --baseline -- "${plms[@]}"
for r in $RATIOS; do
    make_strategy "ratio-$r" --base "$DATO_STRATEGY" --ratio "$r"
    row "dato_r${r}_aligned" "DaTo r=$r, CFG-aligned base tokens" -- "${plms[@]}" --dato --strategy "$STRATEGY"
    row "dato_r${r}_per_half" "DaTo r=$r, base tokens per CFG half" -- "${plms[@]}" --dato --strategy "$STRATEGY" \
        --no_align_cfg
done
finish
