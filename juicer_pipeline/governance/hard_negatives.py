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
import torch


def class_name_pattern(class_names: list[str]) -> re.Pattern:
    """Whole-word, case-insensitive matches of any class name, singular or with a plural "s"/"es"
    ("three purple rings"); longer names first, so that a multi-word name wins over a name it
    contains."""
    names = sorted({n.strip() for n in class_names if n.strip()}, key=len, reverse=True)
    if len(names) < 2:
        raise ValueError("swap negatives need at least two class names")
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")(es|s)?\b", re.IGNORECASE)


def plural(name: str) -> str:
    """The regular English plural (irregular ones are rare among class names and only make the
    negative a little less fluent)."""
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def swap_negatives(captions: list[str], class_names: list[str], seed: int = 0) -> list[str | None]:
    """For each caption, the caption with one of its class names (chosen at random) replaced by a
    different class name, in the same number; None when the caption names no class."""
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
        others = [n for n in names if n.lower() != hit.group(1).lower()]
        swap = others[int(rng.integers(len(others)))]
        out.append(caption[:hit.start()] + (plural(swap) if hit.group(2) else swap) + caption[hit.end():])
    return out


def swap_negative_tokens(captions: list[str], class_names: list[str], tokenizer, seed: int = 0):
    """`swap_negatives` tokenised, as `TrainData` holds them: (tokens [N, L], has_negative [N]).

    A negative whose swapped name lies beyond the tokenizer's context (a long caption, cut) would
    be the positive itself; such a row has none."""
    negatives = swap_negatives(captions, class_names, seed)
    tokens = tokenizer([n or "" for n in negatives])
    differs = (tokens != tokenizer(list(captions))).any(dim=1)
    has = [n is not None and bool(d) for n, d in zip(negatives, differs)]
    return tokens, torch.tensor(has)
