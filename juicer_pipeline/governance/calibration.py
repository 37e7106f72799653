"""Calibrating the class threshold τ on a labelled calibration set (never on drop truth).

The method takes the set as input: images and the classes in each. The world governor's set is
its corpus validation split (`world/calibration.py`); a governor without one uses the configured
fallback τ and says so.
"""
from __future__ import annotations

import numpy as np
import torch

from .classes import CropPlan, calibrate_addition_tau, calibrate_tau, region_class_scores
from .saliency import VisionPass
from .vision import score_batch

def validation_scores(fm, images, class_emb: torch.Tensor, method: str, plan: CropPlan,
                      batch_size: int = 256, abstain_emb: torch.Tensor | None = None) -> tuple[np.ndarray, list]:
    """([N, C] class scores, per image its regions' probabilities) of the images, computed exactly
    as `extracted_classes` computes them."""
    vision = VisionPass(fm.model)
    scores, regions = [], []
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            out = score_batch(fm, vision, batch)
            s, r = region_class_scores(fm, batch, out.saliency[method].numpy(), fm.grid, class_emb, plan,
                                       batch_size, abstain_emb)
            scores.append(s)
            regions += r
    finally:
        vision.close()
    return (np.concatenate(scores) if scores else np.zeros((0, len(class_emb)), np.float32)), regions


def calibrate_governor(fm, class_emb: torch.Tensor, images, truth: list[set[int]], method: str, plan: CropPlan,
                       target_precision: float, k: int, batch_size: int = 256,
                       abstain_emb: torch.Tensor | None = None, *, addition: tuple[float, float]) -> dict:
    """τ on a labelled calibration set: `images` (PIL) and, per image, the ids of the classes in it;
    and `addition`, the per-class τ for what enrichment adds to captions (`calibrate_addition_tau`
    at `addition` = (most false share, claim), never below the class τ)."""
    scores, regions = validation_scores(fm, images, class_emb, method, plan, batch_size, abstain_emb)
    classes = calibrate_tau(scores, truth, target_precision, k=k)
    # what is added to a caption is at least as sure as an extracted class
    return {"calibrated": True, "n_images": len(images), "target_precision": target_precision,
            "abstain_class": abstain_emb is not None, **classes,
            "addition": calibrate_addition_tau(regions, truth, *addition, k=k, floor=classes["tau"])}
