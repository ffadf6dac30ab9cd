#!/usr/bin/env bash
# The CPU tables of docs/speed.md: the full-size SD 1.5 architecture with random weights at 512x512.
#
#   1. 50-step table predicted from the per-step cost table, float32 and bfloat16 autocast (minutes each);
#   2. 50-step table measured end to end, float32, one untimed warm-up and one timed run of every method
#      (about 90 minutes on 2 cores);
#   3. DaTo b1 against the original end to end, float32 (two timed runs) and bfloat16 autocast (one);
#   4. per-UNet-call timings of DaTo pruning against tomesd and of depth-1 steps, eager and torch.compile-d
#      (scripts/bench/unet_calls.py --compile default: each call kind compiles once, minutes per kind).
#
# Usage: scripts/bench/readme_cpu.sh [OUT_DIR]   (default outputs/bench; THREADS=N to pin torch threads)
# The cost tables are stored in OUT_DIR/costs.json and reused by later steps and runs with the same key
# (add --remeasure to the benchmark lines to time their entries again).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${1:-outputs/bench}
THREADS=${THREADS:-$(nproc)}
COMMON=(--random-weights --steps 50 --threads "$THREADS" --outdir "$OUT")
python scripts/benchmark.py "${COMMON[@]}" --predict-only --precision full --name cpu-fp32-50steps-predicted
python scripts/benchmark.py "${COMMON[@]}" --predict-only --precision autocast --name cpu-bf16-50steps-predicted
python scripts/benchmark.py "${COMMON[@]}" --repeats 1 --precision full --name cpu-fp32-50steps-measured
python scripts/benchmark.py "${COMMON[@]}" --methods original,dato --repeats 2 --precision full \
    --name cpu-fp32-50steps-b1
python scripts/benchmark.py "${COMMON[@]}" --methods original,dato --repeats 1 --precision autocast \
    --name cpu-bf16-50steps-b1
python scripts/bench/unet_calls.py --threads "$THREADS" --repeats 3 --compile default --out "$OUT/unet_calls.json"
