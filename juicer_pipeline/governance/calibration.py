"""Calibrating the class threshold τ on the governor's own corpus (never on drop truth).

The world governor's corpus is labelled by construction (its clean captions name every object),
so a held-back validation split of it — its own seed space, never trained on — tells which τ
gives the target precision. A real pretrained governor has no such split here; it uses the
configured fallback τ and says so.
"""
from __future__ import annotations

import numpy as np
import torch

from ..world.generate import SPLIT_CORPUS_VALIDATION, corpus_spec, iter_clean_samples
from ..world.vocabulary import load_vocabulary
from .classes import calibrate_tau, region_class_scores
from .saliency import VisionPass
from .vision import score_batch


def calibrate_world_governor(fm, class_emb: torch.Tensor, method: str, region_fraction: float,
                             max_regions: int, target_precision: float, k: int, n_images: int = 600,
                             seed: int = 0, batch_size: int = 256) -> dict:
    vocab = load_vocabulary()
    images, truth = [], []
    spec = corpus_spec(fm.model.visual.image_size[0] if isinstance(fm.model.visual.image_size, tuple)
                       else fm.model.visual.image_size)
    for scene, rendered, _ in iter_clean_samples(SPLIT_CORPUS_VALIDATION, spec, n_images, seed, vocab):
        images.append(rendered.image)
        truth.append({vocab.shapes.index(o.shape) for o in scene.objects})
    vision = VisionPass(fm.model)
    try:
        scores = []
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            out = score_batch(fm, vision, batch)
            s, _ = region_class_scores(fm, batch, out.saliency[method].numpy(), fm.grid, class_emb,
                                       region_fraction, max_regions, batch_size)
            scores.append(s)
    finally:
        vision.close()
    result = calibrate_tau(np.concatenate(scores), truth, target_precision, k=k)
    return {"calibrated": True, "split": "world corpus validation (own seed space)", "n_images": n_images,
            "target_precision": target_precision, **result}
