"""Captioned pictures of coloured shapes: the data the built-in ``builtin:shapes`` model
learns from, and the measures its quality tests use.

Everything is deterministic from a seed. A picture is 64x64 RGB: one shape (circle,
square, triangle, star or ring) in one named colour, on a plain background of another
named colour, at a named position and size. Captions say the same things in varied
words ("a small red star on a blue background", "blue background, large yellow circle
in the top left", ...).

The measures read a generated picture back: the background is the commonest colour on
the border, the shape is every pixel far from it, each is named by the nearest named
colour, and the shape's kind is told from how much of its bounding box it fills.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 225),
    "blue": (35, 70, 220),
    "purple": (135, 45, 185),
    "pink": (245, 140, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
# Centre of the shape as a fraction of the picture (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
# Radius of the shape's bounding circle, as a fraction of the picture.
SIZES: dict[str, float] = {"small": 0.13, "large": 0.23}

_RGB = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: str
    caption: str


def _position_phrase(position: str, rng: np.random.Generator) -> str:
    if position == "centre":
        return str(rng.choice(["in the centre", "in the middle", "at the centre"]))
    return str(rng.choice([f"in the {position}", f"at the {position}", f"on the {position}"]))


def caption_for(shape: str, colour: str, background: str, position: str, size: str,
                rng: np.random.Generator, *, say_size: bool = True, say_position: bool = True) -> str:
    """One of several phrasings of the same scene."""
    noun = f"{size} {colour} {shape}" if say_size else f"{colour} {shape}"
    article = "an" if noun[0] in "aeiou" else "a"
    where = f" {_position_phrase(position, rng)}" if say_position else ""
    template = int(rng.integers(5))
    if template == 0:
        backdrop = f"an {background}" if background[0] in "aeiou" else f"a {background}"
        return f"{article} {noun}{where} on {backdrop} background"
    if template == 1:
        return f"{background} background, {noun}{where}"
    if template == 2:
        return f"{article} {noun} on {background}{where}"
    if template == 3:
        return f"{noun}{where}, {background} background"
    backdrop = f"an {background}" if background[0] in "aeiou" else f"a {background}"
    return f"{article} {noun}{where} against {backdrop} backdrop"


def sample_scene(rng: np.random.Generator) -> Scene:
    shape = str(rng.choice(SHAPES))
    colour, background = (str(c) for c in rng.choice(_NAMES, size=2, replace=False))
    position = str(rng.choice(list(POSITIONS)))
    size = str(rng.choice(list(SIZES)))
    say_size, say_position = rng.random() > 0.15, rng.random() > 0.15
    caption = caption_for(shape, colour, background, position, size, rng,
                          say_size=say_size, say_position=say_position)
    return Scene(shape, colour, background, position, size, caption)


def _star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.38) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = r if k % 2 == 0 else r * inner
        angle = -math.pi / 2 + k * math.pi / points
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def _jitter(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    return rng.uniform(-0.04, 0.04, size=2), float(rng.uniform(0.9, 1.1))


def render(scene: Scene, rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """The scene as ``uint8[64, 64, 3]``, drawn large and averaged down (anti-aliased).
    The centre and size jitter a little, from ``rng``."""
    big = SIZE * supersample
    fx, fy = POSITIONS[scene.position]
    jitter, grow = _jitter(rng)
    cx, cy = (fx + jitter[0]) * big, (fy + jitter[1]) * big
    r = SIZES[scene.size] * big * grow
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif scene.shape == "triangle":  # equilateral, pointing up, centred on its box
        h = r * 1.5
        draw.polygon([(cx, cy - h / 2 - r * 0.1), (cx - r * 0.95, cy + h / 2 - r * 0.1),
                      (cx + r * 0.95, cy + h / 2 - r * 0.1)], fill=fill)
    elif scene.shape == "star":
        draw.polygon(_star(cx, cy + r * 0.1, r * 1.05), fill=fill)
    elif scene.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        h = r * 0.55
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=COLOURS[scene.background])
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {SHAPES}")
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8)


def scenes(n: int, seed: int) -> Iterator[tuple[Scene, np.ndarray]]:
    """``n`` captioned pictures, the same for the same seed."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        yield scene, render(scene, rng)


def captions(n: int, seed: int) -> list[str]:
    """The captions of ``scenes(n, seed)``, without drawing the pictures."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append(sample_scene(rng).caption)
        _jitter(rng)  # the draws render() makes
    return out


def held_out(n: int, seed: int, exclude: set[str]) -> list[Scene]:
    """``n`` scenes whose captions are not in ``exclude`` (say, the training captions)."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    seen = set(exclude)
    while len(out) < n:
        scene = sample_scene(rng)
        if scene.caption not in seen:
            seen.add(scene.caption)
            out.append(scene)
    return out


# ---- reading a picture back ---------------------------------------------------------


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Index into ``COLOURS`` of the nearest named colour (RGB distance) per pixel."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    d = ((flat[:, None, :] - _RGB[None]) ** 2).sum(-1)
    return d.argmin(1).reshape(pixels.shape[:-1])


@dataclasses.dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None when no shape was found
    shape: str | None
    fill: float  # share of the shape's bounding box it covers
    area: int  # pixels


def read_picture(image: np.ndarray | Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = nearest_colours(pixels)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = Counter(border.tolist()).most_common(1)[0][0]
    # A pixel belongs to the shape when it is far from the background colour; edges
    # blend the two, so the cut is half way.
    dist = np.sqrt(((pixels.astype(np.float32) - _RGB[bg]) ** 2).sum(-1))
    mask = (dist > 60.0) & (labels != bg)
    area = int(mask.sum())
    if area < 12:
        return Reading(_NAMES[bg], None, None, 0.0, area)
    colour = Counter(labels[mask].tolist()).most_common(1)[0][0]
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = area / float((y1 - y0 + 1) * (x1 - x0 + 1))
    centre = mask[(y0 + y1) // 2 - 1:(y0 + y1) // 2 + 2, (x0 + x1) // 2 - 1:(x0 + x1) // 2 + 2]
    return Reading(_NAMES[bg], _NAMES[colour], classify_shape(fill, hollow=not centre.any()), fill, area)


def classify_shape(fill: float, *, hollow: bool = False) -> str:
    """The shape's kind from its fill ratio: a square fills its box, a circle pi/4 of
    it, a triangle half, a five-pointed star about a third; a ring has a hole."""
    if hollow:
        return "ring"
    if fill >= 0.89:
        return "square"
    if fill >= 0.65:
        return "circle"
    if fill >= 0.45:
        return "triangle"
    return "star"


def colours_match(scene: Scene, reading: Reading) -> bool:
    return reading.background == scene.background and reading.colour == scene.colour
