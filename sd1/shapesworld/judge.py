"""The judge: what an image of the shapes world shows, and whether it shows what a scene asks for (GenEval-style).

Analytic, no training:
- foreground = pixels of chroma (max - min of R, G, B) >= CHROMA_MIN: the backgrounds are neutral, the objects
  saturated; each foreground pixel takes the palette color nearest in hue (blending a color with a neutral
  background keeps its hue, so anti-aliased and blurred edges keep their color);
- objects = 8-connected components of one color with at least MIN_AREA_FRACTION of the image's pixels;
- position = the grid cell of the component's centroid;
- shape = from two descriptors of the component's outline (coverage >= 1/2): the share of its area in the upper
  half of its bounding box (an upright triangle holds 1/4 of its area there, circles and squares 1/2), and how
  much of the box's four corners it covers (a square all, a circle about a fifth). Both hold under a Gaussian
  blur of a pixel's radius, so a blurry generated square is still a square.

`judge(image, scene)` checks every object of the scene: its color is found, and the found object of that color
has the asked shape and position; the prompt is right when every attribute of every object is right and the
image holds no other object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .world import COLORS, POSITIONS, Scene

CHROMA_MIN = 60.0
MIN_AREA_FRACTION = 20 / 4096  # 20 pixels of a 64 x 64 image; a small triangle covers about 46
TRIANGLE_TOP_SHARE = 0.41  # below: a triangle (ideal 0.25; circle, square 0.5)
CORNER = 0.25  # the corner boxes: this share of the bounding box's height and width
SQUARE_CORNERS = 0.5  # coverage of the corner boxes above which a shape is a square (ideal 1; circle about 0.2)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of rgb: (..., 3) floats."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0


PALETTE_NAMES: Tuple[str, ...] = tuple(COLORS)
PALETTE_HUES = _hue(np.array([COLORS[c] for c in PALETTE_NAMES], dtype=np.float64))


@dataclass(frozen=True)
class Detection:
    """One object found in an image: its color, shape, grid position name, area in pixels and centroid (x, y)."""

    color: str
    shape: str
    position: str
    area: int
    centroid: Tuple[float, float]


@dataclass(frozen=True)
class ObjectVerdict:
    """Whether one asked object's attributes are right."""

    color: bool
    shape: bool
    position: bool

    @property
    def correct(self) -> bool:
        return self.color and self.shape and self.position


@dataclass(frozen=True)
class Verdict:
    """The judge's verdict on one image: one ObjectVerdict per asked object, the detections and the count check."""

    objects: Tuple[ObjectVerdict, ...]
    detections: Tuple[Detection, ...]

    @property
    def count(self) -> bool:
        return len(self.detections) == len(self.objects)

    @property
    def correct(self) -> bool:
        """Every attribute of every object right and nothing else in the image (GenEval's prompt accuracy)."""
        return self.count and all(o.correct for o in self.objects)


def color_labels(image: np.ndarray) -> np.ndarray:
    """Per pixel, the palette index of its color, or -1 for background: image (H, W, 3) uint8 -> (H, W) int."""
    rgb = image.astype(np.float64)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    distance = np.abs(_hue(rgb)[..., None] - PALETTE_HUES)
    distance = np.minimum(distance, 360.0 - distance)
    labels = distance.argmin(axis=-1)
    return np.where(chroma >= CHROMA_MIN, labels, -1)


def components(mask: np.ndarray) -> List[np.ndarray]:
    """The 8-connected components of a boolean mask (H, W): a list of (K, 2) arrays of (row, column)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        found.append(np.array(pixels))
    return found


def classify_shape(pixels: np.ndarray, chroma: np.ndarray) -> str:
    """'triangle', 'square' or 'circle' of a component: pixels (K, 2) (row, column), chroma (K,) of each pixel.

    Coverage is chroma over the component's 90th-percentile chroma (so blur and anti-aliasing count as partial
    pixels); the object's outline is where coverage >= 1/2. A triangle has little of its outline's area in the
    upper half of its bounding box; a square covers the corners of its box, a circle does not."""
    coverage = np.clip(chroma / max(float(np.percentile(chroma, 90)), 1e-6), 0.0, 1.0)
    inside = pixels[coverage >= 0.5]
    rows, cols = inside[:, 0], inside[:, 1]
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    middle = (top + bottom) / 2
    upper = np.count_nonzero(rows + 0.5 < middle) + 0.5 * np.count_nonzero(rows + 0.5 == middle)
    if upper / len(inside) < TRIANGLE_TOP_SHARE:
        return "triangle"
    height, width = (bottom - top) * CORNER, (right - left) * CORNER
    centers = pixels + 0.5
    in_rows = (centers[:, 0] < top + height) | (centers[:, 0] >= bottom - height)
    in_cols = (centers[:, 1] < left + width) | (centers[:, 1] >= right - width)
    corners = coverage[in_rows & in_cols].sum() / (4 * height * width)
    return "square" if corners > SQUARE_CORNERS else "circle"


def position_name(x: float, y: float, image_size: int) -> str:
    """The 3 x 3 grid position whose cell holds the point (x, y) of an image of side image_size."""
    cell = (min(int(y * 3 / image_size), 2), min(int(x * 3 / image_size), 2))
    return next(name for name, where in POSITIONS.items() if where == cell)


def detect(image: np.ndarray) -> Tuple[Detection, ...]:
    """The objects in an image (H, W, 3) uint8, largest first."""
    labels = color_labels(image)
    rgb = image.astype(np.float64)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    min_area = MIN_AREA_FRACTION * labels.size
    found = []
    for index, color in enumerate(PALETTE_NAMES):
        for pixels in components(labels == index):
            if len(pixels) < min_area:
                continue
            y, x = pixels.mean(axis=0) + 0.5
            found.append(Detection(color, classify_shape(pixels, chroma[pixels[:, 0], pixels[:, 1]]), position_name(x, y, image.shape[0]),
                                   len(pixels), (float(x), float(y))))
    return tuple(sorted(found, key=lambda d: -d.area))


def judge(image: np.ndarray, scene: Scene) -> Verdict:
    """The verdict on an image (H, W, 3) uint8 for the scene it was asked to show. Each asked object is matched
    to the found object of its color that agrees on most attributes (each found object serves one asked object)."""
    detections = detect(image)
    free = list(detections)
    verdicts = []
    for obj in scene.objects:
        same_color = [d for d in free if d.color == obj.color]
        if not same_color:
            verdicts.append(ObjectVerdict(False, False, False))
            continue
        best = max(same_color, key=lambda d: ((d.shape == obj.shape) + (d.position == obj.position), d.area))
        free.remove(best)
        verdicts.append(ObjectVerdict(True, best.shape == obj.shape, best.position == obj.position))
    return Verdict(tuple(verdicts), detections)


def accuracy(verdicts: Sequence[Verdict]) -> Dict[str, float]:
    """Percentages over images: prompt accuracy (GenEval), and per asked object its color, shape, position."""
    if not verdicts:
        raise ValueError("no verdicts to score")
    objects = [o for v in verdicts for o in v.objects]

    def share(values: Sequence[bool]) -> float:
        return 100.0 * sum(values) / len(values)

    return {"prompt": share([v.correct for v in verdicts]), "color": share([o.color for o in objects]),
            "shape": share([o.shape for o in objects]), "position": share([o.position for o in objects]),
            "count": share([v.count for v in verdicts])}
