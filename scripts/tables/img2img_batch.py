"""Run scripts/img2img.py over a folder of init images (one prompt each), loading the model once (Table 5).

    python scripts/tables/img2img_batch.py --init-dir coco-val-images/ --prompts captions.txt \
        --outdir OUT/table5/dato/images -- --ckpt sd-v1-5.safetensors --strength 0.75 --dato --strategy s.yaml

Init image i (the i-th file of --init-dir in index-then-name order, as sdeval lists them) is transformed with
prompt line i + 1 and seed --seed + i, by img2img.py's own main() (so every img2img flag after `--` means
what it means there), and saved as OUTDIR/{i:06d}.png. Existing outputs are skipped (resumable). The model is
loaded once (main() takes the model loader) and reused: main() removes its acceleration patch when done.

OUTDIR/manifest.json records the method, the count and the sampling time per image that img2img.py
reports (its DDIM loop), the first image of each run left out as warm-up.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
try:
    import sdeval  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "sd1"))

from sdeval.images import list_images  # noqa: E402
from sdeval.prompts import read_prompts  # noqa: E402

IMG2IMG = REPO_ROOT / "scripts" / "img2img.py"
OWN_FLAGS = ("--init-img", "--prompt", "--from-file", "--outdir", "--seed", "--n_samples", "--n_iter")
TIME_LINE = re.compile(r"sampling time: ([0-9.]+) s for (\d+) images")
METHOD_LINE = re.compile(r"^method: (.*)$", re.M)


def load_img2img():
    spec = importlib.util.spec_from_file_location("img2img_script", IMG2IMG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-dir", required=True, type=Path, help="folder of init images")
    p.add_argument("--prompts", required=True, type=Path, help="one prompt per init image, in the same order")
    p.add_argument("--outdir", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0, help="init image i uses seed SEED + i")
    p.add_argument("--limit", type=int, help="only the first LIMIT init images")
    p.add_argument("img2img_args", nargs=argparse.REMAINDER, help="-- then flags for scripts/img2img.py")
    args = p.parse_args(argv)
    extra = args.img2img_args[1:] if args.img2img_args[:1] == ["--"] else args.img2img_args

    # everything checked before any model is built
    problems = []
    clash = [f for f in extra if f.split("=")[0] in OWN_FLAGS]
    if clash:
        problems.append(f"{', '.join(clash)}: set by this script (use --init-dir, --prompts, --outdir, --seed)")
    try:
        images = list_images(args.init_dir)
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"--init-dir: {err}")
        images = []
    try:
        prompts = read_prompts(args.prompts)
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"--prompts: {err}")
        prompts = []
    if args.limit is not None:
        if args.limit < 1:
            problems.append(f"--limit must be at least 1, got {args.limit}")
        images = images[:args.limit]
    if images and prompts and len(prompts) < len(images):
        problems.append(f"{len(images)} init images but only {len(prompts)} prompts in {args.prompts}")
    if problems:
        print("img2img_batch.py: nothing done, fix these first:\n- " + "\n- ".join(problems), file=sys.stderr)
        return 2

    settings = {"init_dir": str(args.init_dir.resolve()), "prompts": str(args.prompts.resolve()),
                "prompts_sha256": hashlib.sha256(args.prompts.read_bytes()).hexdigest(),
                "seed": args.seed, "img2img_args": extra}
    path = args.outdir / "manifest.json"
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if previous and previous.get("settings") != settings:
        print(f"img2img_batch.py: {args.outdir} holds images made with other settings (see {path}); "
              "use another --outdir or delete it", file=sys.stderr)
        return 2

    module = load_img2img()
    loaded = {}

    def load_once(*args, **kwargs):
        """img2img.py's model loader, called once: every image reuses the first image's model."""
        if "model" not in loaded:
            loaded["model"] = module.load_model(*args, **kwargs)
        return loaded["model"]

    args.outdir.mkdir(parents=True, exist_ok=True)
    work = args.outdir / ".work"
    calls, method = [], None
    for i, init in enumerate(images):
        final = args.outdir / f"{i:06d}.png"
        if final.is_file():
            continue
        shutil.rmtree(work, ignore_errors=True)
        flags = [*extra, "--init-img", str(init), "--prompt", prompts[i], "--seed", str(args.seed + i),
                 "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", str(work)]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = module.main(flags, model_loader=load_once)
        if code != 0:
            print(out.getvalue() + err.getvalue(), file=sys.stderr)
            print(f"img2img_batch.py: img2img.py failed on {init} (exit {code})", file=sys.stderr)
            return code
        produced = sorted((work / "samples").glob("*.png"))
        if len(produced) != 1:
            print(f"img2img_batch.py: expected one image from img2img.py, found {len(produced)}", file=sys.stderr)
            return 1
        os.replace(produced[0], final)
        timing = TIME_LINE.search(out.getvalue())
        if timing:
            calls.append((float(timing.group(1)), int(timing.group(2))))
        found = METHOD_LINE.search(out.getvalue())
        method = found.group(1) if found else method
        print(f"{final.name} <- {init.name}: {prompts[i][:60]}")
    shutil.rmtree(work, ignore_errors=True)

    timed = calls[1:] if len(calls) > 1 else calls  # the first call of a run is the warm-up
    runs = list(previous.get("runs", []))
    runs.append({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "generated": len(calls),
                 "timed_seconds": sum(s for s, _ in timed), "timed_images": sum(n for _, n in timed)})
    seconds = sum(r["timed_seconds"] for r in runs)
    count_timed = sum(r["timed_images"] for r in runs)
    present = sum((args.outdir / f"{i:06d}.png").is_file() for i in range(len(images)))
    manifest = {
        "script": "scripts/tables/img2img_batch.py (scripts/img2img.py per init image)",
        "method": method or previous.get("method"),
        "settings": settings,
        "total": len(images), "count": present, "complete": present == len(images),
        "seconds_per_image": seconds / count_timed if count_timed else None,
        "timing": {"what": "img2img.py's reported sampling time (stochastic encode + DDIM decode loop) per image",
                   "timed_images": count_timed, "seconds": seconds},
        "runs": runs,
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"{present} of {len(images)} images in {args.outdir}; method: {manifest['method']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
