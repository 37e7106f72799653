"""Deterministic generation of drops, the governor's clean corpus and held-out evaluation sets.

Every image is drawn from its own generator seeded by (world seed, split, drop index, sample
index), so any sample can be re-created alone and the same seed always gives the same bytes.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .captions import CaptionCorruption, add_boilerplate, add_noise, true_caption
from .scenes import CORPUS_BACKGROUNDS, DROP_BACKGROUNDS, Scene, SceneSpec, render, sample_scene
from .vocabulary import Vocabulary, load_vocabulary
from .writers import make_writer

log = logging.getLogger(__name__)

# Disjoint seed spaces: a drop can never reproduce a corpus or evaluation image by chance.
SPLIT_DROP, SPLIT_RETRIEVAL, SPLIT_CLASSIFICATION, SPLIT_CORPUS, SPLIT_CORPUS_SINGLE, SPLIT_CORPUS_VALIDATION = 1, 2, 3, 4, 5, 6
SPLIT_CORPUS_CROPS = 7  # drop-like corpus scenes whose object crops train the governor's shape naming
# Labelled single objects drawn like the classification set but from seeds of their own: what a
# linear probe is fitted on, so the held-out set it is scored on stays unseen.
SPLIT_PROBE = 8
# The dense evaluation's held-out sets (world/dense_sets.py): scenes (segmentation and counting), the
# counting's area control, binding pairs.
SPLIT_DENSE_SCENES, SPLIT_DENSE_AREA_CONTROL, SPLIT_DENSE_BINDING = 9, 10, 11
BROKEN_KINDS = ("zero_byte", "truncated", "not_image", "missing_file")


@dataclass(frozen=True)
class DropConfig:
    n_samples: int = 1000
    seed: int = 0
    drop_index: int = 0
    image_size: int = 64
    object_coverage: float = 0.25
    # Probability that all objects of a scene share one colour (see SceneSpec): 0.9, so that a
    # student must tell shapes apart; at 0 colour alone solves most retrieval batches and students
    # stay at chance on zero-shot shape classification.
    shared_colour: float = 0.9
    # Range of the factor on each object's size (its circumradius), around the size that
    # object_coverage gives.
    size_jitter: tuple[float, float] = (0.8, 1.2)
    # Every object is sized as one of 2 sharing object_coverage, whatever the scene's count: an
    # object is no smaller for having company, as in real photos. 0: the scene's objects share it,
    # so a lone object has twice the area of each of two (the world before 2026-12-01). There,
    # students named shapes well only at the lone objects' size, never seen in the held-out
    # classification set, whose single objects have the size of one of two (benchmarks/student_arch.py).
    coverage_shared_by: int = 2
    captions: CaptionCorruption = field(default_factory=CaptionCorruption)
    duplicate_rate: float = 0.02
    broken_rate: float = 0.01
    empty_caption_rate: float = 0.005
    format: str = "folder"  # folder | wds
    manifest_format: str = "parquet"
    image_format: str = "jpg"  # jpg | png
    shard_size: int = 1000

    def __post_init__(self):
        for name in ("duplicate_rate", "broken_rate", "empty_caption_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        if self.coverage_shared_by < 0:
            raise ValueError(f"coverage_shared_by must be >= 0 (0: shared by the scene's objects), "
                             f"got {self.coverage_shared_by}")
        low, high = self.size_jitter
        if not 0 < low <= high:
            raise ValueError(f"size_jitter must be (low, high) with 0 < low <= high, got {self.size_jitter}")

    @property
    def spec(self) -> SceneSpec:
        return SceneSpec(image_size=self.image_size, backgrounds=DROP_BACKGROUNDS,
                         object_coverage=self.object_coverage, shared_colour=self.shared_colour,
                         size_jitter=self.size_jitter, coverage_shared_by=self.coverage_shared_by)


@dataclass(frozen=True)
class GenerationReport:
    path: Path
    n_samples: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.n_samples / max(self.seconds, 1e-9)


def _rng(seed: int, split: int, drop_index: int, i: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, drop_index, i, stream])


def encode_image(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        return _jpeg_bytes(image, 92)
    elif fmt == "png":
        image.save(buf, "PNG")
    else:
        raise ValueError(f"image_format must be jpg or png, not {fmt!r}")
    return buf.getvalue()


# The governor's validation and calibration images are JPEGs of this quality, as web images are.
VALIDATION_JPEG_QUALITY = 90


def jpeg_roundtrip(image, quality: int):
    """The image as a web JPEG of this quality would decode: drops arrive as JPEGs, whose chroma
    subsampling and block artefacts change a small object's edges and colours."""
    from PIL import Image

    return Image.open(io.BytesIO(_jpeg_bytes(image, quality))).convert("RGB")


