"""Scene sampling and rendering for the synthetic world.

A *scene* is the cheap, fully seeded description of one image (background, objects);
rendering turns it into pixels plus a per-pixel instance map (which object, if any, each pixel
shows: the ground truth that saliency and the dense evaluation are measured against). Sampling
and rendering are split so that a caption of another image (misaligned pairs) or a duplicate can
be produced without re-rendering.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .vocabulary import Vocabulary

# Background families. Drops and held-out sets use the first group; the governor's
# clean corpus uses the second, so the governor never sees the students' distribution.
DROP_BACKGROUNDS = ("noise", "gradient", "stripes")
CORPUS_BACKGROUNDS = ("checker", "blotches", "plaid")
BACKGROUND_WORDS = {
    "noise": "noisy", "gradient": "gradient", "stripes": "striped",
    "checker": "checkered", "blotches": "blotchy", "plaid": "plaid",
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cx: float
    cy: float
    size: float  # circumradius in pixels
    rotation: float  # radians


@dataclass(frozen=True)
class Scene:
    background: str
    bg_seed: int
    objects: tuple[SceneObject, ...]
    image_size: int
    n_specks: int = 0


@dataclass(frozen=True)
class SceneSpec:
    """What distribution a scene is drawn from."""

    image_size: int = 64
    backgrounds: tuple[str, ...] = DROP_BACKGROUNDS
    min_objects: int = 1
    max_objects: int = 3
    # Target share of the image area covered by object bounding boxes (summed over objects).
    object_coverage: float = 0.25
    size_jitter: tuple[float, float] = (0.8, 1.2)
    # 0: the scene's objects share object_coverage, so a lone object is as large as two together.
    # k: every object is as large as one of k objects sharing it, whatever the scene's count (a
    # lone object then shows at the size it has beside others).
    coverage_shared_by: int = 0
    specks: tuple[int, int] = (5, 30)
    # Probability that every object of a scene has one colour. Real objects of different classes
    # often share a colour (most are grey, white, black or brown), so colour alone cannot tell
    # captions apart and a student must learn shape.
    shared_colour: float = 0.0


@dataclass
class Rendered:
    image: Image.Image
    # uint8 HxW: 0 background, i + 1 where object i is the top-most object (later objects are drawn
    # over earlier ones, in the image as here)
    instances: np.ndarray
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x0, y0, x1, y1 (exclusive), unoccluded

    @property
    def mask(self) -> np.ndarray:
        """bool HxW, the union of all objects."""
        return self.instances > 0

    def object_mask(self, i: int) -> np.ndarray:
        """bool HxW, the pixels where object i is visible (what later objects leave of it)."""
        return self.instances == i + 1


OBJECT_PATCH_COVER = 0.1  # a patch holds an object when this share of its pixels does


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """float [grid_h * grid_w]: the share of each patch's pixels that `mask` (bool HxW) covers."""
    h, w = mask.shape
    gh, gw = grid
    cover = mask[: h - h % gh, : w - w % gw].reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3))
    return cover.reshape(-1)


def pixel_classes(scene: Scene, rendered: Rendered, shapes: tuple[str, ...]) -> np.ndarray:
    """uint8 HxW: 0 background, 1 + the index in `shapes` of the top-most object's shape."""
    lookup = np.array([0] + [shapes.index(o.shape) + 1 for o in scene.objects], np.uint8)
    return lookup[rendered.instances]


def sample_scene(rng: np.random.Generator, spec: SceneSpec, vocab: Vocabulary) -> Scene:
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    s = spec.image_size
    # Bounding box of a regular shape of circumradius r is about (2r)^2 * 0.8.
    area_each = spec.object_coverage * s * s / (spec.coverage_shared_by or n)
    objects: list[SceneObject] = []
    # drawn only when enabled, so that worlds without it keep their exact bytes
    one_colour = spec.shared_colour > 0 and rng.random() < spec.shared_colour
    for _ in range(n):
        r = math.sqrt(area_each / 3.2) * rng.uniform(*spec.size_jitter)
        r = float(np.clip(r, 4.0, s * 0.45))
        cx, cy = _place(rng, r, s, objects)
        shape, colour = str(rng.choice(vocab.shapes)), str(rng.choice(vocab.colour_names))
        objects.append(SceneObject(
            shape=shape, colour=objects[0].colour if one_colour and objects else colour,
            cx=cx, cy=cy, size=r, rotation=float(rng.uniform(0, 2 * math.pi)),
        ))
    return Scene(background=str(rng.choice(spec.backgrounds)), bg_seed=int(rng.integers(2**31)),
                 objects=tuple(objects), image_size=s, n_specks=int(rng.integers(*spec.specks)))


def _place(rng, r, s, others, tries: int = 30) -> tuple[float, float]:
    """Pick a centre inside the image that overlaps earlier objects as little as possible."""
    best, best_gap = None, -math.inf
    for _ in range(tries):
        cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
        gap = min((math.hypot(cx - o.cx, cy - o.cy) - r - o.size for o in others), default=math.inf)
        if gap >= 0:
            return float(cx), float(cy)
        if gap > best_gap:
            best, best_gap = (float(cx), float(cy)), gap
    return best


