"""Build a COCO caption prompt set: n distinct images, one caption each, fixed seed.

    python scripts/make_coco_prompts.py --captions annotations/captions_val2014.json \
        --n 30000 --seed 0 --out data/coco-custom.txt

The selection rule is documented in `sdeval.prompts.build_coco_prompts`. This builds a
set of our own; the paper's `data/coco30k-prompts.txt` came from the DaTo authors and
was sampled by a rule they did not document, so this script does not reproduce it.
The COCO captions are CC BY 4.0 (COCO Consortium): keep that attribution with the output.
"""
import argparse
import sys
from pathlib import Path

from .prompts import build_coco_prompts, write_prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, type=Path,
                   help="COCO captions annotation file, e.g. captions_val2014.json")
    p.add_argument("--n", type=int, default=30000, help="number of prompts = distinct images (default 30000)")
    p.add_argument("--seed", type=int, default=0, help="seed of numpy.random.default_rng (default 0)")
    p.add_argument("--out", required=True, type=Path, help="output text file, one caption per line")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.captions.is_file():
        raise SystemExit(f"error: captions file not found: {args.captions} "
                         "(the COCO 2014 captions annotations, e.g. annotations/captions_val2014.json)")
    if args.out.exists() and not args.force:
        raise SystemExit(f"error: {args.out} already exists; pass --force to overwrite it")
    if not args.out.parent.is_dir():
        raise SystemExit(f"error: output folder does not exist: {args.out.parent}")
    try:
        prompts = build_coco_prompts(args.captions, args.n, args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    write_prompts(args.out, prompts, force=args.force)
    print(f"wrote {len(prompts)} captions of {len(prompts)} distinct images to {args.out} (seed {args.seed})")
    return 0


def cli() -> int:
    from sdgen.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
