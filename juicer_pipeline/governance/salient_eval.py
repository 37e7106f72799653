"""Salient-token inference: which patches of an evaluation image a student sees when only the
governor-salient ⌈ρN⌉ tokens are fed at test time (the paper's faster-inference axis)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .pruning import kept_on_grid
from .saliency import VisionPass


def salient_kept(governor, images_u8: torch.Tensor, saliency, student_grid: tuple[int, int],
                 batch_size: int = 256) -> torch.Tensor:
    """[n, ⌈ρN⌉] patch indices on the student's grid, from the governor's saliency map of each
    uint8 image (method and ρ from the saliency settings; resampled when the grids differ)."""
    vision = VisionPass(governor.model)
    try:
        maps = []
        for i in range(0, len(images_u8), batch_size):
            pil = [Image.fromarray(u8.permute(1, 2, 0).numpy()) for u8 in images_u8[i:i + batch_size]]
            x = torch.stack([governor.preprocess(im) for im in pil]).to(governor.device)
            maps.append(vision.run(x).saliency[saliency.method].numpy())
    finally:
        vision.close()
    kept = kept_on_grid(np.concatenate(maps), tuple(governor.grid), student_grid, saliency.rho)
    return torch.from_numpy(np.stack(kept).astype(np.int64))
