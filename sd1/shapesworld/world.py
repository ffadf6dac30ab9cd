"""The shapes world: scenes of one or two flat shapes on a neutral background, their images and captions.

A scene is data (`Scene`: a background and objects, each a color, a shape, a cell of the 3 x 3 grid and a size);
`sample_scene(rng)` draws one, `render(scene, rng)` draws its image (H, W, 3) uint8 and `caption(scene, rng)`
describes it with one of a few templates and synonyms (`canonical_caption` is the one form every model must
understand: "a red circle at the top left"). Everything is seeded by the `numpy.random.Generator` it is given.

Geometry, for an image of side S (default 64): the grid's cells are S/3 wide; an object's center lies in its cell,
jittered so the whole object stays inside the cell; a small object is 0.45 of a cell wide, a large one 0.75.
Triangles point up. Images are drawn at 4x and box-filtered down, so edges are anti-aliased.

The background is lit faintly from above and tinted faintly warm to the right (BACKGROUND_SHADE levels brighter at
the top than the middle, BACKGROUND_TINT levels of red-for-blue to the right; chroma stays under the judge's and
the trainer's object thresholds): a layout cue, since SD's attention has no positional encoding. On its own it
did not make the model place objects; the UNet's coordinate channels (ldm.modules.diffusionmodules.coordconv)
and the training's layout phases (shapesworld.train) did (docs/shapes.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

# Saturated colors, well apart in hue (red 0, yellow 55, green 130, blue 225 degrees).
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 205, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# Cell (row, column) of each position name on the 3 x 3 grid.
POSITIONS: Dict[str, Tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
SIZES: Dict[str, float] = {"small": 0.45, "large": 0.75}  # object width as a fraction of a cell
# Neutral backgrounds: low saturation, brightness jittered by up to BACKGROUND_JITTER.
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {"white": (230, 230, 230), "gray": (128, 128, 128),
                                                "black": (28, 28, 28)}
BACKGROUND_JITTER = 10
BACKGROUND_SHADE = 16  # levels: top +16, bottom -16
BACKGROUND_TINT = 8  # levels: right edge red +8 / blue -8, left edge the opposite
COLOR_JITTER = 12

# Synonyms a caption may use for a word; the first of each list is the canonical word.
SHAPE_WORDS: Dict[str, Tuple[str, ...]] = {"circle": ("circle", "disk"), "square": ("square", "box"),
                                           "triangle": ("triangle",)}
SIZE_WORDS: Dict[str, Tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES: Tuple[str, ...] = ("at the {p}", "in the {p}")
TEMPLATES: Tuple[str, ...] = ("a {o}", "an image of a {o}", "a picture of a {o}")


@dataclass(frozen=True)
class ShapeObject:
    """One object: color (a COLORS key), shape (SHAPES), position (a POSITIONS key), size (a SIZES key)."""

    color: str
    shape: str
    position: str
    size: str = "large"

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.color, COLORS, "color"), (self.shape, SHAPES, "shape"),
                                     (self.position, POSITIONS, "position"), (self.size, SIZES, "size")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}: expected one of {', '.join(allowed)}")

    @property
    def cell(self) -> Tuple[int, int]:
        """(row, column) of the object's grid cell."""
        return POSITIONS[self.position]


