"""Write the DaTo strategy YAML a table row needs, derived from a base strategy.

    # b1's cache depths with every prune ratio set to 0.5 (Table 3 rows)
    python scripts/tables/make_strategy.py --base configs/dato/b1.yaml --ratio 0.5 --out r0.5.yaml
    # the last 37 steps of b1: the steps an img2img run at strength 0.75 visits (Table 5)
    python scripts/tables/make_strategy.py --base configs/dato/b1.yaml --last 37 --out b1-last37.yaml
    # a small made-up strategy for the --smoke runs (demo model, few steps)
    python scripts/tables/make_strategy.py --base smoke --steps 5 --out smoke5.yaml

The file is validated by datosd's Strategy before it is written.
"""
import argparse
import sys
from pathlib import Path

try:
    import datosd  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sd1"))

from datosd.strategy import MAX_DEPTH, Strategy, StrategyError


def smoke_strategy(steps):
    """Full, shallow, reuse, ... (the three depth kinds of the search space) with ratios 0.3..0.7."""
    depths = [MAX_DEPTH if i % 3 == 0 else (1 if i % 3 == 1 else 0) for i in range(steps)]
    ratios = [(0.3, 0.5, 0.7)[i % 3] for i in range(steps)]
    return Strategy(depths, ratios, name=f"smoke{steps}", meta={"source": "made up for --smoke runs"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a strategy YAML, or 'smoke' (needs --steps)")
    p.add_argument("--steps", type=int, help="step count of the 'smoke' base")
    p.add_argument("--ratio", type=float, help="set every prune ratio to this value")
    p.add_argument("--last", type=int, help="keep only the last N steps (an img2img run of N steps)")
    p.add_argument("--name", help="name stored in the file (default: derived)")
    p.add_argument("--out", required=True, type=Path, help="YAML file to write")
    args = p.parse_args(argv)
    try:
        if args.base == "smoke":
            if not args.steps or args.steps < 1:
                raise StrategyError("--base smoke needs --steps N (N >= 1)")
            strategy = smoke_strategy(args.steps)
        else:
            if not Path(args.base).is_file():
                raise StrategyError(f"base strategy not found: {args.base}")
            strategy = Strategy.load(args.base)
        depths, ratios = list(strategy.cache_depth), list(strategy.prune_ratio)
        name = strategy.name or "strategy"
        if args.last is not None:
            if not 1 <= args.last <= len(depths):
                raise StrategyError(f"--last {args.last}: the base has {len(depths)} steps")
            depths, ratios = depths[-args.last:], ratios[-args.last:]
            name += f"-last{args.last}"
        if args.ratio is not None:
            ratios = [args.ratio] * len(depths)
            name += f"-r{args.ratio:g}"
        meta = dict(strategy.meta, derived_from=str(args.base))
        out = Strategy(depths, ratios, name=args.name or name, meta=meta)
    except StrategyError as err:
        print(f"make_strategy.py: {err}", file=sys.stderr)
        return 2
    out.save(args.out)
    print(f"{args.out}: {out.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
