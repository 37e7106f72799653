"""Held-out sets for the dense evaluation of a student (issue 34), generated in memory.

Each set is drawn from seed spaces of its own (splits no drop, corpus or other held-out set uses),
so no image of it can have been seen in training. What each holds:

- scenes: 1–3 separate objects of the drops' size, a third of the images each, with the per-pixel
  class (0 background, 1 + the shape's index in the vocabulary) of the top-most object and the
  count. They serve segmentation and counting both, so one forward pass of a student feeds both;
  since every object has the drops' size, the total object area grows with the count;
- area control: the same, but the objects' areas are drawn to add up to the same total for every
  count, so area alone does not tell it;
- binding: two-object scenes rendered twice with the two colours swapped, and their two captions
  (Winoground-style: the captions hold the same words in another order).

A probe is fitted on one part of a set and scored on another (`FIT`, `SCORE`), drawn from
different seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .captions import true_caption
from .generate import SPLIT_DENSE_AREA_CONTROL, SPLIT_DENSE_BINDING, SPLIT_DENSE_SCENES, DropConfig, _rng
from .scenes import (Scene, SceneObject, SceneSpec, drawn_area, pixel_classes, render, sample_scene,
                     unit_area)
from .vocabulary import Vocabulary, load_vocabulary

FIT, SCORE = 0, 1  # the parts of a set, in the drop-index slot of the seed
COUNTS = (1, 2, 3)
# The control's total object area, as a share of the image: about that of two drop-sized objects.
CONTROL_AREA_SHARE = 0.16
_TRIES = 200  # scene draws before a scene with separate objects is given up


@dataclass(frozen=True)
class DenseSetSizes:
    """904 images in all by default: a student's dense evaluation then takes seconds on a CPU."""

    scenes: int = 192  # images per part (a segmentation probe's fit patches are subsampled to 4096)
    area_control: int = 160  # images per part
    binding: int = 100  # pairs


@dataclass
class SceneSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    pixel_classes: np.ndarray  # uint8 [N, H, W]: 0 background, 1 + shape index
    counts: np.ndarray  # int [N], in COUNTS
    object_pixels: np.ndarray  # int [N]: the union mask's area, what the control holds constant
    scenes: list[Scene]


@dataclass
class BindingSet:
    images: np.ndarray  # uint8 [N, 2, H, W, 3]: the scene, then the same scene with colours swapped
    captions: list[tuple[str, str]]  # each image's true caption, in the same order
    scenes: list[tuple[Scene, Scene]]


@dataclass
class DenseSets:
    class_names: tuple[str, ...]  # the shapes: pixel class c + 1 is class_names[c]
    scenes: dict[int, SceneSet]  # FIT, SCORE
    area_control: dict[int, SceneSet]
    binding: BindingSet


def dense_sets(seed: int = 0, sizes: DenseSetSizes = DenseSetSizes(), world: DropConfig = DropConfig(),
               vocab: Vocabulary | None = None) -> DenseSets:
    """Every dense set, with the objects, backgrounds and colours of `world`'s drops."""
    vocab = vocab or load_vocabulary()
    spec = world.spec
    parts = (FIT, SCORE)
    return DenseSets(
        class_names=vocab.shapes,
        scenes={p: scene_set(spec, sizes.scenes, seed, p, vocab, area_control=False) for p in parts},
        area_control={p: scene_set(spec, sizes.area_control, seed, p, vocab, area_control=True) for p in parts},
        binding=binding_set(spec, sizes.binding, seed, vocab))


def scene_set(spec: SceneSpec, n: int, seed: int, part: int, vocab: Vocabulary, area_control: bool) -> SceneSet:
    split = SPLIT_DENSE_AREA_CONTROL if area_control else SPLIT_DENSE_SCENES
    images, classes, counts, areas, scenes = [], [], [], [], []
    for i in range(n):
        count = COUNTS[i % len(COUNTS)]
        one = replace(spec, min_objects=count, max_objects=count)
        scene = _separated_scene(lambda k: _draw_scene(_rng(seed, split, part, i, k), one, vocab, area_control))
        rendered = render(scene, vocab)
        images.append(np.asarray(rendered.image))
        classes.append(pixel_classes(scene, rendered, vocab.shapes))
        counts.append(count)
        areas.append(int(rendered.mask.sum()))
        scenes.append(scene)
    return SceneSet(np.stack(images), np.stack(classes), np.array(counts), np.array(areas), scenes)


