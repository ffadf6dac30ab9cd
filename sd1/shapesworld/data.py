"""Batches of the shapes world for training and evaluation, each a pure function of (seed, index)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from .world import Scene, WorldConfig, caption, render, sample_scene


@dataclass(frozen=True)
class Batch:
    """images: (B, 3, S, S) float in [-1, 1]; one caption and one scene per image."""

    images: torch.Tensor
    captions: Tuple[str, ...]
    scenes: Tuple[Scene, ...]


def to_tensor(images: List[np.ndarray]) -> torch.Tensor:
    """uint8 images (H, W, 3) -> (B, 3, H, W) float in [-1, 1]."""
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def batch_scenes(seed: int, index: int, size: int, world: WorldConfig = WorldConfig()
                 ) -> Tuple[Tuple[Scene, ...], np.random.Generator]:
    """The scenes of batch `index` of the stream seeded by `seed`, and the generator that goes on to draw their
    images and captions."""
    rng = np.random.default_rng([seed, index])
    return tuple(sample_scene(rng, world) for _ in range(size)), rng


def scene_batch(seed: int, index: int, size: int, world: WorldConfig = WorldConfig()) -> Batch:
    """Batch `index` of the stream seeded by `seed`: the same (seed, index) always gives the same batch."""
    scenes, rng = batch_scenes(seed, index, size, world)
    images = [render(s, rng, world.image_size) for s in scenes]
    captions = [caption(s, rng) for s in scenes]
    return Batch(to_tensor(images), tuple(captions), tuple(scenes))
