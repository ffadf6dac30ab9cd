"""Stand-ins for the real data and weights of a --smoke table run (seeded, tiny, offline, meaningless).

SMOKE_DIR/ref/              8 random 64x64 PNGs: the FID reference set
SMOKE_DIR/init/             4 random 64x64 PNGs: img2img init images
SMOKE_DIR/init-prompts.txt  one prompt per init image
SMOKE_DIR/tiny-clip.json    a tiny open_clip architecture, tiny-clip.pt its seeded random weights
Files that exist are kept; each is written through a temp file and a rename, so processes may race.
"""
import json
import logging
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from sdgen.images import atomic_save_png, atomic_write_text

REF_DIR = "ref"
INIT_DIR = "init"
INIT_PROMPTS_FILE = "init-prompts.txt"
CLIP_CONFIG = "tiny-clip.json"
CLIP_WEIGHTS = "tiny-clip.pt"
REF_COUNT = 8
INIT_PROMPTS = ("a watercolor painting of a harbour", "a pencil sketch of a cat", "a city street at night",
                "a bowl of oranges on a table")
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def init_image_paths(smoke_dir: Path) -> Tuple[Path, ...]:
    return tuple(Path(smoke_dir) / INIT_DIR / f"{k:06d}.png" for k in range(len(INIT_PROMPTS)))


def _noise_images(folder: Path, count: int, seed: int) -> None:
    """Blocky random colours (8x8 cells upsampled to 64x64), image k from generator `seed`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        image = (255 * np.kron(rng.random((8, 8, 3)), np.ones((8, 8, 1)))).astype(np.uint8)
        path = folder / f"{k:06d}.png"
        if not path.is_file():
            atomic_save_png(image, path)


def _tiny_clip(smoke_dir: Path) -> None:
    import open_clip

    config = smoke_dir / CLIP_CONFIG
    if not config.is_file():
        atomic_write_text(config, json.dumps(TINY_CLIP))
    weights = smoke_dir / CLIP_WEIGHTS
    if weights.is_file():
        return
    open_clip.add_model_config(config)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that the model is random: that is the point here
    try:
        with torch.random.fork_rng(devices=[]):  # open_clip's own init, seeded; the global RNG is left as it was
            torch.manual_seed(0)
            model = open_clip.create_model(config.stem, pretrained=None)
    finally:
        root.setLevel(level)
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)


def ensure_smoke_assets(smoke_dir) -> Path:
    """Make the missing smoke assets in `smoke_dir`; returns it."""
    smoke_dir = Path(smoke_dir)
    smoke_dir.mkdir(parents=True, exist_ok=True)
    _noise_images(smoke_dir / REF_DIR, REF_COUNT, seed=1)
    _noise_images(smoke_dir / INIT_DIR, len(INIT_PROMPTS), seed=2)
    prompts = smoke_dir / INIT_PROMPTS_FILE
    if not prompts.is_file():
        atomic_write_text(prompts, "".join(p + "\n" for p in INIT_PROMPTS))
    _tiny_clip(smoke_dir)
    return smoke_dir
