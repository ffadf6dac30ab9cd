"""The README's figure: methods (rows) on the same prompts and seeds (columns) on the shapes model, each image
marked with the judge's verdict.

    python -m shapesworld.grid --out docs/shapes/grid.png
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from sdgen import generate as gen
from sdgen.images import to_uint8_tensor
from sdgen.methods import parse_method
from sdgen.resources import SHAPES_CONFIG, SHAPES_WEIGHTS

from .evaluate import prompt_accuracy

METHODS: Tuple[Tuple[str, str], ...] = (("original", "Original (PLMS 50)"), ("deepcache-n3", "DeepCache N=3"),
                                        ("tome-0.5", "ToMeSD r=0.5"), ("dato", "DaTo b1"))
PROMPTS: Tuple[str, ...] = ("a red circle at the top left", "a blue square at the bottom right",
                            "a yellow triangle at the center", "a green circle at the right",
                            "a red triangle at the bottom left and a blue circle at the top right")
ZOOM = 2
LABEL_WIDTH = 150
HEADER = 34


def method_images(model, method: str, prompts: Sequence[str], seed: int, steps: int, scale: float) -> torch.Tensor:
    """Image j of `prompts` under `method` (a registry name), seed + j, PLMS: (N, 3, H, W) uint8."""
    geometry = gen.model_geometry(gen.read_config(SHAPES_CONFIG))
    shape = gen.latent_shape(geometry, geometry.default_size, geometry.default_size)
    cond = gen.encode_prompts(model, prompts, scale)
    x_T = gen.start_noise([seed + j for j in range(len(prompts))], shape)
    with parse_method(method).apply(model, steps, seed=seed) as applied:
        result = gen.sample_latents(model, cond, x_T, sampler="plms", steps=steps, scale=scale, seed=seed,
                                    method=applied)
    return to_uint8_tensor(gen.decode(model, result.latents))


def _wrap(text: str, width: int) -> List[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def compose(rows: Sequence[Tuple[str, torch.Tensor, Sequence[bool]]], prompts: Sequence[str]) -> Image.Image:
    """One row per (label, images (N, 3, H, W) uint8, judged right per image), prompts as column headers; a green
    (right) or red (wrong) bar under each image."""
    side = rows[0][1].shape[-1] * ZOOM
    cell = side + 8
    canvas = Image.new("RGB", (LABEL_WIDTH + cell * len(prompts), HEADER + (cell + 6) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        for i, line in enumerate(_wrap(prompt, 22)[:3]):
            draw.text((LABEL_WIDTH + j * cell, 2 + 10 * i), line, fill="black")
    for r, (label, images, right) in enumerate(rows):
        top = HEADER + r * (cell + 6)
        draw.text((4, top + side // 2 - 6), label, fill="black")
        for j, image in enumerate(images):
            tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + j * cell, top))
            color = (40, 160, 60) if right[j] else (200, 40, 40)
            draw.rectangle([LABEL_WIDTH + j * cell, top + side + 1, LABEL_WIDTH + j * cell + side - 1, top + side + 4],
                           fill=color)
    return canvas


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Methods on the same prompts and seeds, on the shapes model.")
    p.add_argument("--out", default="outputs/shapes-grid.png", help="PNG to write")
    p.add_argument("--ckpt", default=str(SHAPES_WEIGHTS), help="the shapes model's weights")
    p.add_argument("--seed", type=int, default=0, help="column j uses seed SEED + j")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=7.5)
    opt = p.parse_args(argv)
    model = gen.load_model(SHAPES_CONFIG, opt.ckpt, verbose=False)
    rows = []
    for name, label in METHODS:
        images = method_images(model, name, PROMPTS, opt.seed, opt.steps, opt.scale)
        verdicts = prompt_accuracy(images, PROMPTS)[1]
        rows.append((label, images, [v.correct for v in verdicts]))
        print(f"{label}: {sum(v.correct for v in verdicts)}/{len(PROMPTS)} right")
    out = Path(opt.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compose(rows, PROMPTS).save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
