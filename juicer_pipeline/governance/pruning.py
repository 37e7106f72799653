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


def resample_saliency(maps: np.ndarray, from_grid: tuple[int, int], to_grid: tuple[int, int]) -> np.ndarray:
    """Saliency maps [n, gh*gw] on one patch grid as maps [n, th*tw] on another: each target patch
    gets the area-weighted mean of the source patches it overlaps (bilinear when upsampling)."""
    import torch
    import torch.nn.functional as F

    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[1] != from_grid[0] * from_grid[1]:
        raise ValueError(f"saliency maps have {maps.shape[1]} values, not the {from_grid[0]}x{from_grid[1]} grid's")
    t = torch.from_numpy(maps).view(-1, 1, *from_grid)
    shrink = to_grid[0] <= from_grid[0] and to_grid[1] <= from_grid[1]
    out = F.interpolate(t, size=to_grid, mode="area") if shrink else \
        F.interpolate(t, size=to_grid, mode="bilinear", align_corners=False)
    return out.reshape(len(maps), -1).numpy()


def kept_on_grid(maps: np.ndarray, from_grid: tuple[int, int], to_grid: tuple[int, int], rho: float) -> list[np.ndarray]:
    """The top ⌈ρN⌉ patches of a student's grid (N = its patch count), from saliency stored on the
    governor's grid."""
    return [keep_top(m, rho) for m in resample_saliency(maps, from_grid, to_grid)]