def render(scene: Scene, vocab: Vocabulary) -> Rendered:
    s = scene.image_size
    bg = _background(scene.background, np.random.default_rng(scene.bg_seed), s)
    image = Image.fromarray(bg, "RGB")
    _add_specks(image, np.random.default_rng(scene.bg_seed + 2), scene.n_specks)
    draw = ImageDraw.Draw(image)
    if len(scene.objects) > 255:
        raise ValueError(f"a scene holds at most 255 objects (uint8 instance ids), got {len(scene.objects)}")
    instances = Image.new("L", (s, s), 0)
    boxes = []
    rng = np.random.default_rng(scene.bg_seed + 1)
    for i, obj in enumerate(scene.objects):
        base = np.array(vocab.colours[obj.colour])
        colour = tuple(int(c) for c in np.clip(base + rng.integers(-20, 21, 3), 0, 255))
        mask = Image.new("L", (s, s), 0)
        _draw_shape(ImageDraw.Draw(mask), obj, 255)
        _draw_shape(draw, obj, colour)
        # the object's own mask pasted as its id: the same pixels the image got, in the same pass
        instances.paste(i + 1, mask=mask)
        box = mask.getbbox()
        if box is not None:
            boxes.append(box)
    return Rendered(image=image, instances=np.asarray(instances), boxes=boxes)


def _draw_shape(draw: ImageDraw.ImageDraw, o: SceneObject, fill) -> None:
    if o.shape == "circle":
        draw.ellipse(_bbox(o), fill=fill)
    elif o.shape == "ring":
        draw.ellipse(_bbox(o), outline=fill, width=max(2, round(o.size * 0.4)))
    else:
        draw.polygon(_polygon(o), fill=fill)


def _bbox(o: SceneObject) -> list[float]:
    return [o.cx - o.size, o.cy - o.size, o.cx + o.size, o.cy + o.size]


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Outline of a shape of circumradius 1, as (x, y) points."""
    def regular(n, radii=(1.0,), phase=-math.pi / 2):
        k = n * len(radii)
        return [(radii[i % len(radii)] * math.cos(phase + 2 * math.pi * i / k),
                 radii[i % len(radii)] * math.sin(phase + 2 * math.pi * i / k)) for i in range(k)]

    if shape == "square":
        return regular(4, phase=math.pi / 4)
    if shape == "triangle":
        return regular(3)
    if shape == "pentagon":
        return regular(5)
    if shape == "hexagon":
        return regular(6)
    if shape == "star":
        return regular(5, radii=(1.0, 0.42))
    if shape == "cross":
        a = 0.33
        return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                (-a, a), (-1, a), (-1, -a), (-a, -a)]
    if shape == "arrow":
        return [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)]
    if shape == "heart":
        pts = []
        for i in range(32):
            t = 2 * math.pi * i / 32
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def unit_area(shape: str) -> float:
    """The area of a shape of circumradius 1 (the ring: its band, drawn 0.4 of the radius wide)."""
    if shape == "circle":
        return math.pi
    if shape == "ring":
        return math.pi * (1 - 0.6 ** 2)
    pts = _unit_outline(shape)  # shoelace
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2


def drawn_area(o: SceneObject, image_size: int) -> int:
    """The pixels the object covers when drawn alone: its area as rasterised, edges included."""
    mask = Image.new("L", (image_size, image_size), 0)
    _draw_shape(ImageDraw.Draw(mask), o, 255)
    return int(np.count_nonzero(np.asarray(mask)))


def _polygon(o: SceneObject) -> list[tuple[float, float]]:
    c, s = math.cos(o.rotation), math.sin(o.rotation)
    return [(o.cx + o.size * (x * c - y * s), o.cy + o.size * (x * s + y * c))
            for x, y in _unit_outline(o.shape)]


# --- backgrounds: muted, cluttered, and carrying no object information -------------

def _muted(rng) -> np.ndarray:
    grey = rng.uniform(60, 190)
    return np.clip(grey + rng.uniform(-25, 25, 3), 0, 255)


def _background(kind: str, rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    a, b = _muted(rng), _muted(rng)
    if kind == "noise":
        img = a + rng.normal(0, 22, (s, s, 3))
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        t = (np.cos(ang) * xx + np.sin(ang) * yy)
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
        img = a + (b - a) * t[..., None] + rng.normal(0, 8, (s, s, 3))
    elif kind == "stripes":
        ang, freq = rng.uniform(0, math.pi), rng.uniform(4, 12)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy))
        img = a + (b - a) * 0.5 * t[..., None] + rng.normal(0, 6, (s, s, 3))
    elif kind == "checker":
        cell = int(rng.integers(3, 9))
        t = ((np.arange(s)[:, None] // cell + np.arange(s)[None, :] // cell) % 2).astype(np.float32)
        img = a + (b - a) * 0.5 * t[..., None] + rng.normal(0, 6, (s, s, 3))
    elif kind == "blotches":
        low = rng.uniform(0, 1, (6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((s, s), Image.BICUBIC)) / 255.0
        img = a + (b - a) * t[..., None] + rng.normal(0, 6, (s, s, 3))
    elif kind == "plaid":
        f1, f2 = rng.uniform(3, 8, 2)
        t = 0.25 * (2 + np.sin(2 * math.pi * f1 * xx) + np.sin(2 * math.pi * f2 * yy))
        img = a + (b - a) * t[..., None] + rng.normal(0, 6, (s, s, 3))
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(img, 0, 255).astype(np.uint8)


def _add_specks(image: Image.Image, rng: np.random.Generator, count: int) -> None:
    """Distractor specks: tiny dots smaller than a patch, coloured but not objects."""
    s = image.size[0]
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        x, y = rng.uniform(0, s, 2)
        r = rng.uniform(0.5, 1.3)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
