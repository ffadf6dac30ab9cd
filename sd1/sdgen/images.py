"""Writing generated images: uint8 conversion, grids, PNG files that never replace anything, output checks."""
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .runtime import UsageError


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """Decoded images x: (B, 3, H, W) in [-1, 1] -> (B, 3, H, W) uint8 on the CPU (the pixels a PNG holds)."""
    x = torch.clamp((x.float().cpu() + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * x).round().to(torch.uint8)


def to_uint8_images(x: torch.Tensor) -> List[np.ndarray]:
    """Decoded images x: (B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8 arrays."""
    return list(to_uint8_tensor(x).permute(0, 2, 3, 1).numpy())


def make_grid(images: List[np.ndarray], n_rows: int) -> np.ndarray:
    """Tile (H, W, 3) uint8 arrays into a grid with `n_rows` images per row (2 px black padding)."""
    n_rows = max(1, min(n_rows, len(images)))
    h, w, c = images[0].shape
    n_lines = (len(images) + n_rows - 1) // n_rows
    pad = 2
    grid = np.zeros((n_lines * (h + pad) + pad, n_rows * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, n_rows)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def _png_info(text: Optional[Dict[str, object]]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    return info


def save_png(array: np.ndarray, path, text: Optional[Dict[str, object]] = None) -> None:
    """Write a PNG without ever replacing an existing file; `text` goes into PNG text chunks."""
    with open(path, "xb") as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=_png_info(text))


def temp_path(final: Path) -> Path:
    """The file a PNG is written to before it is renamed into place (not a .png: image lists skip it)."""
    return final.with_name(f".{final.name}.tmp")


def atomic_save_png(array: np.ndarray, final: Path, text: Optional[Dict[str, object]] = None) -> None:
    """Write (H, W, 3) uint8 `array` to `final` through a temp file and a rename, so an interrupted write
    never leaves a truncated PNG under the final name."""
    tmp = temp_path(final)
    with open(tmp, "wb") as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=_png_info(text))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Yield a temp path next to `path`; when the block ends normally it replaces `path` in one rename, when
    it raises (an error, Ctrl-C) the temp file is removed. Either way `path` is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the text file `path` in one rename (never a half-written file)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def next_free_index(folder, pattern: str) -> int:
    """One past the largest number in file names of `folder` matching `pattern` (a regex with one group)."""
    regex = re.compile(pattern)
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := regex.fullmatch(name))]
    return max(numbers) + 1 if numbers else 0


def check_output_dir(path, flag: str = "--outdir") -> None:
    """Raise UsageError unless `path` is, or can be created as, a writable folder. Creates nothing."""
    target = Path(path)
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"is under {existing}, which is a file"
        raise UsageError(f"{flag} {path} {what}, not a folder; give a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({err.strerror or err})") from None


def check_output_file(path, flag: str) -> None:
    """Raise UsageError unless the file `path` can be written (its folder exists or can be made, and the path
    is not a folder). Creates nothing."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    check_output_dir(target.parent if str(target.parent) else ".", flag=f"{flag} folder")


class SampleWriter:
    """Writes numbered samples to outdir/samples and one grid per run to outdir, after what is there.

    Nothing existing is ever replaced: numbering continues from the largest number found.
    """

    def __init__(self, outdir, png_text: Dict[str, object], skip_save: bool = False, skip_grid: bool = False):
        self.outdir = outdir
        self.sample_path = os.path.join(outdir, "samples")
        os.makedirs(self.sample_path, exist_ok=True)
        self.base_count = next_free_index(self.sample_path, r"(\d+)\.png")
        self.grid_count = next_free_index(outdir, r"grid-(\d+)\.png")
        self.png_text = png_text
        self.skip_save = skip_save
        self.skip_grid = skip_grid
        self.images: List[np.ndarray] = []
        self.sampling_seconds = 0.0

    def add(self, images: List[np.ndarray], sampling_seconds: float = 0.0) -> None:
        """images: list of (H, W, 3) uint8 arrays of one batch; sampling_seconds: its sampler time."""
        if not self.skip_save:
            for image in images:
                save_png(image, os.path.join(self.sample_path, f"{self.base_count:05}.png"), self.png_text)
                self.base_count += 1
        self.images.extend(images)
        self.sampling_seconds += sampling_seconds

    def finish(self, n_rows: int) -> None:
        """Write the grid and print the timing summary."""
        if not self.skip_grid and self.images:
            grid = make_grid(self.images, n_rows)
            save_png(grid, os.path.join(self.outdir, f"grid-{self.grid_count:04}.png"), self.png_text)
        count = len(self.images)
        print(f"sampling time: {self.sampling_seconds:.2f} s for {count} images "
              f"({self.sampling_seconds / max(1, count):.2f} s per image)")
        print(f"Your samples are ready and waiting for you here: \n{self.outdir} \nEnjoy.")


def load_init_image(path, multiple: int = 64, flag: str = "init image") -> torch.Tensor:
    """Image file -> (1, 3, H, W) in [-1, 1], sides cut down to multiples of `multiple` (Lanczos resize), as
    CompVis img2img does. Unreadable or too small files raise UsageError naming `flag`."""
    if not path:
        raise UsageError(f"{flag} is required: the path of the image to transform")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"{flag} {path} does not exist; give the path of the image to transform") from None
    except Exception as err:
        raise UsageError(f"{flag} {path} is not a readable image ({err})") from None
    w, h = image.size
    w, h = w - w % multiple, h - h % multiple
    if w == 0 or h == 0:
        raise UsageError(f"{flag} {path} is {image.size[0]}x{image.size[1]}: both sides must be at least {multiple}")
    image = image.resize((w, h), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array[None].transpose(0, 3, 1, 2).copy()) - 1.0
