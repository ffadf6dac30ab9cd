"""Quality on the shapes world: the judge's prompt accuracy of generated images, the fixed prompt sets it is
measured on, and the generator's own images of those prompts (the FID reference).

    images = to_uint8_tensor(decode(model, latents))               # (N, 3, 64, 64) uint8
    scores, verdicts = prompt_accuracy(images, prompts)            # {"prompt": 87.0, "color": ..., ...}
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .judge import Verdict, accuracy, judge
from .world import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, Scene, ShapeObject, WorldConfig, canonical_caption, \
    parse_caption, render, sample_scene


def one_object_prompts() -> List[str]:
    """Every one-object canonical prompt, 'a <color> <shape> at the <position>': 4 x 3 x 9 = 108, in a fixed
    order (color, then shape, then position)."""
    return [canonical_caption(Scene((ShapeObject(c, s, p),)))
            for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS)]


def two_object_prompts(count: int, seed: int = 0) -> List[str]:
    """`count` canonical two-object prompts ('a red circle at the top left and a blue square at the right'),
    drawn with `seed`."""
    rng = np.random.default_rng([seed, 2])
    world = WorldConfig(two_objects=1.0)
    return [canonical_caption(sample_scene(rng, world)) for _ in range(count)]


def prompt_accuracy(images: torch.Tensor, prompts: Sequence[str]) -> Tuple[Dict[str, float], List[Verdict]]:
    """The judge on images (N, 3, H, W) uint8, image i asked for prompts[i]: (percentages as `judge.accuracy`,
    the verdicts). ValueError for a prompt the world cannot read."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    verdicts = [judge(image, parse_caption(prompt)) for image, prompt in zip(pixels, prompts)]
    return accuracy(verdicts), verdicts


def reference_images(prompts: Sequence[str], seed: int = 0, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """The generator's images of `prompts` (backgrounds, positions and colors jittered with `seed`; one image per
    prompt, backgrounds cycling white, gray, black): (N, 3, S, S) uint8, the FID reference of the shapes tables."""
    rng = np.random.default_rng([seed, 3])
    backgrounds = ("white", "gray", "black")
    images = [render(Scene(parse_caption(p).objects, backgrounds[i % 3]), rng, image_size)
              for i, p in enumerate(prompts)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
