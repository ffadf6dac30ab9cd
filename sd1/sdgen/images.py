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


def save_numbered_png(array: np.ndarray, folder, name_format: str, number: int,
                      text: Optional[Dict[str, object]] = None) -> int:
    """Write a PNG under the first free number >= `number` (`name_format`, e.g. '{:05}.png') and return that
    number. Each name is claimed by an exclusive create, so runs writing into one folder at once take
    different numbers instead of failing or replacing each other's files."""
    while True:
        try:
            save_png(array, os.path.join(folder, name_format.format(number)), text)
            return number
        except FileExistsError:
            number += 1


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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def is_complete_png(path) -> bool:
    """Whether the file `path` is a whole PNG: the signature first and the IEND chunk last (a 0-byte, truncated
    or foreign file is not). Reads 20 bytes."""
    try:
        with open(path, "rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return False
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


@contextmanager
def made_folder(path) -> Iterator[Path]:
    """Make the folder `path` (and its missing parents) for the block; when the block raises (an error, Ctrl-C)
    the folders made here are removed again if they are still empty, so a failed run leaves nothing behind."""
    path = Path(path)
    made = []
    missing = path
    while not missing.exists() and missing.parent != missing:
        made.append(missing)
        missing = missing.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (something was written, or another process made it too): kept
                break
        raise


def next_free_index(folder, pattern: str) -> int:
    """One past the largest number in file names of `folder` matching `pattern` (a regex with one group); 0 when
    the folder does not exist yet."""
    regex = re.compile(pattern)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    numbers = [int(m.group(1)) for name in names if (m := regex.fullmatch(name))]
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

    Nothing existing is ever replaced: numbering continues from the largest number found. The folders are made
    when the first image is written (a run that fails before leaves none behind).
    """

    def __init__(self, outdir, png_text: Dict[str, object], skip_save: bool = False, skip_grid: bool = False):
        self.outdir = outdir
        self.sample_path = os.path.join(outdir, "samples")
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
            os.makedirs(self.sample_path, exist_ok=True)
            for image in images:
                self.base_count = save_numbered_png(image, self.sample_path, "{:05}.png", self.base_count,
                                                    self.png_text) + 1
        self.images.extend(images)
        self.sampling_seconds += sampling_seconds

    def finish(self, n_rows: int) -> None:
        """Write the grid and print the timing summary."""
        if not self.skip_grid and self.images:
            os.makedirs(self.outdir, exist_ok=True)
            grid = make_grid(self.images, n_rows)
            save_numbered_png(grid, self.outdir, "grid-{:04}.png", self.grid_count, self.png_text)
        count = len(self.images)
        print(f"sampling time: {self.sampling_seconds:.2f} s for {count} images "
              f"({self.sampling_seconds / max(1, count):.2f} s per image)")
        print(f"Your samples are ready and waiting for you here: \n{self.outdir} \nEnjoy.")


MAX_INIT_PIXELS = 4096 * 4096  # beyond this an init image is refused before it is decoded


def _rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image -> (H, W, 3) float32 in [0, 1]. 16- and 32-bit integer images (PNG 'I;16', 'I') are
    scaled from their 16-bit range, not clipped to 8 bits as `convert("RGB")` would."""
    if image.mode.startswith("I"):
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        scale = 1.0 if float(gray.max(initial=0.0)) <= 1.0 else 255.0
        return np.repeat(np.clip(gray / scale, 0.0, 1.0)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB")).astype(np.float32) / 255.0


def load_init_image(path, multiple: int = 64, flag: str = "init image") -> torch.Tensor:
    """Image file -> (1, 3, H, W) in [-1, 1], sides cut down to multiples of `multiple` (Lanczos resize), as
    CompVis img2img does. Unreadable, too small or too large files raise UsageError naming `flag`."""
    if not path:
        raise UsageError(f"{flag} is required: the path of the image to transform")
    try:
        with Image.open(path) as opened:
            w, h = opened.size
            if w * h > MAX_INIT_PIXELS:
                raise UsageError(f"{flag} {path} is {w}x{h} ({w * h / 1e6:.1f} megapixels), more than this tool "
                                 f"reads ({MAX_INIT_PIXELS / 1e6:.1f}); resize it first (Stable Diffusion works at "
                                 f"512-1024 pixels a side)")
            opened.load()
            if opened.mode.startswith("I") or opened.mode == "F":
                image, array = None, _rgb_array(opened)
            else:
                image, array = opened.convert("RGB"), None
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{flag} {path} does not exist; give the path of the image to transform") from None
    except Exception as err:
        raise UsageError(f"{flag} {path} is not a readable image ({err})") from None
    tw, th = w - w % multiple, h - h % multiple
    if tw == 0 or th == 0:
        raise UsageError(f"{flag} {path} is {w}x{h}: both sides must be at least {multiple}")
    if image is None:
        gray = Image.fromarray(array[..., 0]).resize((tw, th), resample=Image.LANCZOS)  # mode "F"
        array = np.repeat(np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)[..., None], 3, axis=2)
    else:
        array = _rgb_array(image.resize((tw, th), resample=Image.LANCZOS))
    return 2.0 * torch.from_numpy(array[None].transpose(0, 3, 1, 2).copy()) - 1.0
