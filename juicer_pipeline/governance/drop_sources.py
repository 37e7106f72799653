"""Reading drops as they arrive: a folder with a manifest, or WebDataset `.tar` shards.

Both readers stream one record at a time, so memory does not grow with the drop. A manifest
that cannot be read at all is a `DropError` naming the file and the problem: the whole drop is
wrong, not one sample. A shard that stops being readable (truncated, corrupt, not a tar) keeps
the records read before that point and adds one `truncated_shard` record: img2dataset output
has such shards routinely, and one must not cost the rest of the drop.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Iterator

import pyarrow.parquet as pq

from .parquet_batches import iter_parquet_batches

MANIFEST_NAMES = ("captions.parquet", "captions.csv", "captions.jsonl")
REQUIRED_COLUMNS = ("image", "caption")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
READY_MARKER = "_READY"
DEFAULT_MAX_FILE_BYTES = 50_000_000
_CHUNK_ROWS = 1024
# What reading a broken (or gzip-compressed and broken) shard raises.
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


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
        yield from _iter_folder(source.root, source.files[0], max_file_bytes)
    else:
        for shard in source.files:
            yield from _iter_shard(source.root, shard, max_file_bytes)


# --- folder + manifest ----------------------------------------------------------

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


def _iter_folder(root: Path, manifest: Path, max_file_bytes: int) -> Iterator[RawRecord]:
    row_number = 0
    for chunk in _manifest_chunks(manifest):
        for row in chunk:
            if isinstance(row, BadManifestRow):
                yield RawRecord(local_id=f"row{row_number}", path=manifest.name, image_bytes=None, caption=None,
                                fetch_error="bad_manifest_row", fetch_detail=row.why)
                row_number += 1
                continue
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
        rec.fetch_error, rec.fetch_detail = "too_large", _over_cap(rec.path, st.st_size, max_file_bytes)
        return
    with open(real, "rb") as fh:
        # Sized by stat: a read of `max_file_bytes` allocates that many bytes up front, which costs
        # more than the read itself for a small image. The extra byte tells a file that grew since
        # stat; only then is the rest read, and never past the cap.
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:
            data += fh.read(max_file_bytes + 1 - len(data))
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
    """Headers first, then one key at a time: a key's members are grouped wherever they sit in the
    tar, and only one record's bytes are in memory at once. A shard that stops being readable
    keeps the records before that point and adds one `truncated_shard` record naming the offset."""
    shard_name = str(shard.relative_to(root))
    try:
        tar = tarfile.open(shard, "r")
    except _SHARD_ERRORS as exc:
        yield _broken_shard(shard_name, 0, f"{type(exc).__name__}: {exc}")
        return
    with tar:
        members, stop = _scan_members(tar)
        try:
            for key, group in _group_by_key(members).items():
                yield _wds_record(tar, shard_name, key, group, max_file_bytes)
        except _SHARD_ERRORS as exc:  # the scan checked every member: an I/O fault
            raise DropError(f"shard {shard} is unreadable: {type(exc).__name__}: {exc}") from exc
    if stop is not None:
        yield _broken_shard(shard_name, *stop)


def _scan_members(tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], tuple[int, str] | None]:
    """The regular-file members whose data is complete, and where (byte offset, why) reading
    stopped early; None when the shard ends cleanly."""
    members: list[tarfile.TarInfo] = []
    try:
        while (info := tar.next()) is not None:
            if not info.isfile():
                continue
            if not _data_complete(tar, info):
                return members, (info.offset, f"member {info.name!r} is cut short")
            members.append(info)
    except _SHARD_ERRORS as exc:
        return members, (tar.offset, f"{type(exc).__name__}: {exc}")
    if _garbage_at(tar, tar.offset):
        # tarfile reads an unparseable header after the first as the end of the archive
        return members, (tar.offset, "unreadable member header")
    return members, None


def _data_complete(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bool:
    if info.size == 0:
        return True
    tar.fileobj.seek(info.offset_data + info.size - 1)
    return len(tar.fileobj.read(1)) == 1


def _garbage_at(tar: tarfile.TarFile, offset: int) -> bool:
    tar.fileobj.seek(offset)
    return bool(tar.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"))


def _group_by_key(members: list[tarfile.TarInfo]) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> {extension: member}, keys in order of first appearance. A repeated key+extension
    keeps the later member, as extracting the tar would."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for info in members:
        key, ext = _split_member_name(info.name)
        groups.setdefault(key, {})[ext] = info
    return groups


def _split_member_name(name: str) -> tuple[str, str]:
    """'dir/000.seg.png' -> ('dir/000', 'seg.png'): the key ends at the first dot of the file name."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    if not stem:  # '.jpg' or 'dir/.hidden': no key of its own, so the whole name is the key
        return str(path), ""
    return str(path.with_name(stem)), ext.lower()


