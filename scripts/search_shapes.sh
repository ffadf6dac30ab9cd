#!/usr/bin/env bash
# Is there a DaTo strategy at >= 9x predicted speed-up whose prompt accuracy is within 2 points of the original's?
# The shapes model (64x64, PLMS 50 steps), the shapes world's judge as the quality (issue 21 item 7); design,
# timing and the reasoning behind the sizes: docs/shapes-search.md.
#
#   1. search (about 40 minutes on 2 CPU cores): NSGA-II over per-step cache depths {0, 1, 12}, population 20,
#      12 generations, 108 images per candidate (every one-object prompt once, seeds 42..149), a constraint of
#      >= 9x cost-table speed-up, seeded with "every N-th step full" strategies up to N = 16; 2 Dask workers.
#   2. validation (about 10 minutes): the original and the TOP feasible front points with the best search
#      accuracy, on 108 x REPEATS fresh images (seeds from 100000; none seen by the search), judged image by
#      image; the paired accuracy difference to the original with its standard error.
#   3. docs/shapes-search/: the front plot and results.md.
#
# Usage: scripts/search_shapes.sh [RUN_DIR] [CKPT]   (defaults outputs/search-shapes, the shipped shapes model)
# Rerunning resumes every step (the search from evals.sqlite, the images from their PNGs). The sizes can be set
# from the environment (STEPS, N_PROMPTS, BATCH, POP, GENS, MIN_SPEEDUP, WORKERS, REPEATS, TOP, LIMIT, DOCS)
# for a smoke test on a stand-in checkpoint; the defaults are the design.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${1:-outputs/search-shapes}
CKPT=${2:-models/shapes/shapes-demo.safetensors}
STEPS=${STEPS:-50} N_PROMPTS=${N_PROMPTS:-108} BATCH=${BATCH:-12} POP=${POP:-20} GENS=${GENS:-12}
MIN_SPEEDUP=${MIN_SPEEDUP:-9} WORKERS=${WORKERS:-2} REPEATS=${REPEATS:-5} TOP=${TOP:-4} LIMIT=${LIMIT:-}
DOCS=${DOCS:-docs/shapes-search}
CONFIG=configs/stable-diffusion/shapes-demo.yaml
VALIDATION_SEED=100000
MODEL=(--config "$CONFIG" --ckpt "$CKPT" --H 64 --W 64 --precision full)

# 1. The search.
python scripts/search_depth.py "${MODEL[@]}" --steps "$STEPS" --sampler plms --quality accuracy \
    --n-prompts "$N_PROMPTS" --batch-size "$BATCH" --pop "$POP" --gens "$GENS" --min-speedup "$MIN_SPEEDUP" \
    --seed-intervals 2,3,4,5,8,12,16 --workers "$WORKERS" --threads 1 --run-dir "$RUN/search"

# 2. Validation: the strategies (the full model and the TOP feasible front points), the prompts, the images.
VAL=$RUN/validate
mkdir -p "$VAL/strategies"
python - "$RUN/search/front.json" "$VAL" "$TOP" <<'EOF'
import json, sys
from pathlib import Path
from datosd import Strategy
from shapesworld.evaluate import one_object_prompts

report, out, top = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), int(sys.argv[3])
if not report["constraint"]["feasible_points"]:
    sys.exit(f"no strategy at >= {report['constraint']['min_speedup']:g}x was found: nothing to validate")
(out / "prompts.txt").write_text("\n".join(one_object_prompts()) + "\n")
for i, point in enumerate(sorted(report["front"], key=lambda p: p["quality"])[:top]):
    Strategy(point["cache_depth"], point["prune_ratio"], name=f"front-{i}",
             meta={"source": f"{sys.argv[1]} (front point {point['key'][:12]})"}).save(out / "strategies" / f"front-{i}.yaml")
EOF
SAMPLE=(--from-file "$VAL/prompts.txt" --repeats "$REPEATS" --seed "$VALIDATION_SEED" --plms --ddim_steps "$STEPS"
        --batch_size "$BATCH" --f 4 --no_progress "${MODEL[@]}" ${LIMIT:+--limit "$LIMIT"})  # f: the VAE of the shapes model
