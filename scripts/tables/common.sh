# Shared logic of the table scripts (sourced by scripts/tables/table*.sh, not run on its own).
#
# A table script sets TABLE_ID, TABLE_TITLE, MODEL (sd15 | sd2), DATASET (imagenet | coco | img2img) and
# METRICS, calls `setup "$@"`, then `row ID LABEL [--baseline] -- FLAGS...` once per method row, then
# `finish`. Each row generates images (scripts/sample_prompts.py, or img2img_batch.py for DATASET=img2img)
# into OUT_DIR/TABLE_ID/ID/images, evaluates them (scripts/eval_fid.py) into .../ID/metrics.jsonl and records
# the row (add_row.py) in OUT_DIR/TABLE_ID/rows.jsonl and results.md. Re-running resumes: existing images
# are kept, rows are replaced.
#
# Options: --smoke (tiny demo model, random-init metric networks, 4 images: a few minutes on a small CPU),
# --dry-run (print the commands, run nothing), --out DIR, --nproc N, --limit N, --batch-size N, -h/--help.
# Settings come from the environment (see each script's header): paths are never built in.
set -euo pipefail

TABLES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TABLES_DIR/../.." && pwd)
PYTHON=${PYTHON:-python}
SCRIPT_NAME=$(basename "$0")
SMOKE=0
DRY_RUN=0
MISSING=()
PLACEHOLDERS=()

die() { echo "$SCRIPT_NAME: $*" >&2; exit 2; }

usage() {  # the calling script's header comment
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

run_cmd() {  # print a command (shell-quoted), then run it unless --dry-run
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --smoke) SMOKE=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT_DIR=$2; shift ;;
            --nproc) [ $# -ge 2 ] || die "--nproc needs a number"; NPROC=$2; shift ;;
            --limit) [ $# -ge 2 ] || die "--limit needs a number"; LIMIT=$2; shift ;;
            --batch-size) [ $# -ge 2 ] || die "--batch-size needs a number"; BATCH_SIZE=$2; shift ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
        shift
    done
}

# need_path VAR KIND "what it is": VAR must name an existing file (KIND=file), folder (dir) or either (any).
# Problems are collected and reported together by check_needs; a dry run shows unset ones as <VAR>.
need_path() {
    local var=$1 kind=$2 what=$3 value=${!1:-}
    if [ -z "$value" ]; then
        if [ "$DRY_RUN" = 1 ]; then
            printf -v "$var" '<%s>' "$var"; PLACEHOLDERS+=("$var")
        else
            MISSING+=("$var is not set: $what")
        fi
        return 0
    fi
    [ "$DRY_RUN" = 1 ] && return 0
    case "$kind" in
        file) [ -f "$value" ] || MISSING+=("$var=$value is not a file: $what") ;;
        dir) [ -d "$value" ] || MISSING+=("$var=$value is not a folder: $what") ;;
        *) [ -e "$value" ] || MISSING+=("$var=$value does not exist: $what") ;;
    esac
}

