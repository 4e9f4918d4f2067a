"""A procedural image world: coloured, textured shapes on a mid-grey background.

A :class:`Scene` is a tuple of :class:`WorldObject` (shape, colour, texture, size, centre) and is its
own ground truth; :func:`render` draws it as a ``uint8`` array ``(H, W, 3)``. Rendering is pure
numpy over precomputed anti-alias-free shape masks, so a batch of 64 scenes takes milliseconds.

A textured object alternates two tones inside its mask: its colour and :func:`pattern_color`
(the same hue at 35% brightness). Patterns are laid out relative to the object's box with a period
of 4-6 pixels so that they stay visible at 64 x 64.

The palette has no white, black or grey: every blend of a colour with its pattern tone (what a
blurred texture shows) stays far from the grey background, so objects never dissolve into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "heart", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 225, 50),
    "green": (50, 180, 70),
    "cyan": (40, 200, 210),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
    "pink": (240, 90, 170),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
PATTERN_BRIGHTNESS = 0.35
MIN_SIZE, MAX_SIZE = 10, 40  # sizes the renderer accepts (scenes from prompts use 20-30)

_SUPERSAMPLE = 8


@dataclass(frozen=True)
class WorldObject:
    """One object: ``size`` is the side of its square bounding box, ``(x, y)`` its centre in pixels."""

    shape: str
    color: str
    texture: str
    size: int
    x: int
    y: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(COLORS)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {TEXTURES}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"object size {self.size} is outside [{MIN_SIZE}, {MAX_SIZE}]")

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` with exclusive ``x1, y1``: the square the shape is drawn in."""
        x0, y0 = self.x - self.size // 2, self.y - self.size // 2
        return x0, y0, x0 + self.size, y0 + self.size


@dataclass(frozen=True)
class Scene:
    """The objects of one image; the scene is the image's ground truth."""

    objects: tuple[WorldObject, ...]
    image_size: int = IMAGE_SIZE


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in the unit square (y down), or ``None`` for the circle (an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "hexagon":
        h = math.sqrt(3) / 4
        return [(0, 0.5), (0.25, 0.5 - h), (0.75, 0.5 - h), (1, 0.5), (0.75, 0.5 + h), (0.25, 0.5 + h)]
    if shape == "cross":
        a, b = 0.32, 0.68
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.47
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return _fit_unit_square(points)
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return _fit_unit_square(list(zip(xs.tolist(), ys.tolist())))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _fit_unit_square(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale and centre ``points`` so their bounding box fits [0, 1]^2 keeping the aspect ratio."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [((x - cx) / span + 0.5, (y - cy) / span + 0.5) for x, y in points]


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of ``shape`` (pixels more than half covered)."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _unit_polygon(shape)
    if polygon is None:
        draw.ellipse([0, 0, big - 1, big - 1], fill=255)
    else:
        draw.polygon([(x * (big - 1), y * (big - 1)) for x, y in polygon], fill=255)
    coverage = np.asarray(canvas, dtype=np.float32).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE)
    mask = coverage.mean(axis=(1, 3)) >= 127.5
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=None)
def texture_mask(texture: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of the pixels drawn in the pattern tone (box-relative)."""
    v, u = np.mgrid[0:size, 0:size]
    if texture == "plain":
        mask = np.zeros((size, size), dtype=bool)
    elif texture == "striped":  # horizontal stripes, period 5, 2 px dark
        mask = (v % 5) >= 3
    elif texture == "dotted":  # 3 x 3 dots on a 6-pixel grid
        mask = ((u % 6) >= 2) & ((u % 6) < 5) & ((v % 6) >= 2) & ((v % 6) < 5)
    elif texture == "checkered":  # 3 x 3 checks, period 6
        mask = ((u // 3 + v // 3) % 2) == 1
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    mask.setflags(write=False)
    return mask


def pattern_color(color: str) -> tuple[int, int, int]:
    """The second tone of a textured object of ``color``."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {tuple(COLORS)}")
    return tuple(int(round(c * PATTERN_BRIGHTNESS)) for c in COLORS[color])  # type: ignore[return-value]


def _clip_box(obj: WorldObject, image_size: int) -> tuple[slice, slice, slice, slice] | None:
    """Image and mask slices of the part of ``obj``'s box inside the image (``None`` if outside)."""
    x0, y0, x1, y1 = obj.box
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, image_size), min(y1, image_size)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    return slice(cy0, cy1), slice(cx0, cx1), slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)


def object_mask(obj: WorldObject, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean ``(image_size, image_size)`` mask of the pixels ``obj`` covers."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    slices = _clip_box(obj, image_size)
    if slices is not None:
        rows, cols, mrows, mcols = slices
        mask[rows, cols] = shape_mask(obj.shape, obj.size)[mrows, mcols]
    return mask


def render(scene: Scene) -> np.ndarray:
    """Draw ``scene`` as ``uint8 (H, W, 3)``; later objects are drawn over earlier ones."""
    size = scene.image_size
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = BACKGROUND
    for obj in scene.objects:
        slices = _clip_box(obj, size)
        if slices is None:
            continue
        rows, cols, mrows, mcols = slices
        shape = shape_mask(obj.shape, obj.size)[mrows, mcols]
        dark = texture_mask(obj.texture, obj.size)[mrows, mcols]
        patch = image[rows, cols]
        patch[shape & ~dark] = COLORS[obj.color]
        patch[shape & dark] = pattern_color(obj.color)
    return image


def render_batch(scenes: list[Scene] | tuple[Scene, ...]) -> np.ndarray:
    """Render several scenes of the same size into ``uint8 (N, H, W, 3)``."""
    if not scenes:
        raise ValueError("render_batch needs at least one scene")
    return np.stack([render(scene) for scene in scenes])
