#!/usr/bin/env bash
# Table 5, image-to-image: scripts/img2img.py (DDIM, STEPS=50 steps at STRENGTH=0.75, so it runs
# int(0.75 * 50) = 37 steps) on a folder of init images, one prompt each; FID, CLIP score and Inception Score.
#
# The DaTo row uses the last T steps of DATO_STRATEGY (b1), T = int(STRENGTH * STEPS): the steps of a
# 50-step schedule that img2img visits (make_strategy.py --last T). DeepCache runs its uniform schedule on
# the T steps. Init image i gets prompt line i + 1 and seed SEED + i (scripts/tables/img2img_batch.py, which
# loads the model once and calls img2img.py's main() per image). NPROC does not apply here.
# Rows: Original (DDIM) | ToMeSD | DeepCache | DeepCache + ToMeSD | DaTo.
#
# Needs (environment):
#   SD15_CKPT          Stable Diffusion v1.5 checkpoint
#   I2I_INIT_DIR       folder of init images (e.g. COCO val2014 images; sides are cut to multiples of 64)
#   I2I_PROMPTS        one prompt per init image, in the folder's file order (e.g. their captions)
#   INCEPTION_WEIGHTS  pytorch-fid's pt_inception-2015-12-05-6726825d.pth
#   CLIP_WEIGHTS       open_clip weights (default ViT-g-14 laion2b_s12b_b42k; other: set CLIP_ARCH)
#   OUT_DIR            output folder (or --out DIR)
# Optional: I2I_REF (FID reference; default the init images), STRENGTH (0.75), STEPS (50), SCALE (7.5),
#   LIMIT, SEED, TOME_RATIO, DC_INTERVAL, DC_DEPTH, DATO_STRATEGY, CLIP_ARCH, PYTHON.
#
# Usage: scripts/tables/table5_img2img.sh [--smoke] [--dry-run] [--out DIR] [--limit N]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TABLE_ID=table5_img2img
TABLE_TITLE="Table 5: image-to-image (SD v1.5)"
MODEL=sd15
DATASET=img2img
METRICS=${METRICS:-fid,clip,is}
STRENGTH=${STRENGTH:-0.75}
setup "$@"
[ "$SMOKE" = 0 ] || STRENGTH=0.8
T_ENC=$("$PYTHON" -c "import sys; print(int(float(sys.argv[1]) * int(sys.argv[2])))" "$STRENGTH" "$STEPS")
[ "$T_ENC" -ge 1 ] || die "STRENGTH=$STRENGTH with STEPS=$STEPS runs no step"
ddim=(--ddim_steps "$STEPS" --strength "$STRENGTH")
SETUP_LINE="$SETUP_LINE; strength $STRENGTH ($T_ENC of $STEPS DDIM steps)"
make_strategy "dato-last$T_ENC" --base "$DATO_STRATEGY" --last "$T_ENC"
row original "Original (DDIM, $T_ENC of $STEPS steps)" --baseline -- "${ddim[@]}"
row tome "ToMeSD (r=$TOME_RATIO)" -- "${ddim[@]}" --tome --tome_ratio "$TOME_RATIO"
row deepcache "DeepCache (N=$DC_INTERVAL, depth $DC_DEPTH)" -- "${ddim[@]}" --deepcache \
    --cache_interval "$DC_INTERVAL" --cache_depth "$DC_DEPTH"
row deepcache_tome "DeepCache + ToMeSD" -- "${ddim[@]}" --deepcache --cache_interval "$DC_INTERVAL" \
    --cache_depth "$DC_DEPTH" --tome --tome_ratio "$TOME_RATIO"
row dato "DaTo ($(basename "$STRATEGY" .yaml))" -- "${ddim[@]}" --dato --strategy "$STRATEGY"
finish
