"""Image folders: listing, index-from-file-name, loading, and the Inception resize rule."""
import re
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PathLike = Union[str, Path]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
INCEPTION_SIZE = 299
# The rule, as pytorch-fid applies it inside InceptionV3(resize_input=True): RGB, uint8 / 255,
# then torch bilinear interpolation to 299x299 (align_corners=False, no antialias); aspect
# ratio is not kept. We apply it per image, so folders of mixed sizes work at any batch size.
RESIZE_RULE = "RGB uint8/255 -> torch bilinear to 299x299 (align_corners=False, no antialias), as pytorch-fid"

_TRAILING_DIGITS = re.compile(r"(\d+)$")


def image_index(path: PathLike):
    """The integer at the end of the file name's stem (`00042.png` -> 42, `img_7.jpg` -> 7), or None."""
    m = _TRAILING_DIGITS.search(Path(path).stem)
    return int(m.group(1)) if m else None


def _sort_key(path: Path):
    idx = image_index(path)
    return (idx is None, idx if idx is not None else 0, path.name)


def list_images(folder: PathLike) -> list:
    """The PNG/JPEG files directly in `folder` (not recursive), ordered by file index, then name.

    Raises:
        FileNotFoundError: `folder` is not a directory.
        ValueError: it holds no PNG/JPEG image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return sorted(files, key=_sort_key)


def load_rgb(path: PathLike) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def unreadable_images(paths, limit: int = 3) -> list:
    """'file: reason' for the first `limit` files that are not complete, readable images (checked in this
    process, before any worker or model starts: a PNG's chunk checksums, a JPEG's header)."""
    problems = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
            problems.append(f"{path}: {err or type(err).__name__}")
            if len(problems) >= limit:
                break
    return problems


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 tensor of its RGB pixels."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def to_inception_batch(x: torch.Tensor) -> torch.Tensor:
    """Images x: (B, 3, H, W) uint8 -> (B, 3, 299, 299) float32 in [0, 1], by `RESIZE_RULE` (per image)."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    x = x.float() / 255.0
    return F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)


def to_inception_input(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, 299, 299) float32 in [0, 1], by `RESIZE_RULE`."""
    return to_inception_batch(pil_to_uint8(img)[None])[0]


class InceptionImages(torch.utils.data.Dataset):
    """Image files -> (3, 299, 299) tensors in [0, 1]."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return to_inception_input(load_rgb(self.paths[i]))