check_needs() {
    if [ ${#MISSING[@]} -gt 0 ]; then
        {
            echo "$SCRIPT_NAME: cannot start, these settings are missing or wrong:"
            printf '  - %s\n' "${MISSING[@]}"
            echo "Set them in the environment (OUT_DIR also with --out DIR; see --help), or run with --smoke to try the whole"
            echo "pipeline on the tiny demo model, or --dry-run to see the commands."
        } >&2
        exit 2
    fi
    if [ ${#PLACEHOLDERS[@]} -gt 0 ]; then
        echo "# dry run: ${PLACEHOLDERS[*]} not set, shown as <NAME>"
    fi
}

has_metric() { [[ ",$METRICS," == *",$1,"* ]]; }

setup() {
    parse_args "$@"
    : "${METRICS:=fid}"
    if [ "$SMOKE" = 1 ]; then
        : "${BATCH_SIZE:=2}" "${LIMIT:=4}"
    fi
    : "${NPROC:=1}" "${BATCH_SIZE:=1}" "${SEED:=0}" "${SCALE:=7.5}" "${LIMIT:=}"
    [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC/--nproc must be a positive integer, got '$NPROC'"
    [[ "$BATCH_SIZE" =~ ^[1-9][0-9]*$ ]] || die "BATCH_SIZE/--batch-size must be a positive integer, got '$BATCH_SIZE'"
    [ -z "$LIMIT" ] || [[ "$LIMIT" =~ ^[1-9][0-9]*$ ]] || die "LIMIT/--limit must be a positive integer, got '$LIMIT'"
    [[ "$SEED" =~ ^[0-9]+$ ]] || die "SEED must be a non-negative integer, got '$SEED'"
    if [ "$SMOKE" = 1 ]; then
        setup_smoke
    else
        setup_real
    fi
    : "${TOME_RATIO:=0.5}" "${DC_INTERVAL:=3}" "${DC_DEPTH:=1}"
    SETUP_LINE="$SETUP_LINE, guidance $SCALE"
    [ "$SMOKE" = 0 ] || make_smoke_assets
    TABLE_OUT="$OUT_DIR/$TABLE_ID"
    [ "$DRY_RUN" = 1 ] || mkdir -p "$TABLE_OUT"

    if [ "$NPROC" -gt 1 ]; then
        LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
    else
        LAUNCH=("$PYTHON")
    fi
    SAMPLE_BASE=("${MODEL_ARGS[@]}" --from-file "$PROMPTS" --repeats "$REPEATS" --seed "$SEED"
                 --batch_size "$BATCH_SIZE" --scale "$SCALE" --H "$H" --W "$W" --precision "$PRECISION"
                 "${DEVICE_ARGS[@]}")
    [ -z "$LIMIT" ] || SAMPLE_BASE+=(--limit "$LIMIT")

    EVAL_BASE=(--metrics "$METRICS" --no-progress "${EVAL_EXTRA[@]}")
    if has_metric fid; then EVAL_BASE+=(--ref "$REF"); fi
    if has_metric fid || has_metric is; then EVAL_BASE+=("${INCEPTION_ARGS[@]}"); fi
    if has_metric is; then EVAL_BASE+=(--is-splits "$IS_SPLITS"); fi
    if has_metric clip; then
        EVAL_BASE+=("${CLIP_ARGS[@]}" --prompts "$PROMPTS")
        [ "$REPEATS" -le 1 ] || EVAL_BASE+=(--prompts-cycle)
    fi
    if [ "$DATASET" = img2img ]; then
        SETUP_LINE="$SETUP_LINE; seed $SEED + image index; one image per img2img.py call"
    else
        SETUP_LINE="$SETUP_LINE; seed $SEED + image index; batch size $BATCH_SIZE; $NPROC process(es)"
    fi
    echo "# $TABLE_TITLE"
    echo "# results: $TABLE_OUT/results.md"
}

setup_real() {
    if [ -z "${OUT_DIR:-}" ]; then
        if [ "$DRY_RUN" = 1 ]; then
            OUT_DIR="<OUT_DIR>"; PLACEHOLDERS+=(OUT_DIR)
        else
            MISSING+=("OUT_DIR is not set: the folder for images and results (or pass --out DIR)")
        fi
    fi
    : "${STEPS:=50}" "${FEW_STEPS:=10}" "${PRECISION:=autocast}" "${IS_SPLITS:=10}"
    : "${DATO_STRATEGY:=$REPO_ROOT/configs/dato/b1.yaml}"
    DEVICE_ARGS=()
    I2I_DEVICE_ARGS=()
    EVAL_EXTRA=()
    case "$MODEL" in
        sd15)
            need_path SD15_CKPT file \
                "the Stable Diffusion v1.5 checkpoint (v1-5-pruned-emaonly.safetensors or .ckpt)"
            MODEL_ARGS=(--ckpt "${SD15_CKPT:-}"
                        --config "${SD15_CONFIG:-$REPO_ROOT/configs/stable-diffusion/v1-inference.yaml}")
            : "${H:=512}" "${W:=512}" ;;
        sd2)
            need_path SD2_CKPT file "the Stable Diffusion 2.x checkpoint (e.g. v2-1_512-ema-pruned.ckpt; for a \
768-v model also set SD2_CONFIG=configs/stable-diffusion/v2-inference-v.yaml H=768 W=768)"
            MODEL_ARGS=(--ckpt "${SD2_CKPT:-}"
                        --config "${SD2_CONFIG:-$REPO_ROOT/configs/stable-diffusion/v2-inference.yaml}")
            : "${H:=512}" "${W:=512}" ;;
        *) die "internal: MODEL must be sd15 or sd2" ;;
    esac
    case "$DATASET" in
        imagenet)
            PROMPTS="$REPO_ROOT/data/imagenet-class-prompts.txt"; : "${REPEATS:=2}"
            need_path IMAGENET_REF any "FID reference of ImageNet: an .npz of Inception statistics (mu, sigma; \
make it with scripts/eval_fid.py --save-stats) or a folder of images"
            REF=${IMAGENET_REF:-} ;;
        coco)
            PROMPTS="$REPO_ROOT/data/coco30k-prompts.txt"; : "${REPEATS:=1}"
            need_path COCO_REF any "FID reference of COCO: an .npz of Inception statistics of COCO images \
(scripts/eval_fid.py --save-stats) or a folder of images"
            REF=${COCO_REF:-} ;;
        img2img)
            need_path I2I_INIT_DIR dir "folder of img2img init images (e.g. COCO val2014 images)"
            need_path I2I_PROMPTS file \
                "one prompt per init image, same order as the folder's files (e.g. their captions)"
            : "${I2I_REF:=${I2I_INIT_DIR:-}}"
            need_path I2I_REF any "FID reference for img2img outputs (default: the init images themselves)"
            PROMPTS=${I2I_PROMPTS:-}; REF=${I2I_REF:-}; REPEATS=1 ;;
        *) die "internal: DATASET must be imagenet, coco or img2img" ;;
    esac
    need_path DATO_STRATEGY file "the DaTo strategy YAML (default configs/dato/b1.yaml)"
    if has_metric fid || has_metric is; then
        need_path INCEPTION_WEIGHTS file "pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
        INCEPTION_ARGS=(--inception-weights "${INCEPTION_WEIGHTS:-}")
    fi
    if has_metric clip; then
        need_path CLIP_WEIGHTS file \
            "open_clip weights for CLIP_ARCH (default ViT-g-14, laion2b_s12b_b42k open_clip_pytorch_model.bin)"
        CLIP_ARGS=(--clip-weights "${CLIP_WEIGHTS:-}")
        [ -z "${CLIP_ARCH:-}" ] || CLIP_ARGS+=(--clip-arch "$CLIP_ARCH")
    fi
    check_needs
    SETUP_LINE="$H x $W, precision $PRECISION"
}

