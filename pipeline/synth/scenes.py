"""Spoken-scene images: a few coloured shapes on a textured background, and their caption.

A scene is one to three shapes and one spatial relation. The relation always reads from the
first shape to every other one: "a red circle left of a blue square and a green star" means the
circle is left of the square *and* left of the star. Colours are distinct within a scene, so every
shape can be named by its colour alone and every caption word is checkable against the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")

# Saturated or extreme colours, far apart in RGB, so that a per-pixel nearest-colour test cannot
# confuse them with each other or with the muted background (see `_muted_colour`).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (240, 220, 30),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "purple": (135, 45, 185),
    "white": (248, 248, 248),
    "black": (15, 15, 15),
}

SIZES: tuple[str, ...] = ("small", "large")

# Radius of the shape's circumscribed circle, as a fraction of the image side. The two ranges do not
# overlap, so "small" and "large" stay distinguishable; 0.19 keeps three large shapes placeable.
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "large": (0.15, 0.19)}

RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

# Smallest image side for which three large shapes always fit with their gaps
# (see `_canonical_layout`).
MIN_IMAGE_SIZE = 32

# How far (degrees) each kind may be rotated: a square turned by 45 degrees would read as a diamond.
_MAX_ROTATION: dict[str, float] = {
    "circle": 0.0,
    "square": 6.0,
    "triangle": 15.0,
    "diamond": 6.0,
    "star": 36.0,
    "hexagon": 30.0,
}


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: what it is, its colour name (a key of `COLOURS`) and size class."""

    kind: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """Shapes plus the relation of ``shapes[0]`` to each other shape (None for a single shape)."""

    shapes: tuple[Shape, ...]
    relation: str | None


@dataclass(frozen=True)
class Placement:
    """Where one shape is drawn: centre and circumscribed radius in pixels, rotation in degrees.

    Every drawn pixel lies inside the circle of ``radius`` around the centre, so the layout can keep
    shapes apart by their bounding squares alone.
    """

    cx: float
    cy: float
    radius: float
    rotation: float


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene of one to three shapes with distinct colours.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness, so a seeded generator gives the same scene.

    Returns
    -------
    Scene
        The shapes and, for two or more shapes, the relation of the first to the others.
    """
    count = int(rng.integers(1, 4))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    shapes = tuple(
        Shape(
            kind=str(rng.choice(SHAPE_KINDS)),
            colour=str(colour),
            size=str(rng.choice(SIZES)),
        )
        for colour in colours
    )
    relation = str(rng.choice(RELATIONS)) if count > 1 else None
    return Scene(shapes=shapes, relation=relation)


def caption(scene: Scene) -> str:
    """Describe a scene in English, e.g. "a small red circle above a large blue square".

    Parameters
    ----------
    scene : Scene
        The scene to describe.

    Returns
    -------
    str
        Lower-case caption without final punctuation; the relation word is true of the layout that
        `layout_scene` produces for this scene.
    """
    phrases = [f"a {shape.size} {shape.colour} {shape.kind}" for shape in scene.shapes]
    if len(phrases) == 1:
        return phrases[0]
    return f"{phrases[0]} {scene.relation} " + " and ".join(phrases[1:])


def scene_to_dict(scene: Scene) -> dict:
    """Return the scene as plain JSON-ready data (``{"shapes": [...], "relation": ...}``)."""
    shapes = [{"kind": s.kind, "colour": s.colour, "size": s.size} for s in scene.shapes]
    return {"shapes": shapes, "relation": scene.relation}


def layout_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> tuple[Placement, ...]:
    """Place the shapes so that the scene's relation holds and no two shapes touch.

    Parameters
    ----------
    scene : Scene
        The scene to place.
    image_size : int
        Side of the square image in pixels, at least `MIN_IMAGE_SIZE`.
    rng : numpy.random.Generator
        Source of sizes, positions and rotations.

    Returns
    -------
    tuple of Placement
        One placement per shape, in the scene's order. With relation "left of" every pixel of the
        first shape lies strictly left of every pixel of the others (likewise for the other
        relations), with at least one background pixel between them.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    radii = [image_size * rng.uniform(*SIZE_RADIUS[shape.size]) for shape in scene.shapes]
    centres = _canonical_layout(radii, float(image_size), rng)
    centres = [_from_canonical(x, y, scene.relation, float(image_size)) for x, y in centres]
    return tuple(
        Placement(cx=cx, cy=cy, radius=r, rotation=_rotation(shape.kind, rng))
        for shape, (cx, cy), r in zip(scene.shapes, centres, radii)
    )


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene: lay it out with `layout_scene`, then paint it with `draw_scene`.

    Parameters
    ----------
    scene : Scene
        The scene to draw.
    image_size : int
        Side of the square image in pixels.
    rng : numpy.random.Generator
        Source of layout, background and colour jitter.

    Returns
    -------
    numpy.ndarray
        uint8 image of shape (image_size, image_size, 3).
    """
    return draw_scene(scene, layout_scene(scene, image_size, rng), image_size, rng)


def draw_scene(
    scene: Scene, placements: tuple[Placement, ...], image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Paint placed shapes over a random textured background.

    Parameters
    ----------
    scene : Scene
        Which shapes to paint and in which colours.
    placements : tuple of Placement
        Where to paint them, as returned by `layout_scene`.
    image_size : int
        Side of the square image in pixels.
    rng : numpy.random.Generator
        Source of the background and of a small per-shape colour jitter.

    Returns
    -------
    numpy.ndarray
        uint8 image of shape (image_size, image_size, 3).
    """
    image = Image.fromarray(background(image_size, rng))
    draw = ImageDraw.Draw(image)
    for shape, placement in zip(scene.shapes, placements, strict=True):
        # A little jitter so a colour name covers a small cloud of RGB values, not one point.
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[shape.colour]) + jitter, 0, 255))
        _draw_shape(draw, shape.kind, placement, fill)
    return np.asarray(image, dtype=np.uint8)