def _jpeg_bytes(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def _truth_row(sample_id: str, image_name: str, scene: Scene, rendered, caption_true: str, **extra) -> dict:
    objects = [
        {"shape": o.shape, "colour": o.colour, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3],
         "radius": o.size, "rotation": o.rotation}
        for o, b in zip(scene.objects, rendered.boxes)
    ]
    return {
        "sample_id": sample_id, "image": image_name, "true_caption": caption_true,
        "classes": sorted({o.shape for o in scene.objects}), "objects": objects,
        "width": scene.image_size, "height": scene.image_size,
        "object_mask": np.packbits(rendered.mask).tobytes(),
        "object_pixel_share": float(rendered.mask.mean()), **extra,
    }


def generate_drop(out_dir: Path, cfg: DropConfig, vocab: Vocabulary | None = None) -> GenerationReport:
    """Write one corrupted, web-like drop plus its `_truth.parquet` (never read by the pipeline)."""
    vocab = vocab or load_vocabulary()
    name = Path(out_dir).name
    writer = make_writer(Path(out_dir), cfg.format, cfg.manifest_format, cfg.shard_size)
    t0 = time.perf_counter()
    for i, s in enumerate(drop_samples(cfg, name, vocab)):
        image_bytes = encode_image(s.rendered.image, cfg.image_format)
        if s.broken is not None:
            image_bytes = _break(image_bytes, s.broken)
            s.corruptions.append(f"broken:{s.broken}")
        image_name = f"{s.sample_id}.{cfg.image_format}"
        writer.add(s.sample_id, image_name, image_bytes, s.caption, url=f"https://example.org/{name}/{i}")
        writer.add_truth(_truth_row(s.sample_id, image_name, s.scene, s.rendered, s.clean, caption=s.caption,
                                    corruptions=s.corruptions, **s.caption_stages,
                                    duplicate_of=f"{name}-{s.source:06d}" if s.source != i else None))
        if (i + 1) % 2000 == 0:
            log.info("drop %s: %d/%d samples", name, i + 1, cfg.n_samples)
    path = writer.finish()
    return GenerationReport(path, cfg.n_samples, time.perf_counter() - t0)


@dataclass
class DropSample:
    sample_id: str
    scene: Scene
    rendered: object
    clean: str  # the true caption
    caption: str  # what the web would carry
    corruptions: list[str]
    source: int  # index of the sample this one duplicates (its own index otherwise)
    broken: str | None  # how the file will be broken, if it will
    # The caption before each surface damage, for truth only: see `_corrupt_caption`.
    caption_stages: dict = field(default_factory=dict)


