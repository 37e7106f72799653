"""The world governor's calibration split: drop-like scenes of its own corpus (never drop truth).

The world governor's corpus is labelled by construction (its clean captions name every object),
so a held-back validation split of it — its own seed space, never trained on — tells which τ
gives the target precision. The split looks like drops (their object sizes and counts, with the
corpus's own backgrounds) so that τ transfers to drops: its objects are sized as today's drops
size theirs (`DropConfig.coverage_shared_by`), not as the governor's older crop corpus did.
"""
from __future__ import annotations

import torch

from ..governance.calibration import calibrate_governor
from ..governance.classes import CropPlan
from .generate import (SPLIT_CORPUS_VALIDATION, VALIDATION_JPEG_QUALITY, DropConfig, drop_like_corpus_spec,
                       iter_clean_samples, jpeg_roundtrip)
from .vocabulary import load_vocabulary

# Object coverages of the calibration scenes: the drops' default (0.25) and sparser and denser ones.
CALIBRATION_COVERAGES = (0.15, 0.25, 0.35)


def world_validation_set(image_size: int, n_images: int, seed: int = 0,
                         coverage_shared_by: int = DropConfig.coverage_shared_by):
    """(images, true class ids) from the governor's corpus validation split, drop-like scenes."""
    vocab = load_vocabulary()
    images, truth = [], []
    per = -(-n_images // len(CALIBRATION_COVERAGES))
    for c, coverage in enumerate(CALIBRATION_COVERAGES):
        spec = drop_like_corpus_spec(image_size, coverage, coverage_shared_by)
        for scene, rendered, _ in iter_clean_samples(SPLIT_CORPUS_VALIDATION, spec, per, seed * 10 + c, vocab):
            images.append(jpeg_roundtrip(rendered.image, VALIDATION_JPEG_QUALITY))
            truth.append({vocab.shapes.index(o.shape) for o in scene.objects})
    return images[:n_images], truth[:n_images]


def calibrate_world_governor(fm, class_emb: torch.Tensor, method: str, plan: CropPlan, target_precision: float,
                             k: int, n_images: int = 600, seed: int = 0, batch_size: int = 256,
                             abstain_emb: torch.Tensor | None = None, *, addition: tuple[float, float]) -> dict:
    size = fm.model.visual.image_size
    images, truth = world_validation_set(size[0] if isinstance(size, tuple) else size, n_images, seed)
    result = calibrate_governor(fm, class_emb, images, truth, method, plan, target_precision, k, batch_size, abstain_emb,
                                addition=addition)
    return {"split": "world corpus validation (own seed space, drop-like scenes)", **result}
