"""SynthRef scenes: procedural shapes on textured backgrounds, with visible-pixel masks.

A scene is 2-6 flat-coloured shapes (:data:`SHAPES` x :data:`COLOURS` x :data:`SIZES`) drawn in
order on a low-saturation textured background; a later shape covers an earlier one, so each
object's mask is the set of its *visible* pixels (the label map after all shapes are painted).
Placement rejects a shape that would leave any object (itself or an earlier one) with less than
:data:`MIN_VISIBLE_FRACTION` of its full area or fewer than :func:`min_visible_pixels` pixels,
and never lets two shapes of the same colour touch (they would read as one blob).

Rasterisation is exact and binary (pixel centres inside the shape), through ``skimage.draw``.
Shapes are scaled to the same area as a disc of the sampled radius, so the two size classes
differ in area by a factor of >= 2.6 whatever the shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage.draw import disk, polygon

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "MIN_VISIBLE_FRACTION",
    "SHAPES",
    "SIZES",
    "ObjectSpec",
    "Scene",
    "SceneObject",
    "draw_scene",
    "min_visible_pixels",
    "sample_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")

# Saturated, well separated colours (min pairwise RGB distance ~ 95); backgrounds are near grey.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 125, 15),
    "yellow": (235, 220, 40),
    "green": (40, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 225),
    "purple": (135, 45, 185),
    "pink": (245, 110, 190),
}

SIZES: tuple[str, ...] = ("small", "large")

# Equivalent-disc radius of each size class, as a fraction of the image side.
_RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (0.065, 0.08), "large": (0.13, 0.16)}

BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "gradient", "checker")

MIN_VISIBLE_FRACTION = 0.6
_MAX_ROTATION_DEG = 10.0
_COLOUR_JITTER = 10
_PIXEL_NOISE_STD = 3.0
_SAME_COLOUR_GAP_PX = 2.0


def min_visible_pixels(size: int) -> int:
    """Fewest visible pixels an object may keep in a ``size`` x ``size`` image."""
    return max(12, round(0.003 * size * size))


def _regular(n: int, radius: float = 1.0, phase_deg: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular(points)
    inner_pts = _regular(points, inner, phase_deg=-90.0 + 180.0 / points)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)  # alternate outer / inner vertices


def _cross(arm: float = 0.34) -> np.ndarray:
    """A plus sign: arms of half-width ``arm`` reaching 1 from the centre (12 vertices)."""
    quarter = np.array([[-arm, -1.0], [arm, -1.0], [arm, -arm]])  # top arm, then the inner corner
    rot90 = np.array(
        [[0.0, 1.0], [-1.0, 0.0]]
    )  # row (x, y) @ rot90 = (-y, x): quarter turn clockwise on screen
    parts, q = [], quarter
    for _ in range(4):
        parts.append(q)
        q = q @ rot90
    return np.concatenate(parts)


# Unit polygons (x right, y down), pointing up; the circle is drawn with skimage.draw.disk.
_UNIT_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]),
    "triangle": _regular(3),
    "star": _star(),
    "hexagon": _regular(6),
    "diamond": np.array([[0.0, -1.25], [0.8, 0.0], [0.0, 1.25], [-0.8, 0.0]]),
    "cross": _cross(),
}


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# Scale of each unit polygon so that its area equals that of the unit disc.
_AREA_SCALE: dict[str, float] = {s: math.sqrt(math.pi / _shoelace(p)) for s, p in _UNIT_POLYGONS.items()}
# Circumradius of each shape per unit equivalent radius (placement margins, same-colour gaps).
_EXTENT: dict[str, float] = {
    "circle": 1.0,
    **{s: _AREA_SCALE[s] * float(np.linalg.norm(p, axis=1).max()) for s, p in _UNIT_POLYGONS.items()},
}


@dataclass(frozen=True)
class ObjectSpec:
    """Where and how one shape is drawn.

    Attributes:
        shape, colour, size: names from :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`.
        cx, cy: centre in pixels (x right, y down).
        radius: equivalent-disc radius in pixels (the shape has the area of that disc).
        angle: rotation in degrees.
        rgb: the fill colour actually painted (the named colour plus a small jitter).
    """

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: tuple[int, int, int]

    @property
    def extent(self) -> float:
        """Circumradius in pixels."""
        return self.radius * _EXTENT[self.shape]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object and its visible pixels.

    Attributes:
        shape, colour, size: the object's attributes.
        mask: ``(H, W)`` bool, visible pixels only.
        full_area: pixel count of the whole shape before occlusion.
        cx, cy: centroid of the visible pixels (x right, y down).
    """

    shape: str
    colour: str
    size: str
    mask: np.ndarray
    full_area: int
    cx: float
    cy: float

    @property
    def area(self) -> int:
        """Visible pixel count."""
        return int(self.mask.sum())

    @property
    def visible_fraction(self) -> float:
        """Visible pixels / full shape pixels."""
        return self.area / max(self.full_area, 1)


@dataclass(frozen=True)
class Scene:
    """A rendered scene.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        objects: the objects in drawing order (later ones on top).
        background: the background texture kind (one of :data:`BACKGROUNDS`).
    """

    image: np.ndarray
    objects: tuple[SceneObject, ...]
    background: str


def rasterise(spec: ObjectSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels whose centres lie inside the shape (clipped to the image)."""
    if spec.shape == "circle":
        return disk((spec.cy, spec.cx), spec.radius, shape=(size, size))
    theta = math.radians(spec.angle)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = (_UNIT_POLYGONS[spec.shape] * (_AREA_SCALE[spec.shape] * spec.radius)) @ rot.T  # (V, 2) x, y
    return polygon(pts[:, 1] + spec.cy, pts[:, 0] + spec.cx, shape=(size, size))


def _tint(rng: np.random.Generator) -> np.ndarray:
    """A near-grey colour: grey level 70-200 plus a tint of at most 22 per channel."""
    grey = rng.uniform(70.0, 200.0)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    return grey + direction * rng.uniform(0.0, 22.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """``(size, size)`` value noise in [0, 1]: a random grid, bilinearly interpolated."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0.0, cells, size)
    lo = np.minimum(pos.astype(np.int64), cells - 1)
    frac = pos - lo
    interp = np.zeros((size, cells + 1))  # (size, cells+1) linear interpolation weights
    interp[np.arange(size), lo] = 1.0 - frac
    interp[np.arange(size), lo + 1] = frac
    return interp @ grid @ interp.T


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A low-saturation texture ``(size, size, 3)`` float in [0, 255] and its kind."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c1, c2 = _tint(rng), _tint(rng)
    if np.abs(c1 - c2).mean() < 20.0:  # keep the texture visible
        c2 = np.clip(c1 + np.sign(128.0 - c1.mean()) * 35.0, 0.0, 255.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    if kind == "noise":
        t = 0.7 * _smooth_noise(rng, size, int(rng.integers(3, 8))) + 0.3 * _smooth_noise(rng, size, 16)
    elif kind == "stripes":
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(0.06, 0.2)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        t = (np.floor(phase) % 2).astype(np.float64) * 0.8 + 0.2 * (np.sin(2 * math.pi * phase) * 0.5 + 0.5)
    elif kind == "gradient":
        theta = rng.uniform(0.0, 2 * math.pi)
        proj = xx * math.cos(theta) + yy * math.sin(theta)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-9)
    else:  # checker
        cell = rng.uniform(0.08, 0.2)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float64)
    bg = c1[None, None, :] * (1.0 - t[..., None]) + c2[None, None, :] * t[..., None]
    return bg, kind


def draw_scene(specs: Sequence[ObjectSpec], size: int, rng: np.random.Generator) -> Scene:
    """Render ``specs`` in order (later on top) on a random background.

    Args:
        specs: the shapes, in drawing order.
        size: image side in pixels.
        rng: draws the background and the pixel noise.

    Returns:
        the :class:`Scene`; ``objects[k].mask`` is the visible part of ``specs[k]``.
    """
    bg, kind = _background(rng, size)
    image = bg
    label = np.full((size, size), -1, dtype=np.int16)
    full_areas = []
    for k, spec in enumerate(specs):
        rr, cc = rasterise(spec, size)
        label[rr, cc] = k
        image[rr, cc] = spec.rgb
        full_areas.append(int(rr.size))
    image = image + rng.normal(0.0, _PIXEL_NOISE_STD, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    objects = []
    for k, spec in enumerate(specs):
        mask = label == k
        ys, xs = np.nonzero(mask)
        objects.append(
            SceneObject(
                shape=spec.shape,
                colour=spec.colour,
                size=spec.size,
                mask=mask,
                full_area=full_areas[k],
                cx=float(xs.mean()) if xs.size else float("nan"),
                cy=float(ys.mean()) if ys.size else float("nan"),
            )
        )
    return Scene(image=image, objects=tuple(objects), background=kind)


def _sample_spec(
    rng: np.random.Generator, size: int, shapes: Sequence[str], colours: Sequence[str]
) -> ObjectSpec:
    shape = shapes[int(rng.integers(len(shapes)))]
    colour = colours[int(rng.integers(len(colours)))]
    size_class = SIZES[int(rng.integers(len(SIZES)))]
    lo, hi = _RADIUS_RANGE[size_class]
    radius = rng.uniform(lo, hi) * size
    extent = radius * _EXTENT[shape]
    cx, cy = rng.uniform(extent + 1.0, size - 1.0 - extent, size=2)
    angle = 0.0 if shape == "circle" else rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG)
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    rgb = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)
    return ObjectSpec(
        shape=shape,
        colour=colour,
        size=size_class,
        cx=float(cx),
        cy=float(cy),
        radius=float(radius),
        angle=float(angle),
        rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
    )


def _apart_from_same_colour(spec: ObjectSpec, placed: Sequence[ObjectSpec]) -> bool:
    for other in placed:
        if other.colour == spec.colour:
            gap = math.hypot(spec.cx - other.cx, spec.cy - other.cy) - spec.extent - other.extent
            if gap < _SAME_COLOUR_GAP_PX:
                return False
    return True


def sample_scene(rng: np.random.Generator, size: int, *, max_objects: int = 6) -> Scene:
    """Draw a random scene of 2 to ``max_objects`` objects whose every object stays visible.

    The scene picks 2-4 shapes and 2-4 colours and draws its objects from those, so attributes
    repeat (which the spatial, relational and multi-target expressions need).

    Args:
        rng: the only source of randomness (same state, same scene).
        size: image side in pixels (>= 48).
        max_objects: most objects in the scene.

    Returns:
        the :class:`Scene`.
    """
    min_px = min_visible_pixels(size)
    while True:
        n_objects = int(rng.integers(2, max_objects + 1))
        shapes = [str(s) for s in rng.choice(SHAPES, size=int(rng.integers(2, 5)), replace=False)]
        colours = [str(c) for c in rng.choice(list(COLOURS), size=int(rng.integers(2, 5)), replace=False)]
        specs: list[ObjectSpec] = []
        full: list[int] = []
        label = np.full(size * size, -1, dtype=np.int16)
        for _ in range(n_objects):
            for _attempt in range(25):
                spec = _sample_spec(rng, size, shapes, colours)
                if not _apart_from_same_colour(spec, specs):
                    continue
                rr, cc = rasterise(spec, size)
                if rr.size < min_px:
                    continue
                trial = label.copy()
                trial[rr * size + cc] = len(specs)
                visible = np.bincount(trial + 1, minlength=len(specs) + 2)[1:]
                if all(visible[j] >= max(MIN_VISIBLE_FRACTION * full[j], min_px) for j in range(len(specs))):
                    specs.append(spec)
                    full.append(int(rr.size))
                    label = trial
                    break
        if len(specs) >= 2:
            return draw_scene(specs, size, rng)
