"""Held-out evaluation data: loading it for students, and what counts as a retrieval match."""
from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import torch

from .clip_training import EvalSet
from .images import load_rgb, to_uint8_chw

_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def caption_key(caption: str, names: tuple[str, ...], attributes: tuple[str, ...]):
    """The objects a caption names, as a sorted multiset of (attribute, name) — e.g. two captions
    'A red star.' and 'A photo of a red star.' share a key. Captions naming no known object fall
    back to their own lowercased text, i.e. instance-level matching."""
    pattern = (rf"\b(a|an|one|two|three)?\s*({'|'.join(map(re.escape, attributes))})\s+"
               rf"({'|'.join(map(re.escape, names))})(?:e?s)?\b")
    found = []
    for count, attr, name in re.findall(pattern, caption.lower()):
        found += [(attr, name)] * _NUMBER.get(count, 1)
    return tuple(sorted(found)) or caption.lower().strip()


def _images_u8(column, size: int) -> torch.Tensor:
    return torch.stack([to_uint8_chw(load_rgb(data), size) for data in column])


def _table(source, columns: list[str]):
    return source.select(columns) if hasattr(source, "select") else pq.read_table(source, columns=columns)


def load_eval_set(retrieval, classification, tokenizer, image_size: int,
                  names: tuple[str, ...], attributes: tuple[str, ...]) -> EvalSet:
    """`retrieval` and `classification`: the ingested held-out sets, as Parquet paths or tables."""
    ret = _table(retrieval, ["caption", "image", "status"]).to_pydict()
    keep = [i for i, s in enumerate(ret["status"]) if s == "valid"]
    captions = [ret["caption"][i] for i in keep]
    cls = _table(classification, ["label", "image", "status"]).to_pydict()
    ckeep = [i for i, (s, l) in enumerate(zip(cls["status"], cls["label"])) if s == "valid" and l in names]
    return EvalSet(
        retrieval_images=_images_u8([ret["image"][i] for i in keep], image_size),
        retrieval_tokens=tokenizer(captions),
        retrieval_keys=[caption_key(c, names, attributes) for c in captions],
        class_images=_images_u8([cls["image"][i] for i in ckeep], image_size),
        class_labels=np.array([names.index(cls["label"][i]) for i in ckeep]),
        class_names=list(names), class_attributes=attributes)