setup_smoke() {
    if [ -z "${OUT_DIR:-}" ]; then
        if [ "$DRY_RUN" = 1 ]; then
            OUT_DIR="<OUT_DIR>"
        else
            OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/dato-tables-smoke.XXXXXX")
        fi
    fi
    SMOKE_DIR="$OUT_DIR/_smoke"
    STEPS=5 FEW_STEPS=2 PRECISION=full H=64 W=64 IS_SPLITS=2 DC_INTERVAL=2
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # small CPU runs: one thread avoids oversubscribing shared cores
    MODEL_ARGS=(--demo)
    DEVICE_ARGS=(--device cpu --no_progress)
    I2I_DEVICE_ARGS=(--device cpu)
    EVAL_EXTRA=(--device cpu --num-workers 0 --batch-size 8)
    INCEPTION_ARGS=(--random-inception-for-tests 0)
    CLIP_ARGS=(--clip-arch "$SMOKE_DIR/tiny-clip.json" --clip-weights "$SMOKE_DIR/tiny-clip.pt")
    case "$DATASET" in
        imagenet) PROMPTS="$REPO_ROOT/data/imagenet-class-prompts.txt"; REPEATS=2 ;;
        coco) PROMPTS="$REPO_ROOT/data/coco30k-prompts.txt"; REPEATS=1 ;;
        img2img) PROMPTS="$SMOKE_DIR/init-prompts.txt"; I2I_INIT_DIR="$SMOKE_DIR/init"; REPEATS=1 ;;
    esac
    REF="$SMOKE_DIR/ref.npz"
    DATO_STRATEGY="$SMOKE_DIR/smoke$STEPS.yaml"
    SETUP_LINE="smoke: demo model, $H x $W"
}

make_smoke_assets() {
    echo "# smoke run in $OUT_DIR: tiny random-weight demo model, random-init metric networks (numbers mean nothing)"
    if [ ! -f "$SMOKE_DIR/tiny-clip.pt" ]; then
        run_cmd "$PYTHON" "$TABLES_DIR/smoke_assets.py" --out "$SMOKE_DIR"
    fi
    if [ ! -f "$REF" ]; then
        run_cmd "$PYTHON" "$REPO_ROOT/scripts/eval_fid.py" --samples "$SMOKE_DIR/ref" --save-stats "$REF" \
            "${INCEPTION_ARGS[@]}" "${EVAL_EXTRA[@]}" --no-progress
    fi
    if [ ! -f "$DATO_STRATEGY" ]; then
        run_cmd "$PYTHON" "$TABLES_DIR/make_strategy.py" --base smoke --steps "$STEPS" --out "$DATO_STRATEGY"
    fi
}