def drop_samples(cfg: DropConfig, name: str, vocab: Vocabulary):
    """The drop's samples in memory, in order: what `generate_drop` writes, and what benchmarks
    that train directly on world data use without going through files."""
    spec = cfg.spec
    scene_of = lambda j: sample_scene(_rng(cfg.seed, SPLIT_DROP, cfg.drop_index, j, 0), spec, vocab)  # noqa: E731
    for i in range(cfg.n_samples):
        rng = _rng(cfg.seed, SPLIT_DROP, cfg.drop_index, i, 1)
        corruptions: list[str] = []
        scene, source = scene_of(i), i
        if i > 0 and rng.random() < cfg.duplicate_rate:
            source = int(rng.integers(0, i))
            scene = scene_of(source)
            corruptions.append("duplicate")
        rendered = render(scene, vocab)
        clean = true_caption(scene, _rng(cfg.seed, SPLIT_DROP, cfg.drop_index, source, 2))
        caption, stages = _corrupt_caption(scene, clean, rng, cfg, scene_of, i, corruptions)
        broken = None
        if rng.random() < cfg.broken_rate:
            broken = BROKEN_KINDS[int(rng.integers(len(BROKEN_KINDS)))]
        yield DropSample(f"{name}-{i:06d}", scene, rendered, clean, caption, corruptions, source, broken, stages)


def _corrupt_caption(scene, clean, rng, cfg, scene_of, i, corruptions) -> tuple[str, dict]:
    """(web caption, its earlier stages). The stages let the truth report score rectification
    per damage: `caption_content` is what the caption says (after misalignment or omission, which
    no text rule can undo), `caption_before_boilerplate` that text after the noise. Tags name the
    noise kind (`noise:typos`, ...); the rng draws are those of the untagged world, so a seed
    still gives the same bytes."""
    c = cfg.captions
    caption = clean
    if rng.random() < c.misaligned and cfg.n_samples > 1:
        other = int(rng.integers(0, cfg.n_samples - 1))
        other += other >= i
        caption = true_caption(scene_of(other), rng)
        corruptions.append("misaligned")
    elif len(scene.objects) > 1 and rng.random() < c.omit:
        keep = list(scene.objects)
        keep.pop(int(rng.integers(len(keep))))
        caption = true_caption(scene, rng, objects=keep)
        corruptions.append("omitted_object")
    stages = {"caption_content": caption}
    if rng.random() < c.noise:
        caption, kind = add_noise(caption, rng)
        corruptions.append(f"noise:{kind}")
    stages["caption_before_boilerplate"] = caption
    if rng.random() < c.boilerplate:
        caption = add_boilerplate(caption, rng)
        corruptions.append("boilerplate")
    if rng.random() < cfg.empty_caption_rate:
        caption = str(rng.choice(["", "   ", "\n"]))
        corruptions.append("empty_caption")
    return caption, stages


