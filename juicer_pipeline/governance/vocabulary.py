"""The class vocabulary the method names objects with: classes, synonyms, prompt templates.

The method receives a vocabulary; it never assumes the synthetic world's shapes. A vocabulary file
has one class per line, optionally followed by a colon and comma-separated synonyms (words in
captions that count as mentioning the class); `#` starts a comment:

    person: people, man, woman
    bicycle: bike
    traffic light
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .prompts import TEMPLATES


@dataclass(frozen=True)
class ClassVocabulary:
    names: tuple[str, ...]
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Words that precede a class name in captions ("red star"): zero-shot prompts are ensembled
    # over them. Empty for most real vocabularies.
    attributes: tuple[str, ...] = ()
    templates: tuple[str, ...] = TEMPLATES  # zero-shot prompt templates, "{}" is the class phrase

    def __post_init__(self):
        if not self.names:
            raise ValueError("a class vocabulary needs at least one class")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"class vocabulary names repeat: {', '.join(dup)}")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad or not self.templates:
            raise ValueError(f"every prompt template needs exactly one '{{}}' for the class, got {bad or 'none'}")

    def fingerprint(self) -> str:
        import hashlib
        import json

        payload = json.dumps([self.names, sorted(self.synonyms.items()), self.attributes, self.templates])
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def read_vocabulary_file(path: str | Path, templates: tuple[str, ...] | None = None) -> ClassVocabulary:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class vocabulary file {path} does not exist: set [classes] vocabulary to a file "
                                f"with one class per line, or leave it unset for the world's shapes")
    names, synonyms = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, rest = line.partition(":")
        name = " ".join(name.split()).lower()
        if not name:
            raise ValueError(f"{path}:{number}: a line with synonyms but no class name")
        names.append(name)
        synonyms[name] = tuple(s for s in (" ".join(w.split()).lower() for w in rest.split(",")) if s)
    try:
        return ClassVocabulary(tuple(names), synonyms, (), tuple(templates) if templates else TEMPLATES)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
