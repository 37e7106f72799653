"""The world's vocabulary: object classes (shapes), their synonyms, and colours."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

VOCABULARY_FILE = Path(__file__).with_name("vocabulary.json")


@dataclass(frozen=True)
class Vocabulary:
    shapes: tuple[str, ...]
    synonyms: dict[str, tuple[str, ...]]
    colours: dict[str, tuple[int, int, int]]

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(self.colours)


@lru_cache(maxsize=None)
def load_vocabulary(path: str | Path = VOCABULARY_FILE) -> Vocabulary:
    raw = json.loads(Path(path).read_text())
    return Vocabulary(
        shapes=tuple(raw["shapes"]),
        synonyms={k: tuple(v["synonyms"]) for k, v in raw["shapes"].items()},
        colours={k: tuple(v) for k, v in raw["colours"].items()},
    )
