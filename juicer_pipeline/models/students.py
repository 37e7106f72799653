"""Student architectures as configuration files, like open_clip's model configs.

A student is named by a packaged config (`student_configs/<name>.json`) or by the path of a JSON
file with the same keys (`ClipArch`'s fields). Model scaling is choosing another config.
"""
from __future__ import annotations

import json
from pathlib import Path

from .world_clip import ClipArch

STUDENT_DIR = Path(__file__).parent / "student_configs"
STUDENTS = sorted(p.stem for p in STUDENT_DIR.glob("*.json"))


def load_student_arch(name: str) -> ClipArch:
    path = STUDENT_DIR / f"{name}.json" if name in STUDENTS else Path(name)
    if not path.is_file():
        raise ValueError(f"student {name!r} is neither a packaged config ({', '.join(STUDENTS)}) nor a JSON file")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"student config {path} is not valid JSON: {exc}") from exc
    unknown = set(fields) - set(ClipArch.__dataclass_fields__)
    if unknown:
        raise ValueError(f"student config {path} has unknown keys {sorted(unknown)}; "
                         f"known: {sorted(ClipArch.__dataclass_fields__)}")
    return ClipArch.from_dict(fields)
