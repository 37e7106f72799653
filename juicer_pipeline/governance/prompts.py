"""Zero-shot prompts for class names: templates averaged over the vocabulary's attributes."""
from __future__ import annotations

import torch

TEMPLATES = ("a photo of {}.", "{}.", "an image showing {}.", "a picture of {}.")
# The abstain class: a crop of clutter with no object. The world governor is trained with it; a
# crop whose best class is the background names nothing.
BACKGROUND_CLASS = "background"


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def class_prompts(name: str, attributes: tuple[str, ...] = (), templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Prompts for one class; with attributes (the world's colours) each is prefixed in turn,
    because the training captions always name a colour with a shape."""
    names = [with_article(f"{a} {name}") for a in attributes] or [with_article(name)]
    return [t.format(n) for t in templates for n in names]


def zero_shot_templates(attributes: tuple[str, ...] = (), templates: tuple[str, ...] = TEMPLATES) -> list:
    """`class_prompts` as open_clip's `build_zero_shot_classifier` takes them: one callable per prompt."""
    prefixes = list(attributes) or [""]
    return [lambda name, t=t, a=a: t.format(with_article(f"{a} {name}".strip())) for t in templates for a in prefixes]


def class_embeddings(encode_text, class_names: list[str], attributes: tuple[str, ...] = (),
                     templates: tuple[str, ...] = TEMPLATES) -> torch.Tensor:
    """One normalised embedding per class: the mean of its prompt embeddings (CLIP's ensembling)."""
    rows = []
    for name in class_names:
        emb = encode_text(class_prompts(name, attributes, templates))
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def abstain_embedding(encode_text) -> torch.Tensor:
    """The normalised embedding of the abstain class (`background`), prompt-ensembled like a class."""
    return class_embeddings(encode_text, [BACKGROUND_CLASS])[0]