sample() {  # OUTDIR [method flags]: one process per core, OMP threads 1 each (torchrun's default)
    local out=$1; shift
    if [ "$WORKERS" -gt 1 ]; then
        torchrun --standalone --nproc_per_node "$WORKERS" scripts/sample_prompts.py "${SAMPLE[@]}" --outdir "$out" "$@"
    else
        python scripts/sample_prompts.py "${SAMPLE[@]}" --outdir "$out" "$@"
    fi
}
sample "$VAL/images/original"
for yaml in "$VAL"/strategies/front-*.yaml; do
    sample "$VAL/images/$(basename "$yaml" .yaml)" --dato --strategy "$yaml"
done

# 3. The judge, image by image; results.md and the front plot into the docs.
python - "$RUN" "$DOCS" "$MIN_SPEEDUP" <<'EOF'
import json, math, sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from datosd import Strategy
from shapesworld.evaluate import prompt_accuracy

run, docs, bound = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
val = run / "validate"
prompts = (val / "prompts.txt").read_text().splitlines()
report = json.loads((run / "search" / "front.json").read_text())
searched = json.loads((run / "search" / "search.json").read_text())["sampling"]


def verdicts(folder):
    """Per image (k: prompt k mod 108, seed 100000 + k): whether the judge finds exactly what was asked."""
    files = sorted(folder.glob("[0-9]*.png"))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    scores, found = prompt_accuracy(images.permute(0, 3, 1, 2).contiguous(), [prompts[int(f.stem) % len(prompts)]
                                                                              for f in files])
    return np.array([v.correct for v in found]), scores


original, original_scores = verdicts(val / "images" / "original")
n = len(original)
by_summary = {json.dumps(p["cache_depth"]): p for p in report["front"]}
rows, results = [], []
for yaml in sorted((val / "strategies").glob("front-*.yaml")):
    strategy = Strategy.load(yaml)
    point = by_summary[json.dumps(list(strategy.cache_depth))]
    right, scores = verdicts(val / "images" / yaml.stem)
    assert len(right) == n, f"{yaml.stem}: {len(right)} images, the original {n}"
    lost, gained = int(np.sum(original & ~right)), int(np.sum(~original & right))
    drop = 100.0 * (lost - gained) / n  # paired: the same prompts and seeds
    se = 100.0 * math.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
    results.append({"strategy": yaml.stem, "speedup": point["speedup"], "search_accuracy": 100 - point["quality"],
                    "accuracy": scores["prompt"], "drop": drop, "se": se, "lost": lost, "gained": gained,
                    "within_2_points": drop <= 2.0, "scores": scores, "cache_depth": list(strategy.cache_depth)})
    rows.append(f"| {yaml.stem} | {point['speedup']:.2f}x | {100 - point['quality']:.1f} | {scores['prompt']:.1f} | "
                f"{drop:+.1f} +- {se:.1f} | {lost} / {gained} | {'yes' if drop <= 2.0 else 'no'} |")
full = report["full_model"]
search_full = 100 - full["quality"] if full else float("nan")
lines = [f"# Shapes search: >= {bound:g}x at prompt accuracy within 2 points of the original?", "",
         f"Search: {report['evaluations']['points']} strategies evaluated over {report['generation']} generations "
         f"on {len(searched['prompts'])} images; {report['constraint']['feasible_points']} at >= {bound:g}x (cost "
         f"table). Validation: {n} fresh images (image k: prompt k mod 108, seed 100000 + k), judged image by "
         f"image.", "",
         f"Original ({searched['sampler'].upper()} {searched['steps']} steps): search accuracy {search_full:.1f}, "
         f"validation accuracy "
         f"{original_scores['prompt']:.1f} (color {original_scores['color']:.1f}, shape {original_scores['shape']:.1f}, "
         f"position {original_scores['position']:.1f}, count {original_scores['count']:.1f}).", "",
         "| strategy | speed-up | search acc. | validation acc. | drop (points, +- SE) | images lost / gained | "
         "within 2 |", "|---|---|---|---|---|---|---|", *rows, "",
         "Drop = original minus strategy on the same images; SE = the paired (McNemar) standard error, "
         "100 sqrt(lost + gained - (lost - gained)^2 / n) / n.", "", "![front](front.png)", ""]
docs.mkdir(parents=True, exist_ok=True)
(docs / "results.md").write_text("\n".join(lines))
(docs / "front.png").write_bytes((run / "search" / "front.png").read_bytes())
(val / "results.json").write_text(json.dumps({"n_images": n, "original": original_scores, "strategies": results},
                                             indent=1))
print("\n".join(lines))
EOF