def _break(image_bytes: bytes, kind: str) -> bytes | None:
    if kind == "zero_byte":
        return b""
    if kind == "truncated":
        return image_bytes[: len(image_bytes) // 2]
    if kind == "not_image":
        return b"<html><body>404 Not Found</body></html>"
    return None  # missing_file: the manifest names a file that is not there


def generate_eval_set(out_dir: Path, kind: str, n_samples: int = 2000, seed: int = 0,
                      image_size: int = 64, object_coverage: float = 0.25,
                      vocab: Vocabulary | None = None,
                      shared_colour: float = DropConfig.shared_colour,
                      coverage_shared_by: int = DropConfig.coverage_shared_by) -> GenerationReport:
    """Clean held-out sets: `retrieval` (drop distribution, true captions) or
    `classification` (single-object images with a `label` column)."""
    vocab = vocab or load_vocabulary()
    split, spec = eval_spec(kind, image_size, object_coverage, shared_colour, coverage_shared_by)
    return _generate_clean(Path(out_dir), split, spec, n_samples, seed, vocab,
                           with_label=kind == "classification")


def generate_corpus(out_dir: Path, n_samples: int = 20000, seed: int = 0, image_size: int = 64,
                    vocab: Vocabulary | None = None) -> GenerationReport:
    """The governor's clean pretraining corpus, from a disjoint distribution: other background
    families, larger and more varied objects, its own seed space."""
    vocab = vocab or load_vocabulary()
    return _generate_clean(Path(out_dir), SPLIT_CORPUS, corpus_spec(image_size), n_samples, seed, vocab,
                           with_label=True)


def iter_clean_samples(split: int, spec: SceneSpec, n_samples: int, seed: int, vocab: Vocabulary):
    """(scene, rendered, true caption) for clean sets, in memory; the writers below use it too."""
    for i in range(n_samples):
        scene = sample_scene(_rng(seed, split, 0, i, 0), spec, vocab)
        yield scene, render(scene, vocab), true_caption(scene, _rng(seed, split, 0, i, 2))


def eval_spec(kind: str, image_size: int = 64, object_coverage: float = 0.25,
              shared_colour: float = DropConfig.shared_colour,
              coverage_shared_by: int = DropConfig.coverage_shared_by) -> tuple[int, SceneSpec]:
    if kind == "retrieval":
        return SPLIT_RETRIEVAL, SceneSpec(image_size=image_size, object_coverage=object_coverage,
                                          shared_colour=shared_colour, coverage_shared_by=coverage_shared_by)
    if kind == "classification":
        # A single object of the same size as one object of a two-object drop image (whatever
        # coverage_shared_by: the set and its bytes stay the same across worlds).
        return SPLIT_CLASSIFICATION, SceneSpec(image_size=image_size, min_objects=1, max_objects=1,
                                               object_coverage=object_coverage / 2)
    raise ValueError(f"eval set kind must be retrieval or classification, not {kind!r}")


def corpus_spec(image_size: int = 64, single_object: bool = False) -> SceneSpec:
    """The governor's corpus: other backgrounds, larger and more varied objects."""
    return SceneSpec(image_size=image_size, backgrounds=CORPUS_BACKGROUNDS, object_coverage=0.35,
                     size_jitter=(0.6, 1.4), max_objects=1 if single_object else 3)


def drop_like_corpus_spec(image_size: int = 64, object_coverage: float = 0.25,
                          coverage_shared_by: int = 0) -> SceneSpec:
    """Scenes with the drops' object sizes and counts but the corpus's own backgrounds: what the
    governor's crop training, its validation and τ calibration use, so that a crop of a drop object
    is in distribution without the governor ever seeing the drops' distribution itself. By default
    its objects share the coverage (coverage_shared_by 0), as drops did when governor stage 2 was
    trained and as its corpus validation still does, so that the model card's commands reproduce
    it. `coverage_shared_by` 2 sizes them as today's drops do (`DropConfig`): stage 3's crop scenes
    and the τ calibration (`world/calibration.py`) use that."""
    return SceneSpec(image_size=image_size, backgrounds=CORPUS_BACKGROUNDS, object_coverage=object_coverage,
                     coverage_shared_by=coverage_shared_by)


def _generate_clean(out_dir, split, spec, n_samples, seed, vocab, with_label) -> GenerationReport:
    writer = make_writer(out_dir, "folder", "parquet")
    name = out_dir.name
    t0 = time.perf_counter()
    for i, (scene, rendered, caption) in enumerate(iter_clean_samples(split, spec, n_samples, seed, vocab)):
        sample_id = f"{name}-{i:06d}"
        image_name = f"{sample_id}.png"
        label = scene.objects[0].shape if with_label and len(scene.objects) == 1 else None
        writer.add(sample_id, image_name, encode_image(rendered.image, "png"), caption,
                   label=label if with_label else None)
        writer.add_truth(_truth_row(sample_id, image_name, scene, rendered, caption))
    path = writer.finish()
    return GenerationReport(path, n_samples, time.perf_counter() - t0)


def demo_drop_configs(n_drops: int = 2, n_samples: int = 1500, seed: int = 0) -> list[DropConfig]:
    """The demo world's drops: one folder drop with a parquet manifest, one WebDataset drop."""
    base = DropConfig(n_samples=n_samples, seed=seed)
    formats = ["folder", "wds", "folder"]
    return [replace(base, drop_index=k, format=formats[k % len(formats)],
                    manifest_format="parquet" if k != 2 else "jsonl") for k in range(n_drops)]
