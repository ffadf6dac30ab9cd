"""Prompt-token pruning and T-GATE on the tiny golden model: kept tokens over the steps and fidelity.

The golden tiny model (tests/data: the SD 1.x architecture at toy size, every weight redrawn from seed 1234,
the same as `build_demo_model(seed=1234)`) has random weights, so its cross-attention maps carry no meaning:
the kept-token counts show the mechanics (warm-up, per-half sets, static vs dynamic), not what SD 1.5 keeps.
Fidelity is the relative error of the final latent against the unpatched run, same seed and prompt.

    python scripts/bench/text_pruning_tiny.py --out outputs/bench/text_pruning_tiny.json
"""
import argparse

import torch

from datosd import apply_text_pruning, apply_tgate, remove_text_pruning, remove_tgate
from ldm.models.diffusion.ddim import DDIMSampler

from ..fidelity import relative_rms_error
from ..generate import build_demo_model
from . import run, write_result

GOLDEN_SEED = 1234  # tests/golden_weights.py REDRAW_SEED
PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a red fox sitting in a snowy forest at sunrise, highly detailed oil painting",
    "a cup of coffee",
]


def methods(threshold, gate):
    """name -> (apply, remove) of every patched run."""
    out = {}
    for keep in (20, 10):
        out[f"textprune keep {keep}"] = (lambda m, k=keep: apply_text_pruning(m, keep=k), remove_text_pruning)
    for mode in ("static", "dynamic"):
        out[f"textprune threshold {threshold:g} {mode}"] = (
            lambda m, md=mode: apply_text_pruning(m, threshold=threshold, mode=md), remove_text_pruning)
    for cache in ("cfg_mean", "per_half"):
        out[f"tgate {gate} {cache}"] = (lambda m, c=cache: apply_tgate(m, gate_step=gate, cache=c), remove_tgate)
    return out


def sample(model, prompt, steps, size, scale, seed):
    with torch.no_grad():
        c = model.get_learned_conditioning([prompt])
        uc = model.get_learned_conditioning([""])
    x_T = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(seed))
    samples, _ = DDIMSampler(model).sample(
        S=steps, conditioning=c, batch_size=1, shape=[4, size, size], unconditional_guidance_scale=scale,
        unconditional_conditioning=uc, x_T=x_T, verbose=False, disable_progress=True)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=1 / 77, help="text pruning threshold (1/77: uniform)")
    parser.add_argument("--gate", type=int, default=8, help="T-GATE gate step")
    parser.add_argument("--out", default="outputs/bench/text_pruning_tiny.json")
    opt = parser.parse_args(argv)
    model = build_demo_model(seed=GOLDEN_SEED)
    tokenizer = model.cond_stage_model.tokenizer
    result = {"steps": opt.steps, "size": opt.size, "scale": opt.scale, "seed": opt.seed, "prompts": {}}
    for prompt in PROMPTS:
        words = len(tokenizer.encode(prompt))
        reference = sample(model, prompt, opt.steps, opt.size, opt.scale, opt.seed)
        rows = {}
        print(f"\n{prompt!r} ({words} tokens + BOS + EOS; rows: [uncond, cond])")
        for name, (apply, remove) in methods(opt.threshold, opt.gate).items():
            state = apply(model)
            try:
                out = sample(model, prompt, opt.steps, opt.size, opt.scale, opt.seed)
            finally:
                remove(model)
            error = relative_rms_error(out, reference)
            row = {"latent_rel_error": error}
            summary = ""
            if hasattr(state, "kept_counts"):
                row["kept_counts"] = state.kept_counts()
                counts = [c for _, c in row["kept_counts"]]
                summary = " kept per step: " + " ".join("all" if c is None else "/".join(map(str, c))
                                                        for c in counts)
            rows[name] = row
            print(f"  {name:36s} latent rel. error {error:.4f}{summary}")
        result["prompts"][prompt] = {"tokens": words, "methods": rows}
    write_result(opt.out, result)


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    cli()