def shape_mask(kind: str, placement: Placement, image_size: int) -> np.ndarray:
    """Return the boolean (H, W) mask of the pixels `draw_scene` paints for one shape."""
    mask = Image.new("L", (image_size, image_size), 0)
    _draw_shape(ImageDraw.Draw(mask), kind, placement, 255)
    return np.asarray(mask) > 0


def background(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Return a muted textured background (gradient, stripes or smooth noise), uint8 (H, W, 3)."""
    kind = rng.choice(("gradient", "stripes", "noise"))
    weight = {"gradient": _gradient, "stripes": _stripes, "noise": _smooth_noise}[kind](
        image_size, rng
    )  # (H, W) in [0, 1]: how much of the second colour
    first, second = _muted_colour(rng), _muted_colour(rng)
    image = first + weight[..., None] * (second - first)  # (H, W, 3)
    grain = rng.normal(0.0, 4.0, size=image.shape)  # sensor-like grain so no area is flat
    return np.clip(np.round(image + grain), 0, 255).astype(np.uint8)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    # Mid grey with a small tint: never close to a saturated palette colour, nor to white or black.
    return rng.uniform(70, 185) + rng.uniform(-25, 25, size=3)


def _gradient(image_size: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    return (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)


def _stripes(image_size: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(0.12, 0.4) * image_size
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    phase = (xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period
    return 0.5 + 0.5 * np.sin(phase + rng.uniform(0, 2 * math.pi))


def _smooth_noise(image_size: int, rng: np.random.Generator) -> np.ndarray:
    cells = int(rng.integers(3, 8))
    coarse = Image.fromarray(rng.uniform(0, 255, size=(cells, cells)).astype(np.float32))  # mode F
    fine = coarse.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(fine) / 255.0, 0.0, 1.0)


def _canonical_layout(
    radii: list[float], size: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """Centres for relation "left of": shape 0 left of all others, the others never touching.

    Other relations are this layout mirrored or transposed (`_from_canonical`).
    """
    # Pillow may paint one pixel beyond a float outline on either side, so a 3-pixel gap between
    # bounding squares still leaves the shapes' pixels strictly apart.
    margin, gap = 1.0, max(3.0, 0.03 * size)
    r0, others = radii[0], radii[1:]
    widest = max(others, default=0.0)
    x0 = rng.uniform(margin + r0, size - margin - r0 - (gap + 2 * widest if others else 0.0))
    centres = [(x0, rng.uniform(margin + r0, size - margin - r0))]
    for _ in range(64):  # rejection sampling; in practice a few tries suffice
        candidates = [
            (
                rng.uniform(x0 + r0 + gap + r, size - margin - r),
                rng.uniform(margin + r, size - margin - r),
            )
            for r in others
        ]
        if not _any_overlap(candidates, others, gap):
            return centres + candidates
    # Fallback that always fits for sizes up to 0.19 of the side: stack the others top and bottom.
    stacked_y = [margin + others[0], size - margin - others[-1]]
    return centres + [(x0 + r0 + gap + r, y) for r, y in zip(others, stacked_y)]


def _any_overlap(centres: list[tuple[float, float]], radii: list[float], gap: float) -> bool:
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            reach = radii[i] + radii[j] + gap
            dx, dy = abs(centres[i][0] - centres[j][0]), abs(centres[i][1] - centres[j][1])
            if dx < reach and dy < reach:  # bounding squares intersect
                return True
    return False


def _from_canonical(x: float, y: float, relation: str | None, size: float) -> tuple[float, float]:
    # Canonical frame = "left of"; image y grows downwards, so "above" means smaller y.
    if relation in (None, "left of"):
        return x, y
    if relation == "right of":
        return size - x, y
    if relation == "above":
        return y, x
    if relation == "below":
        return y, size - x
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _rotation(kind: str, rng: np.random.Generator) -> float:
    limit = _MAX_ROTATION[kind]
    return float(rng.uniform(-limit, limit))


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, placement: Placement, fill: tuple[int, int, int] | int
) -> None:
    cx, cy, r = placement.cx, placement.cy, placement.radius
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    draw.polygon(_polygon(kind, placement), fill=fill)


def _polygon(kind: str, placement: Placement) -> list[tuple[float, float]]:
    """Vertices on (or inside) the circumscribed circle; angle 0 points up."""
    if kind == "star":
        # Ten vertices alternating between the outer radius and an inner one.
        radii = [placement.radius if i % 2 == 0 else 0.45 * placement.radius for i in range(10)]
        angles = [i * 36.0 for i in range(10)]
    else:
        corners = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[kind]
        # A square's first corner sits at 45 degrees (sides axis-aligned); a diamond's at 0.
        start = 45.0 if kind == "square" else 0.0
        angles = [start + i * 360.0 / corners for i in range(corners)]
        radii = [placement.radius] * corners
    return [
        (
            placement.cx + r * math.sin(math.radians(a + placement.rotation)),
            placement.cy - r * math.cos(math.radians(a + placement.rotation)),
        )
        for r, a in zip(radii, angles)
    ]