def _unsafe_name(name: str) -> bool:
    """Absolute, or climbing out with '..' (either slash): such a name is never a sample."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts


def _wds_record(tar: tarfile.TarFile, shard_name: str, key: str, group: dict[str, tarfile.TarInfo],
                max_file_bytes: int) -> RawRecord:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
    rec = RawRecord(local_id=key, path=f"{shard_name}:{group[image_ext].name if image_ext else key}",
                    image_bytes=None, caption=None)
    problem = _group_problem(group, max_file_bytes)
    if problem is None:
        wanted = {e: info for e, info in group.items() if e in (image_ext, "txt", "json")}
        problem = _fill_record(rec, {e: _read_member(tar, info) for e, info in wanted.items()}, image_ext, group)
    if problem is not None:
        rec.fetch_error, rec.fetch_detail = problem
    return rec


def _group_problem(group: dict[str, tarfile.TarInfo], max_file_bytes: int) -> tuple[str, str] | None:
    """A reason found from the headers alone, so nothing unsafe or oversized is read."""
    for info in group.values():
        if _unsafe_name(info.name):
            return "path_escapes_drop", f"member name {info.name!r} is absolute or climbs out with '..'"
    for info in group.values():
        if info.size > max_file_bytes:
            return "too_large", _over_cap(f"member {info.name!r}", info.size, max_file_bytes)
    return None


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    with tar.extractfile(info) as fh:
        return fh.read()


def _fill_record(rec: RawRecord, data: dict[str, bytes], image_ext: str | None,
                 group: dict[str, tarfile.TarInfo]) -> tuple[str, str] | None:
    rec.caption = data.get("txt")
    rec.image_bytes = data.get(image_ext) if image_ext else None
    meta, problem = _parse_metadata(data.get("json"))
    rec.local_id = _clean_str(meta.get("sample_id")) or rec.local_id
    rec.url, rec.label = _clean_str(meta.get("url")), _clean_str(meta.get("label"))
    if problem is not None:
        return problem
    if image_ext is None:
        others = sorted(e for e in group if e not in ("txt", "json"))
        if others:
            found = ", ".join(group[e].name for e in others)
            return "unsupported_format", f"no {'/'.join(IMAGE_EXTENSIONS)} member; found {found}"
        return "missing_file", f"no image member for key {rec.local_id!r}"
    return None


def _parse_metadata(raw: bytes | None) -> tuple[dict, tuple[str, str] | None]:
    """KEY.json as a dict; a broken one is a quarantine reason of its own, never silently dropped."""
    if raw is None:
        return {}, None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, ("bad_metadata", f"KEY.json is not valid JSON: {exc}")
    if not isinstance(meta, dict):
        return {}, ("bad_metadata", f"KEY.json is a {type(meta).__name__}, not an object")
    return meta, None


def _broken_shard(shard_name: str, offset: int, why: str) -> RawRecord:
    return RawRecord(local_id=shard_name, path=shard_name, image_bytes=None, caption=None,
                     fetch_error="truncated_shard",
                     fetch_detail=f"{shard_name}: reading stopped at byte {offset}: {why}")
