"""Which class vocabulary the assets hand to the method: the configured file, or the world's."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..governance.prompts import TEMPLATES
from ..governance.vocabulary import ClassVocabulary, read_vocabulary_file
from ..settings import ClassSettings
from ..world.vocabulary import load_vocabulary


def class_vocabulary(cls: ClassSettings) -> ClassVocabulary:
    templates = tuple(cls.prompt_templates) if cls.prompt_templates else TEMPLATES
    mtime = Path(cls.vocabulary).stat().st_mtime_ns if cls.vocabulary and Path(cls.vocabulary).exists() else None
    return _cached(cls.vocabulary, mtime, templates)


@lru_cache(maxsize=8)
def _cached(path: str | None, mtime: int | None, templates: tuple[str, ...]) -> ClassVocabulary:
    if path:
        return read_vocabulary_file(path, templates)
    world = load_vocabulary()  # the default: the synthetic world's shapes, named with a colour in captions
    return ClassVocabulary(world.shapes, world.synonyms, world.colour_names, templates)


def vocabulary_fingerprint(cls: ClassSettings) -> str:
    """Part of the code version of every stage that names classes: a vocabulary file that changes
    content (same path) makes those stages unsynced. A missing file fails at materialisation."""
    try:
        return class_vocabulary(cls).fingerprint()
    except (FileNotFoundError, ValueError):
        return "unreadable"
