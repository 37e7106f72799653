"""Vocabulary-swap hard negatives: a caption with one class name replaced by another.

With only in-batch negatives, a student can match most captions to their images by colour alone
and never learn shape (measured: zero-shot shape classification stays near chance). A caption
whose one class name is swapped ("a red star and a red heart" → "a red star and a red cross")
differs from the positive only in that name, so the image→text loss can be lowered only by
seeing the object. This is NegCLIP's recipe (Yuksekgonul et al., 2023), built from the
vocabulary the pipeline already has (no ground truth), and every recipe gets it alike: it is
computed from whatever caption the recipe trains on.
"""
from __future__ import annotations

import re

import numpy as np


def class_name_pattern(class_names: list[str]) -> re.Pattern:
    """Whole-word, case-insensitive matches of any class name; longer names first, so that a
    multi-word name wins over a name it contains."""
    names = sorted({n.strip() for n in class_names if n.strip()}, key=len, reverse=True)
    if len(names) < 2:
        raise ValueError("swap negatives need at least two class names")
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)


def swap_negatives(captions: list[str], class_names: list[str], seed: int = 0) -> list[str | None]:
    """For each caption, the caption with one of its class names (chosen at random) replaced by a
    different class name; None when the caption names no class."""
    pattern = class_name_pattern(class_names)
    names = sorted({n.strip() for n in class_names if n.strip()})
    rng = np.random.default_rng(seed)
    out: list[str | None] = []
    for caption in captions:
        hits = list(pattern.finditer(caption or ""))
        if not hits:
            out.append(None)
            continue
        hit = hits[int(rng.integers(len(hits)))]
        others = [n for n in names if n.lower() != hit.group(0).lower()]
        swap = others[int(rng.integers(len(others)))]
        out.append(caption[:hit.start()] + swap + caption[hit.end():])
    return out


def swap_negative_tokens(captions: list[str], class_names: list[str], tokenizer, seed: int = 0):
    """`swap_negatives` tokenised, as `TrainData` holds them: (tokens [N, L], has_negative [N])."""
    import torch

    negatives = swap_negatives(captions, class_names, seed)
    return tokenizer([n or "" for n in negatives]), torch.tensor([n is not None for n in negatives])
