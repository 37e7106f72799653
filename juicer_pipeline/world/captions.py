"""True captions for scenes, and web-like corruption of them."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .scenes import BACKGROUND_WORDS, Scene

_NUMBERS = {2: "two", 3: "three"}
_TEMPLATES = (
    "{objs}.",
    "a photo of {objs}.",
    "{objs} on a {bg} background.",
    "an image showing {objs}.",
    "a picture of {objs} against a {bg} backdrop.",
)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def object_phrases(objects) -> list[str]:
    """'a red star', or 'two blue circles' when a colour-shape pair repeats."""
    counts = Counter((o.colour, o.shape) for o in objects)
    phrases = []
    for (colour, shape), n in counts.items():
        article = "an" if colour[0] in "aeiou" else "a"
        phrases.append(f"{article} {colour} {shape}" if n == 1 else f"{_NUMBERS.get(n, n)} {colour} {plural(shape)}")
    return phrases


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def true_caption(scene: Scene, rng: np.random.Generator, objects=None) -> str:
    objs = join_phrases(object_phrases(scene.objects if objects is None else objects))
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    text = template.format(objs=objs, bg=BACKGROUND_WORDS[scene.background])
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class CaptionCorruption:
    """Rates (each in [0, 1]) of web-like caption damage. Each applies independently."""

    boilerplate: float = 0.25
    noise: float = 0.25  # casing, typos, repeated punctuation
    omit: float = 0.3  # caption omits one object (multi-object images only)
    misaligned: float = 0.05  # caption belongs to another image


_BOILERPLATE_PREFIX = ("<p>", "<div class=\"caption\">", "IMG_{n}.JPG ", "DSC{n}.jpg - ", "Stock photo: ",
                       "http://cdn.example-shop.com/img/{n}.jpg ", "&quot;")
_BOILERPLATE_SUFFIX = ("</p>", "</div>", " | Free shipping on orders over $50", " - buy now, best price!!",
                       " https://www.example.com/p/{n}", " &amp; more", " #art #design #shapes",
                       " Click here to download.", " (c) 2019 All rights reserved")


def add_boilerplate(text: str, rng: np.random.Generator) -> str:
    n = int(rng.integers(1000, 99999))
    if rng.random() < 0.6:
        text = _BOILERPLATE_PREFIX[int(rng.integers(len(_BOILERPLATE_PREFIX)))].format(n=n) + text
    if rng.random() < 0.7:
        text = text + _BOILERPLATE_SUFFIX[int(rng.integers(len(_BOILERPLATE_SUFFIX)))].format(n=n)
    return text


# What `add_noise` did, in the order of its draw: recorded in the truth so that rectification
# can be scored per kind (casing and typos are repaired by different rules).
NOISE_KINDS = ("casing_upper", "casing_lower", "punctuation", "typos")


def add_noise(text: str, rng: np.random.Generator) -> tuple[str, str]:
    """(noisy text, which of NOISE_KINDS)."""
    kind = int(rng.integers(4))
    if kind == 0:
        return text.upper(), NOISE_KINDS[0]
    if kind == 1:
        return text.lower().rstrip("."), NOISE_KINDS[1]
    if kind == 2:
        return text.rstrip(".") + str(rng.choice(["!!!", "...", "??", " !!"])), NOISE_KINDS[2]
    chars = list(text)
    for _ in range(int(rng.integers(1, 3))):  # typos: swap two neighbouring letters
        i = int(rng.integers(0, max(1, len(chars) - 1)))
        chars[i], chars[i + 1 if i + 1 < len(chars) else i] = chars[i + 1 if i + 1 < len(chars) else i], chars[i]
    return "".join(chars), NOISE_KINDS[3]
