"""Stand-ins for the real data and weights of the table scripts' --smoke runs (seeded, tiny, offline).

    python scripts/tables/smoke_assets.py --out DIR

DIR/ref/            8 random 64x64 PNGs: the FID reference set
DIR/init/           4 random 64x64 PNGs: img2img init images
DIR/init-prompts.txt  one prompt per init image
DIR/tiny-clip.json  a tiny open_clip architecture, DIR/tiny-clip.pt its random weights (the CLIP score)
None of it is meaningful data: it only lets every step of a table script run in seconds on a CPU.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
INIT_PROMPTS = ["a watercolor painting of a harbour", "a pencil sketch of a cat", "a city street at night",
                "a bowl of oranges on a table"]


def noise_images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        smooth = rng.random((8, 8, 3))  # blocky random colours, upsampled: not pure per-pixel noise
        image = (255 * np.kron(smooth, np.ones((8, 8, 1)))).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{k:06d}.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    noise_images(args.out / "ref", 8, seed=1)
    noise_images(args.out / "init", len(INIT_PROMPTS), seed=2)
    (args.out / "init-prompts.txt").write_text("".join(t + "\n" for t in INIT_PROMPTS), encoding="utf-8")

    import open_clip
    import torch

    config = args.out / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP), encoding="utf-8")
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    torch.save(model.state_dict(), args.out / "tiny-clip.pt")
    print(f"smoke assets in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
