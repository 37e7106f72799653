"""Calibrating the class threshold τ on the governor's own corpus (never on drop truth).

The world governor's corpus is labelled by construction (its clean captions name every object),
so a held-back validation split of it — its own seed space, never trained on — tells which τ
gives the target precision. The split looks like drops (their object sizes and counts, with the
corpus's own backgrounds) so that τ transfers to drops. A real pretrained governor has no such
split here; it uses the configured fallback τ and says so.
"""
from __future__ import annotations

import numpy as np
import torch

from ..world.generate import (SPLIT_CORPUS_VALIDATION, VALIDATION_JPEG_QUALITY, drop_like_corpus_spec,
                              iter_clean_samples, jpeg_roundtrip)
from ..world.vocabulary import load_vocabulary
from .classes import CropPlan, calibrate_tau, region_class_scores
from .saliency import VisionPass
from .vision import score_batch

# Object coverages of the calibration scenes: the drops' default (0.25) and sparser and denser ones.
CALIBRATION_COVERAGES = (0.15, 0.25, 0.35)


def world_validation_set(image_size: int, n_images: int, seed: int = 0):
    """(images, true class ids) from the governor's corpus validation split, drop-like scenes."""
    vocab = load_vocabulary()
    images, truth = [], []
    per = -(-n_images // len(CALIBRATION_COVERAGES))
    for c, coverage in enumerate(CALIBRATION_COVERAGES):
        spec = drop_like_corpus_spec(image_size, coverage)
        for scene, rendered, _ in iter_clean_samples(SPLIT_CORPUS_VALIDATION, spec, per, seed * 10 + c, vocab):
            images.append(jpeg_roundtrip(rendered.image, VALIDATION_JPEG_QUALITY))
            truth.append({vocab.shapes.index(o.shape) for o in scene.objects})
    return images[:n_images], truth[:n_images]


def validation_scores(fm, images, class_emb: torch.Tensor, method: str, plan: CropPlan,
                      batch_size: int = 256, abstain_emb: torch.Tensor | None = None) -> np.ndarray:
    """[N, C] class scores of the images, computed exactly as `extracted_classes` computes them."""
    vision = VisionPass(fm.model)
    try:
        scores = []
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            out = score_batch(fm, vision, batch)
            s, _ = region_class_scores(fm, batch, out.saliency[method].numpy(), fm.grid, class_emb, plan,
                                       batch_size, abstain_emb)
            scores.append(s)
    finally:
        vision.close()
    return np.concatenate(scores) if scores else np.zeros((0, len(class_emb)), np.float32)


def calibrate_world_governor(fm, class_emb: torch.Tensor, method: str, plan: CropPlan, target_precision: float,
                             k: int, n_images: int = 600, seed: int = 0, batch_size: int = 256,
                             abstain_emb: torch.Tensor | None = None) -> dict:
    size = fm.model.visual.image_size
    images, truth = world_validation_set(size[0] if isinstance(size, tuple) else size, n_images, seed)
    scores = validation_scores(fm, images, class_emb, method, plan, batch_size, abstain_emb)
    result = calibrate_tau(scores, truth, target_precision, k=k)
    return {"calibrated": True, "split": "world corpus validation (own seed space, drop-like scenes)",
            "n_images": len(images), "target_precision": target_precision,
            "abstain_class": abstain_emb is not None, **result}
