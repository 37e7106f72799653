"""Finding new, complete drops under the drops folder, and drops that changed (no Dagster import)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..governance.drop_fingerprint import DELETED_VERSION, DropFingerprint, drop_version
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


@dataclass
class DropVersions:
    """What one look at the drop folders found, against the versions seen at the last look."""
    seen: dict[str, str]                         # drop -> version now (the sensor's next cursor)
    changed: dict[str, DropFingerprint] = field(default_factory=dict)  # drop -> its fingerprint, where it changed
    deleted: list[str] = field(default_factory=list)           # drops whose folder is gone since the last look
    restored: list[str] = field(default_factory=list)          # drops whose folder is back


def look_at_drops(drops_dir: Path, names: list[str], seen: dict[str, str]) -> DropVersions:
    """Fingerprint each drop in `names` and compare with `seen` (drop -> version): the drops that
    changed, were deleted or came back. Unchanged drops cost a fingerprint and nothing else. A
    partition key that is no drop name (typed in the UI) has no folder to look at: skipped."""
    now = DropVersions(seen=dict(seen))
    for name in filter(VALID_DROP_NAME.match, names):
        version, fingerprint = drop_version(drops_dir, name)
        before = seen.get(name)
        if version == before:
            continue
        now.seen[name] = version
        if fingerprint is None:
            now.deleted.append(name)
            continue
        now.changed[name] = fingerprint
        if before == DELETED_VERSION:
            now.restored.append(name)
    return now
