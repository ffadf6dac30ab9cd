#!/usr/bin/env bash
# The paper's speed setting on one GPU: SD 1.5 at 512x512, 50 PLMS steps, every method of Table 1 measured
# end to end in one process, eager and compiled (torch.compile 'reduce-overhead': CUDA graphs per DaTo
# variant) side by side (float16 autocast batch 1 and 8; float32 eager), after the CUDA checks
# (tests/test_cuda.py, pytest marker `cuda`); then per-call times, eager and compiled.
#
# Usage: scripts/bench/paper_gpu.sh [OUT_DIR] [--ckpt CKPT]   (default: random weights, OUT_DIR outputs/bench)
# Speed does not depend on weight values; with --ckpt the PSNR / latent-MSE columns become meaningful.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${1:-outputs/bench}
shift || true
MODEL=(--random-weights)
if [ "${1:-}" = "--ckpt" ]; then
    [ $# -ge 2 ] || { echo "paper_gpu.sh: --ckpt needs a checkpoint path" >&2; exit 2; }
    MODEL=(--ckpt "$2")
fi
COMMON=("${MODEL[@]}" --device cuda --steps 50 --outdir "$OUT")
mkdir -p "$OUT"
python -m pytest -m cuda tests/test_cuda.py -q -rA 2>&1 | tee "$OUT/cuda_check.log"
python scripts/benchmark.py "${COMMON[@]}" --precision autocast --repeats 3 --compile reduce-overhead \
    --name gpu-fp16
python scripts/benchmark.py "${COMMON[@]}" --precision autocast --repeats 3 --batch 8 --no-decode \
    --methods original,tome-0.5,deepcache-n3,deepcache-n5,deepcache-n3+tome-0.5,dato --compile reduce-overhead \
    --name gpu-fp16-batch8
python scripts/bench/unet_calls.py --device cuda --precision autocast --repeats 10 --compile reduce-overhead \
    --profile --out "$OUT/unet_calls_gpu_fp16.json"
python scripts/benchmark.py "${COMMON[@]}" --precision full --repeats 3 --name gpu-fp32