def _draw_scene(rng: np.random.Generator, spec: SceneSpec, vocab: Vocabulary, area_control: bool) -> Scene:
    scene = sample_scene(rng, spec, vocab)
    if not area_control:
        return scene
    # Each object's share of the fixed total is jittered, and its circumradius set so that it covers
    # that share: the sizes vary, their sum does not.
    weights = rng.uniform(*spec.size_jitter, len(scene.objects))
    total = CONTROL_AREA_SHARE * spec.image_size ** 2
    objects: list[SceneObject] = []
    for o, w in zip(scene.objects, weights):
        r = _radius_covering(o, total * w / weights.sum(), spec.image_size)
        cx, cy = _free_centre(rng, r, spec.image_size, objects)
        objects.append(replace(o, size=r, cx=cx, cy=cy))
    return replace(scene, objects=tuple(objects))


def _radius_covering(o: SceneObject, pixels: float, image_size: int) -> float:
    """The circumradius at which the object's shape covers `pixels` as drawn. The geometric area
    alone leaves the edge pixels a rasteriser adds, more for several small objects than for one
    large one, which would let the total area tell the count again; one rescaling by the drawn
    area removes most of that."""
    r = math.sqrt(pixels / unit_area(o.shape))
    probe = replace(o, size=r, cx=image_size / 2, cy=image_size / 2)
    return r * math.sqrt(pixels / max(drawn_area(probe, image_size), 1))


def _free_centre(rng: np.random.Generator, r: float, s: int, others: list[SceneObject]) -> tuple[float, float]:
    """A centre whose circumcircle overlaps no earlier object's, if one is found in a few tries."""
    for _ in range(30):
        cx, cy = rng.uniform(r, s - r, 2)
        if all(math.hypot(cx - o.cx, cy - o.cy) >= r + o.size for o in others):
            break
    return float(cx), float(cy)


def objects_separate(objects) -> bool:
    """No two objects' circumcircles overlap: each object is whole, so a count is unambiguous."""
    return all(math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.size + b.size
               for i, a in enumerate(objects) for b in objects[i + 1:])


def _separated_scene(draw) -> Scene:
    """The first of draw(0), draw(1), … whose objects lie apart."""
    for k in range(_TRIES):
        scene = draw(k)
        if objects_separate(scene.objects):
            return scene
    raise RuntimeError(f"no scene with separate objects in {_TRIES} draws: objects too large for the image")


def binding_set(spec: SceneSpec, n: int, seed: int, vocab: Vocabulary) -> BindingSet:
    two = replace(spec, min_objects=2, max_objects=2)
    images, captions, scenes = [], [], []
    for i in range(n):
        scene = _separated_scene(lambda k: _binding_scene(_rng(seed, SPLIT_DENSE_BINDING, 0, i, k), two, vocab))
        a, b = scene.objects
        pair = (scene, replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour))))
        images.append(np.stack([np.asarray(render(s, vocab).image) for s in pair]))
        # one caption template for both, so the captions differ only in where the colours go
        captions.append(tuple(true_caption(s, _rng(seed, SPLIT_DENSE_BINDING, 0, i, _TRIES)) for s in pair))
        scenes.append(pair)
    return BindingSet(np.stack(images), captions, scenes)


def _binding_scene(rng: np.random.Generator, spec: SceneSpec, vocab: Vocabulary) -> Scene:
    """Two objects of different shapes and different colours (else a swap changes nothing)."""
    scene = sample_scene(rng, spec, vocab)
    shapes = rng.choice(len(vocab.shapes), 2, replace=False)
    colours = rng.choice(len(vocab.colour_names), 2, replace=False)
    return replace(scene, objects=tuple(replace(o, shape=vocab.shapes[s], colour=vocab.colour_names[c])
                                        for o, s, c in zip(scene.objects, shapes, colours)))
