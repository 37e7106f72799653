"""A drop that is a folder of images with one manifest (Parquet, CSV or JSON Lines) naming them.

The manifest streams a chunk of rows at a time, so memory does not grow with the drop. A manifest
that cannot be read at all is a `DropError` naming the file and the problem: the whole drop is
wrong, not one sample. A row that cannot be parsed is a record of its own (`bad_manifest_row`).
"""
from __future__ import annotations

import csv
import errno
import json
import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from .drop_records import DropError, RawRecord, clean_str, over_cap
from .parquet_batches import iter_parquet_batches

REQUIRED_COLUMNS = ("image", "caption")
_CHUNK_ROWS = 1024


def _manifest_chunks(manifest: Path) -> Iterator[list["dict | BadManifestRow"]]:
    """The manifest's rows, a chunk at a time, as dicts. Text the file cannot decode keeps its
    bytes as surrogate escapes (file names on disk can hold such bytes; the catalog stores them
    escaped). A JSONL line that is no JSON object is a row of its own (`BadManifestRow`), not a
    refused drop."""
    try:
        if manifest.suffix == ".parquet":
            pf = pq.ParquetFile(manifest)
            _check_columns(manifest, pf.schema_arrow.names)
            for batch in iter_parquet_batches(pf, _CHUNK_ROWS):
                yield batch.to_pylist()
            return
        if manifest.suffix == ".csv":
            yield from _csv_chunks(manifest)
            return
        first = True
        for chunk in _jsonl_chunks(manifest):
            if first:  # JSON Lines has no header: the keys of the first rows are its columns
                _check_columns(manifest, list(dict.fromkeys(k for row in chunk if isinstance(row, dict) for k in row)))
                first = False
            yield chunk
        if first:
            raise DropError(f"manifest {manifest} is empty: no rows")
    except DropError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure: name the file and the problem
        raise DropError(f"manifest {manifest} is unreadable: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class BadManifestRow:
    """A manifest line that could not be parsed into a row, and why."""
    why: str


# The standard library's csv and json parse CSV and JSON Lines here, not pandas: they keep every
# string as written (undecodable bytes, lone surrogates, NUL), where pandas' parsers fail the
# whole chunk on one such value.

def _csv_chunks(manifest: Path) -> Iterator[list["dict | BadManifestRow"]]:
    """CSV rows as dicts of strings (empty fields are ''); a row with more fields than the header
    is a `BadManifestRow`."""
    with open(manifest, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, restkey=_EXTRA_FIELDS)
        if reader.fieldnames is None:
            raise DropError(f"manifest {manifest} is empty: no header and no rows")
        _check_columns(manifest, reader.fieldnames)
        yield from _chunked(_csv_row(row, reader.line_num) for row in reader)


_EXTRA_FIELDS = object()  # DictReader's key for fields beyond the header


def _csv_row(row: dict, line: int) -> "dict | BadManifestRow":
    if _EXTRA_FIELDS in row:
        return BadManifestRow(f"line {line} has {len(row[_EXTRA_FIELDS])} more fields than the header")
    return row


def _jsonl_chunks(manifest: Path) -> Iterator[list["dict | BadManifestRow"]]:
    """JSON Lines parsed line by line; blank lines are skipped."""
    with open(manifest, "rb") as fh:
        yield from _chunked(_jsonl_row(line, number) for number, line in enumerate(fh, start=1) if line.strip())


def _chunked(rows: Iterator) -> Iterator[list]:
    while chunk := list(islice(rows, _CHUNK_ROWS)):
        yield chunk


def _jsonl_row(line: bytes, number: int) -> "dict | BadManifestRow":
    try:
        row = json.loads(line.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        return BadManifestRow(f"line {number} is not valid JSON: {exc}")
    if not isinstance(row, dict):
        return BadManifestRow(f"line {number} is a JSON {type(row).__name__}, not an object")
    return row


def _check_columns(manifest: Path, columns: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DropError(f"manifest {manifest} is missing required column(s) {', '.join(map(repr, missing))}; "
                        f"found columns: {', '.join(map(str, columns)) or 'none'}")


def iter_folder(root: Path, manifest: Path, max_file_bytes: int) -> Iterator[RawRecord]:
    row_number = 0
    for chunk in _manifest_chunks(manifest):
        for row in chunk:
            if isinstance(row, BadManifestRow):
                yield RawRecord(local_id=f"row{row_number}", path=manifest.name, image_bytes=None, caption=None,
                                fetch_error="bad_manifest_row", fetch_detail=row.why)
                row_number += 1
                continue
            image_ref = row.get("image")
            local_id = clean_str(row.get("sample_id")) or clean_str(image_ref) or f"row{row_number}"
            rec = RawRecord(local_id=local_id, path=str(image_ref), image_bytes=None, caption=row.get("caption"),
                            url=clean_str(row.get("url")), label=clean_str(row.get("label")))
            _resolve_file(root, image_ref, rec, max_file_bytes)
            row_number += 1
            yield rec


def _resolve_file(root: Path, image_ref, rec: RawRecord, max_file_bytes: int) -> None:
    ref = clean_str(image_ref)
    if not ref:
        rec.fetch_error = "missing_file"
        return
    if ref.startswith("/"):  # absolute (PurePosixPath.is_absolute, without its cost per file)
        rec.fetch_error = "path_escapes_drop"
        return
    if "\x00" in ref:  # no file system can name it (os calls raise ValueError on it)
        rec.fetch_error, rec.fetch_detail = "invalid_path", f"{ref!r} contains a NUL byte"
        return
    # Resolve the folder once per distinct folder (symlinked folders included), then the file
    # itself only when it is a link: a full resolve per file costs a third of ingestion. Plain
    # string operations: os.path and pathlib calls cost a tenth of ingestion on small images.
    inside = str(root).rstrip(os.sep) + os.sep  # every real path of the drop starts with this
    folder, _, name = (inside + ref).rpartition(os.sep)
    try:
        real = _real_dir(folder) + os.sep + name
        st = _lstat_following_link(real)
    except UnicodeEncodeError:  # a lone surrogate that no byte sequence encodes
        rec.fetch_error, rec.fetch_detail = "invalid_path", f"{ref!r} has characters no file name can hold"
        return
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        rec.fetch_error, rec.fetch_detail = "invalid_path", f"{ref[:80]!r}... is longer than file names can be"
        return
    real, st = st
    if not real.startswith(inside):
        rec.fetch_error = "path_escapes_drop"
        return
    _read_capped(real, st, rec, max_file_bytes)


def _lstat_following_link(real: str) -> tuple[str, os.stat_result | None]:
    """(the file's real path, its stat; None when there is no such file). Raises OSError only
    for a name too long to look up."""
    try:
        st = os.lstat(real)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(real)
            st = os.stat(real)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise
        st = None
    return real, st


def _read_capped(real: str, st: os.stat_result | None, rec: RawRecord, max_file_bytes: int) -> None:
    if st is None or not stat.S_ISREG(st.st_mode):
        rec.fetch_error = "missing_file"
        return
    if st.st_size > max_file_bytes:
        rec.fetch_error, rec.fetch_detail = "too_large", over_cap(rec.path, st.st_size, max_file_bytes)
        return
    with open(real, "rb") as fh:
        # Sized by stat: a read of `max_file_bytes` allocates that many bytes up front, which costs
        # more than the read itself for a small image. The extra byte tells a file that grew since
        # stat; only then is the rest read, and never past the cap.
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:
            data += fh.read(max_file_bytes + 1 - len(data))
    if len(data) > max_file_bytes:
        rec.fetch_error, rec.fetch_detail = "too_large", over_cap(rec.path, len(data), max_file_bytes)
        return
    rec.image_bytes = data


@lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)
