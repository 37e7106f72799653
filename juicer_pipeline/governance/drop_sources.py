"""Reading drops as they arrive: a folder with a manifest (`folder_drops`), or WebDataset `.tar`
shards (`shard_drops`).

Both readers stream one record at a time, so memory does not grow with the drop. A manifest
that cannot be read at all is a `DropError` naming the file and the problem: the whole drop is
wrong, not one sample. A shard that stops being readable keeps the records read before that
point and adds one `truncated_shard` record.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .drop_records import DropError, RawRecord
from .folder_drops import REQUIRED_COLUMNS, iter_folder
from .shard_drops import IMAGE_EXTENSIONS, iter_shard

__all__ = ["DEFAULT_MAX_FILE_BYTES", "IMAGE_EXTENSIONS", "MANIFEST_NAMES", "READY_MARKER", "REQUIRED_COLUMNS",
           "VALID_DROP_NAME", "DropError", "DropSource", "RawRecord", "drop_folder", "is_complete_drop",
           "iter_records", "open_drop"]

MANIFEST_NAMES = ("captions.parquet", "captions.csv", "captions.jsonl")
READY_MARKER = "_READY"
DEFAULT_MAX_FILE_BYTES = 50_000_000


@dataclass(frozen=True)
class DropSource:
    root: Path
    format: str  # 'folder' | 'wds'
    files: tuple[Path, ...]  # the manifest, or the shards in order

    def describe(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p in self.files]


# Drop names become partition keys, file names and URL parts: keep them plain.
VALID_DROP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def drop_folder(drops_dir: Path, name: str) -> Path:
    """The folder of the drop called `name` (a partition key, which the UI lets anyone type)."""
    if not VALID_DROP_NAME.match(name):
        raise DropError(f"{name[:80]!r} is not a drop name (letters, digits, '_', '.', '-', at most 128, not "
                        f"starting with '.', '_' or '-'): delete this partition of 'drops'")
    return Path(drops_dir) / name


def is_complete_drop(path: Path) -> bool:
    """A drop is ready once it has a _READY marker, a manifest, or shards."""
    return path.is_dir() and (
        (path / READY_MARKER).exists()
        or any((path / m).exists() for m in MANIFEST_NAMES)
        or any(path.glob("*.tar"))
    )


def open_drop(path: Path) -> DropSource:
    root = Path(path).resolve()
    if not root.is_dir():
        raise DropError(f"drop folder {root} does not exist")
    manifests = [root / m for m in MANIFEST_NAMES if (root / m).exists()]
    shards = tuple(sorted(root.glob("*.tar")))
    if len(manifests) > 1:
        raise DropError(f"drop {root} has several manifests ({', '.join(m.name for m in manifests)}); keep one")
    if manifests and shards:
        raise DropError(f"drop {root} has both a manifest and .tar shards; a drop is one or the other")
    if manifests:
        return DropSource(root, "folder", (manifests[0],))
    if shards:
        return DropSource(root, "wds", shards)
    raise DropError(f"drop {root} has no manifest ({', '.join(MANIFEST_NAMES)}) and no .tar shards")


def iter_records(source: DropSource, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[RawRecord]:
    """Every record of the drop; a file or tar member over `max_file_bytes` is never read."""
    if source.format == "folder":
        yield from iter_folder(source.root, source.files[0], max_file_bytes)
    else:
        for shard in source.files:
            yield from iter_shard(source.root, shard, max_file_bytes)