@dataclass(frozen=True)
class Scene:
    """A background (a BACKGROUNDS key) and one or more objects in distinct cells."""

    objects: Tuple[ShapeObject, ...]
    background: str = "white"

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError("the objects of a scene must sit in different cells")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}: expected one of {', '.join(BACKGROUNDS)}")


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn: the share of two-object scenes and of small objects, and the image side."""

    two_objects: float = 0.25
    small: float = 0.3
    image_size: int = IMAGE_SIZE
    backgrounds: Tuple[str, ...] = field(default=tuple(BACKGROUNDS))


def sample_object(rng: np.random.Generator, config: WorldConfig, taken: Sequence[str] = ()) -> ShapeObject:
    """A random object whose position is not in `taken`."""
    free = [p for p in POSITIONS if p not in taken]
    return ShapeObject(color=_pick(rng, tuple(COLORS)), shape=_pick(rng, SHAPES), position=_pick(rng, free),
                       size="small" if rng.random() < config.small else "large")


def sample_scene(rng: np.random.Generator, config: WorldConfig = WorldConfig()) -> Scene:
    """A random scene: one object, or two with probability `config.two_objects`."""
    first = sample_object(rng, config)
    objects = [first]
    if rng.random() < config.two_objects:
        objects.append(sample_object(rng, config, taken=[first.position]))
    return Scene(tuple(objects), background=_pick(rng, config.backgrounds))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# --- images ------------------------------------------------------------------------------------------------------
def object_box(obj: ShapeObject, image_size: int, rng: Optional[np.random.Generator]) -> Tuple[float, float, float]:
    """(center_x, center_y, width) of the object in pixels; the center is jittered within its cell (no jitter
    without `rng`) so that the whole object stays inside the cell."""
    cell = image_size / 3
    width = SIZES[obj.size] * cell
    slack = (cell - width) / 2 * 0.9
    row, col = obj.cell
    dx, dy = (rng.uniform(-slack, slack, size=2) if rng is not None else (0.0, 0.0))
    return (col + 0.5) * cell + dx, (row + 0.5) * cell + dy, width


def _jitter(color: Tuple[int, int, int], amount: int, rng: Optional[np.random.Generator],
            same: bool = False) -> Tuple[int, int, int]:
    if rng is None or amount == 0:
        return color
    shift = rng.integers(-amount, amount + 1, size=1 if same else 3)
    return tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(color, np.broadcast_to(shift, (3,))))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, width: float,
                fill: Tuple[int, int, int]) -> None:
    half = width / 2
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:  # an upright triangle filling the object's box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def background_image(color: Tuple[int, int, int], size: int) -> np.ndarray:
    """The lit, tinted background around `color`: (size, size, 3) uint8."""
    ramp = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # -1 at the top / left edge, +1 at the bottom / right
    shade = -BACKGROUND_SHADE * ramp[:, None, None]
    tint = BACKGROUND_TINT * ramp[None, :, None] * np.array([1.0, 0.0, -1.0])
    return np.clip(np.array(color, dtype=np.float64) + shade + tint, 0, 255).round().astype(np.uint8)


def render(scene: Scene, rng: Optional[np.random.Generator] = None, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene's image: (image_size, image_size, 3) uint8. `rng` jitters positions and colors (None: exact)."""
    big = image_size * SUPERSAMPLE
    background = _jitter(BACKGROUNDS[scene.background], BACKGROUND_JITTER, rng, same=True)
    canvas = Image.fromarray(background_image(background, big))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx, cy, width = object_box(obj, image_size, rng)
        color = _jitter(COLORS[obj.color], COLOR_JITTER, rng)
        _draw_shape(draw, obj.shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, width * SUPERSAMPLE, color)
    return np.array(canvas.resize((image_size, image_size), Image.Resampling.BOX))


# --- captions ----------------------------------------------------------------------------------------------------
def canonical_object(obj: ShapeObject, with_size: bool = False) -> str:
    """'red circle at the top left' ('small red circle ...' with `with_size`)."""
    size = f"{obj.size} " if with_size else ""
    return f"{size}{obj.color} {obj.shape} at the {obj.position}"


def canonical_caption(scene: Scene, with_size: bool = False) -> str:
    """The form every model must understand: 'a red circle at the top left and a blue square at the right'."""
    return " and ".join(f"a {canonical_object(o, with_size)}" for o in scene.objects)


def _object_phrase(obj: ShapeObject, rng: np.random.Generator, with_size: bool) -> str:
    size = f"{_pick(rng, SIZE_WORDS[obj.size])} " if with_size else ""
    where = _pick(rng, POSITION_PHRASES).format(p=obj.position)
    return f"{size}{obj.color} {_pick(rng, SHAPE_WORDS[obj.shape])} {where}"


def caption(scene: Scene, rng: np.random.Generator, canonical: float = 0.5, sized: float = 0.5) -> str:
    """A caption of the scene: the canonical one with probability `canonical`, else a template with synonyms; the
    objects' sizes are named with probability `sized` (unnamed sizes are left to the model)."""
    with_size = bool(rng.random() < sized)
    if rng.random() < canonical:
        return canonical_caption(scene, with_size)
    phrases = [_object_phrase(o, rng, with_size) for o in scene.objects]
    first = _pick(rng, TEMPLATES).format(o=phrases[0])
    return " and ".join([first] + [f"a {p}" for p in phrases[1:]])


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (any template, synonym and size word of this module; background white).
    ValueError when a part names no known color, shape or position."""
    objects: List[ShapeObject] = []
    for part in text.lower().strip().rstrip(".").split(" and "):
        words = part.split()
        color = next((w for w in words if w in COLORS), None)
        shape = next((s for s, names in SHAPE_WORDS.items() for w in words if w in names), None)
        size = next((s for s, names in SIZE_WORDS.items() for w in words if w in names), "large")
        tail = part.split(" at the ")[-1] if " at the " in part else part.split(" in the ")[-1]
        position = tail.strip() if tail.strip() in POSITIONS else None
        if color is None or shape is None or position is None:
            raise ValueError(f"cannot read {part!r} as '[small|large] <color> <shape> at the <position>' (colors: "
                             f"{', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; positions: {', '.join(POSITIONS)})")
        objects.append(ShapeObject(color, shape, position, size))
    return Scene(tuple(objects))
