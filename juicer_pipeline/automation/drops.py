"""Finding new, complete drops under the drops folder (no Dagster import)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..governance.drop_sources import VALID_DROP_NAME, is_complete_drop


@dataclass
class DropScan:
    new: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    invalid_names: list[str] = field(default_factory=list)


def scan_drops(drops_dir: Path, known: set[str]) -> DropScan:
    scan = DropScan()
    if not Path(drops_dir).is_dir():
        return scan
    for path in sorted(Path(drops_dir).iterdir()):
        name = path.name
        if not path.is_dir() or name.startswith((".", "_")) or name in known:
            continue  # hidden folders are drops still being written
        if not VALID_DROP_NAME.match(name):
            scan.invalid_names.append(name)
        elif is_complete_drop(path):
            scan.new.append(name)
        else:
            scan.incomplete.append(name)
    return scan
