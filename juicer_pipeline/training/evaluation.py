"""Held-out evaluation of a student: the eval sets, retrieval recall and zero-shot accuracy."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ..governance.images import load_rgb, normalise_batch, to_uint8_chw
from ..governance.metrics import retrieval_recall, zero_shot_accuracy
from ..models.kept_tokens import KeptTokens, install_kept_tokens

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


@dataclass
class EvalSet:
    retrieval_images: torch.Tensor
    retrieval_tokens: torch.Tensor
    retrieval_keys: list
    class_images: torch.Tensor
    class_labels: np.ndarray
    class_names: list[str]
    class_attributes: tuple[str, ...]
    class_templates: tuple[str, ...] | None = None  # zero-shot prompt templates (None: the built-in ones)
    # Optional, for salient-token inference: the governor-salient ⌈ρN⌉ patches of every image
    retrieval_kept: torch.Tensor | None = None
    class_kept: torch.Tensor | None = None


def zero_shot_classifier(model, tokenizer, ev: EvalSet, device="cpu") -> torch.Tensor:
    """[classes, dim] prompt-ensembled class embeddings of `ev`'s classes (open_clip's builder), on the CPU."""
    from ..governance.prompts import TEMPLATES

    return class_embedding_matrix(model, tokenizer, ev.class_names, ev.class_attributes,
                                  ev.class_templates or TEMPLATES, device)


def class_embedding_matrix(model, tokenizer, names, attributes: tuple[str, ...], templates: tuple[str, ...],
                           device="cpu") -> torch.Tensor:
    """[len(names), dim] normalised, prompt-ensembled embeddings of `names` (open_clip's builder:
    every template, each with every attribute), on the CPU."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from ..governance.prompts import zero_shot_templates

    return build_zero_shot_classifier(model, tokenizer, list(names), zero_shot_templates(attributes, templates),
                                      num_classes_per_batch=None, device=torch.device(device)).T.cpu()


@torch.inference_mode()
def evaluate_student(model, tokenizer, ev: EvalSet, device: str = "cpu", salient_only: bool = False) -> dict[str, float]:
    """Held-out retrieval and zero-shot scores. With `salient_only`, the vision tower sees only the
    governor-salient patches of each evaluation image (faster inference); `images_per_second`
    reports the image tower's throughput either way."""
    model.eval()
    dev = torch.device(device)
    if salient_only and (ev.retrieval_kept is None or ev.class_kept is None):
        raise ValueError("salient-only evaluation needs the evaluation images' kept patches")
    kept_module = model.visual.patch_dropout
    if not isinstance(kept_module, KeptTokens):
        kept_module = install_kept_tokens(model)
    seconds = [0.0, 0]

    def images(u8, kept):
        out = []
        for i in range(0, len(u8), 512):
            kept_module.indices = kept[i:i + 512] if salient_only else None
            t0 = time.perf_counter()
            out.append(F.normalize(model.encode_image(normalise_batch(u8[i:i + 512].to(dev))), dim=-1).cpu())
            seconds[0] += time.perf_counter() - t0
            seconds[1] += len(u8[i:i + 512])
        kept_module.indices = None
        return torch.cat(out)

    img = images(ev.retrieval_images, ev.retrieval_kept)
    txt = torch.cat([F.normalize(model.encode_text(ev.retrieval_tokens[i:i + 512].long().to(dev)), dim=-1).cpu()
                     for i in range(0, len(ev.retrieval_tokens), 512)])
    scores = retrieval_recall(img, txt, keys=ev.retrieval_keys)
    classes = zero_shot_classifier(model, tokenizer, ev, dev)
    scores.update(zero_shot_accuracy(images(ev.class_images, ev.class_kept), classes, ev.class_labels))
    scores["images_per_second"] = seconds[1] / max(seconds[0], 1e-9)
    return scores


def held_out_eval_set(wh, tokenizer, image_size: int, vocab) -> EvalSet:
    """The warehouse's held-out sets (asset `eval_sets`) for a student of `image_size`, scored on
    the classes and prompt templates of `vocab` (a ClassVocabulary)."""
    ev = load_eval_set(wh.read_table("eval_sets", "retrieval", ["caption", "image", "status"]),
                       wh.read_table("eval_sets", "classification", ["label", "image", "status"]),
                       tokenizer, image_size, vocab.names, vocab.attributes)
    ev.class_templates = vocab.templates
    return ev
