"""Decisions on stored saliency: which patches to keep (cheap; never runs a model)."""
from __future__ import annotations

import math

import numpy as np


def kept_count(n_patches: int, rho: float) -> int:
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    return min(n_patches, math.ceil(rho * n_patches - 1e-9))


def keep_top(saliency: np.ndarray, rho: float) -> np.ndarray:
    """Indices (ascending, so positions stay in raster order) of the ⌈ρN⌉ most salient patches.
    Ties break towards the lower index, so the result is deterministic."""
    saliency = np.asarray(saliency, dtype=np.float64)
    k = kept_count(saliency.size, rho)
    order = np.argsort(-saliency, kind="stable")[:k]
    return np.sort(order).astype(np.int16)


def keep_random(n_patches: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """FLIP's random patch drop at the same budget."""
    return np.sort(rng.choice(n_patches, kept_count(n_patches, rho), replace=False)).astype(np.int16)