# row ID LABEL [--baseline] -- FLAGS...   (FLAGS go to sample_prompts.py, or to img2img.py for img2img)
row() {
    local id=$1 label=$2 baseline=()
    shift 2
    if [ "${1:-}" = "--baseline" ]; then baseline=(--baseline); shift; fi
    [ "${1:-}" = "--" ] && shift
    local dir="$TABLE_OUT/$id"
    echo "## row $id: $label"
    if [ "$DATASET" = img2img ]; then
        local limit=()
        [ -z "$LIMIT" ] || limit=(--limit "$LIMIT")
        run_cmd "$PYTHON" "$TABLES_DIR/img2img_batch.py" --init-dir "$I2I_INIT_DIR" --prompts "$PROMPTS" \
            --outdir "$dir/images" --seed "$SEED" "${limit[@]}" -- \
            "${MODEL_ARGS[@]}" --scale "$SCALE" --precision "$PRECISION" "${I2I_DEVICE_ARGS[@]}" "$@"
    else
        run_cmd "${LAUNCH[@]}" "$REPO_ROOT/scripts/sample_prompts.py" "${SAMPLE_BASE[@]}" --outdir "$dir/images" "$@"
    fi
    [ "$DRY_RUN" = 1 ] || rm -f "$dir/metrics.jsonl"
    run_cmd "$PYTHON" "$REPO_ROOT/scripts/eval_fid.py" --samples "$dir/images" "${EVAL_BASE[@]}" \
        --results "$dir/metrics.jsonl"
    local smoke=()
    [ "$SMOKE" = 0 ] || smoke=(--smoke)
    run_cmd "$PYTHON" "$TABLES_DIR/add_row.py" --table-dir "$TABLE_OUT" --table "$TABLE_ID" --title "$TABLE_TITLE" \
        --setup "$SETUP_LINE" --metrics "$METRICS" --row "$id" --label "$label" --samples "$dir/images" \
        --metrics-file "$dir/metrics.jsonl" "${baseline[@]}" "${smoke[@]}"
}

# make_strategy NAME ARGS...: write a derived DaTo strategy (make_strategy.py ARGS) to
# OUT_DIR/TABLE_ID/strategies/NAME.yaml and put that path in $STRATEGY.
make_strategy() {
    local name=$1; shift
    STRATEGY="$TABLE_OUT/strategies/$name.yaml"
    run_cmd "$PYTHON" "$TABLES_DIR/make_strategy.py" "$@" --out "$STRATEGY"
}

# The method rows of Table 1 (SD v1.5 ImageNet / COCO, SD 2): Original, few-step DDIM, ToMeSD, DeepCache,
# DeepCache + ToMeSD, DaTo (b1, plus DATO_EXTRA="name=strategy.yaml ..." rows).
table1_rows() {
    local plms=(--plms --ddim_steps "$STEPS")
    row original "Original (PLMS, $STEPS steps)" --baseline -- "${plms[@]}"
    row ddim_few "DDIM, $FEW_STEPS steps" -- --ddim_steps "$FEW_STEPS"
    row tome "ToMeSD (r=$TOME_RATIO)" -- "${plms[@]}" --tome --tome_ratio "$TOME_RATIO"
    row deepcache "DeepCache (N=$DC_INTERVAL, depth $DC_DEPTH)" -- "${plms[@]}" --deepcache \
        --cache_interval "$DC_INTERVAL" --cache_depth "$DC_DEPTH"
    row deepcache_tome "DeepCache + ToMeSD" -- "${plms[@]}" --deepcache --cache_interval "$DC_INTERVAL" \
        --cache_depth "$DC_DEPTH" --tome --tome_ratio "$TOME_RATIO"
    row dato_b1 "DaTo ($(basename "$DATO_STRATEGY" .yaml))" -- "${plms[@]}" --dato --strategy "$DATO_STRATEGY"
    local extra name path
    for extra in ${DATO_EXTRA:-}; do
        name=${extra%%=*}; path=${extra#*=}
        [ "$DRY_RUN" = 1 ] || [ -f "$path" ] || die "DATO_EXTRA: strategy file not found: $path"
        row "dato_$name" "DaTo ($name)" -- "${plms[@]}" --dato --strategy "$path"
    done
}

finish() {
    if [ "$DRY_RUN" = 0 ]; then
        echo
        cat "$TABLE_OUT/results.md"
    fi
    echo "# side by side with the paper: $PYTHON $TABLES_DIR/collect.py $TABLE_OUT"
}
