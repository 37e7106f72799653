"""Reading drops as they arrive: a folder with a manifest, or WebDataset `.tar` shards.

Both readers stream one record at a time, so memory does not grow with the drop. A manifest or
shard that cannot be read at all is a `DropError` naming the file and the problem: the whole
drop is wrong, not one sample.
"""
from __future__ import annotations

import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterator

import pandas as pd
import pyarrow.parquet as pq

MANIFEST_NAMES = ("captions.parquet", "captions.csv", "captions.jsonl")
REQUIRED_COLUMNS = ("image", "caption")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
READY_MARKER = "_READY"
DEFAULT_MAX_FILE_BYTES = 50_000_000
_CHUNK_ROWS = 1024


class DropError(ValueError):
    """The drop as a whole cannot be read (broken manifest or shard, nothing to ingest)."""


@dataclass(frozen=True)
class DropSource:
    root: Path
    format: str  # 'folder' | 'wds'
    files: tuple[Path, ...]  # the manifest, or the shards in order

    def describe(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p in self.files]


@dataclass
class RawRecord:
    local_id: str
    path: str  # where the image is, relative to the drop (shard members as 'shard.tar:member')
    image_bytes: bytes | None
    caption: object
    url: str | None = None
    label: str | None = None
    fetch_error: str | None = None  # quarantine reason found while locating the file
    fetch_detail: str | None = None  # what exactly was wrong (the path when not given)
    extra: dict = field(default_factory=dict)


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
        yield from _iter_folder(source.root, source.files[0], max_file_bytes)
    else:
        for shard in source.files:
            yield from _iter_shard(source.root, shard, max_file_bytes)


# --- folder + manifest ----------------------------------------------------------

def _manifest_chunks(manifest: Path) -> Iterator[pd.DataFrame]:
    try:
        if manifest.suffix == ".parquet":
            pf = pq.ParquetFile(manifest)
            _check_columns(manifest, pf.schema_arrow.names)
            for batch in pf.iter_batches(batch_size=_CHUNK_ROWS):
                yield batch.to_pandas()
            return
        if manifest.suffix == ".csv":
            reader = pd.read_csv(manifest, chunksize=_CHUNK_ROWS, dtype=str, keep_default_na=False,
                                 na_values=[])
        else:
            reader = pd.read_json(manifest, lines=True, chunksize=_CHUNK_ROWS, dtype=False)
        first = True
        with reader:
            for chunk in reader:
                if first:
                    _check_columns(manifest, list(chunk.columns))
                    first = False
                yield chunk
        if first:
            raise DropError(f"manifest {manifest} is empty: no rows and no header")
    except DropError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure: name the file and the problem
        raise DropError(f"manifest {manifest} is unreadable: {type(exc).__name__}: {exc}") from exc


def _check_columns(manifest: Path, columns: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DropError(f"manifest {manifest} is missing required column(s) {', '.join(map(repr, missing))}; "
                        f"found columns: {', '.join(map(str, columns)) or 'none'}")


def _iter_folder(root: Path, manifest: Path, max_file_bytes: int) -> Iterator[RawRecord]:
    row_number = 0
    for chunk in _manifest_chunks(manifest):
        for row in chunk.to_dict("records"):
            image_ref = row.get("image")
            local_id = _clean_str(row.get("sample_id")) or _clean_str(image_ref) or f"row{row_number}"
            rec = RawRecord(local_id=local_id, path=str(image_ref), image_bytes=None, caption=row.get("caption"),
                            url=_clean_str(row.get("url")), label=_clean_str(row.get("label")))
            _resolve_file(root, image_ref, rec, max_file_bytes)
            row_number += 1
            yield rec


def _resolve_file(root: Path, image_ref, rec: RawRecord, max_file_bytes: int) -> None:
    ref = _clean_str(image_ref)
    if not ref:
        rec.fetch_error = "missing_file"
        return
    if PurePosixPath(ref).is_absolute():
        rec.fetch_error = "path_escapes_drop"
        return
    # Resolve the folder once per distinct folder (symlinked folders included), then the file
    # itself only when it is a link: a full resolve per file costs a third of ingestion.
    joined = os.path.join(root, ref)
    real = os.path.join(_real_dir(os.path.dirname(joined)), os.path.basename(joined))
    if os.path.islink(real):
        real = os.path.realpath(real)
    if not Path(real).is_relative_to(root):
        rec.fetch_error = "path_escapes_drop"
        return
    _read_capped(real, rec, max_file_bytes)


def _read_capped(real: str, rec: RawRecord, max_file_bytes: int) -> None:
    try:
        st = os.stat(real)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        rec.fetch_error = "missing_file"
        return
    if st.st_size > max_file_bytes:
        rec.fetch_error, rec.fetch_detail = "too_large", _over_cap(rec.path, st.st_size, max_file_bytes)
        return
    with open(real, "rb") as fh:
        data = fh.read(max_file_bytes + 1)  # the file may have grown since stat: never read past the cap
    if len(data) > max_file_bytes:
        rec.fetch_error, rec.fetch_detail = "too_large", _over_cap(rec.path, len(data), max_file_bytes)
        return
    rec.image_bytes = data


def _over_cap(name: str, size: int, max_file_bytes: int) -> str:
    return f"{name} is {size} bytes, over max_file_bytes={max_file_bytes}"


@lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def _clean_str(value) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


# --- WebDataset shards ---------------------------------------------------------

def _iter_shard(root: Path, shard: Path, max_file_bytes: int) -> Iterator[RawRecord]:
    """Group consecutive members by key (img2dataset writes a sample's files together)."""
    try:
        with tarfile.open(shard, "r") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                name = PurePosixPath(info.name)
                stem, _, ext = name.name.partition(".")
                member_key, ext = str(name.with_name(stem)), ext.lower()
                if key is not None and member_key != key:
                    yield _wds_record(root, shard, key, members)
                    members = {}
                key = member_key
                members[ext] = (info.name, _member_bytes(tar, info, max_file_bytes))
            if key is not None:
                yield _wds_record(root, shard, key, members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DropError(f"shard {shard} is unreadable (truncated or not a tar file): {exc}") from exc


def _wds_record(root: Path, shard: Path, key: str, members: dict) -> RawRecord:
    shard_name = str(shard.relative_to(root))
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"][1])
        except (ValueError, UnicodeDecodeError, TypeError):
            meta = {}
    if not isinstance(meta, dict):
        meta = {}
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    caption = members["txt"][1] if "txt" in members else None
    rec = RawRecord(
        local_id=_clean_str(meta.get("sample_id")) or key,
        path=f"{shard_name}:{members[image_ext][0] if image_ext else key}",
        image_bytes=members[image_ext][1] if image_ext else None,
        caption=caption, url=_clean_str(meta.get("url")), label=_clean_str(meta.get("label")),
    )
    oversized = [name for name, data in members.values() if data is None]
    if oversized:
        rec.fetch_error, rec.fetch_detail = "too_large", f"member {oversized[0]!r} is over max_file_bytes"
    elif image_ext is None:
        rec.fetch_error = "missing_file"
    return rec


def _member_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo, max_file_bytes: int) -> bytes | None:
    """None for a member over the cap: its size is in the header, so it is never read."""
    return None if info.size > max_file_bytes else tar.extractfile(info).read()
