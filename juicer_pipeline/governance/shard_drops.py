"""A drop of WebDataset `.tar` shards (img2dataset's output): KEY.jpg, KEY.txt, KEY.json per sample.

A shard that stops being readable (truncated, corrupt, not a tar) keeps the records read before
that point and adds one `truncated_shard` record: img2dataset output has such shards routinely,
and one must not cost the rest of the drop.
"""
from __future__ import annotations

import json
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

from .drop_records import DropError, RawRecord, clean_str, over_cap

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# What reading a broken (or gzip-compressed and broken) shard raises.
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def iter_shard(root: Path, shard: Path, max_file_bytes: int) -> Iterator[RawRecord]:
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
            return "too_large", over_cap(f"member {info.name!r}", info.size, max_file_bytes)
    return None


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    with tar.extractfile(info) as fh:
        return fh.read()


def _fill_record(rec: RawRecord, data: dict[str, bytes], image_ext: str | None,
                 group: dict[str, tarfile.TarInfo]) -> tuple[str, str] | None:
    rec.caption = data.get("txt")
    rec.image_bytes = data.get(image_ext) if image_ext else None
    meta, problem = _parse_metadata(data.get("json"))
    rec.local_id = clean_str(meta.get("sample_id")) or rec.local_id
    rec.url, rec.label = clean_str(meta.get("url")), clean_str(meta.get("label"))
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
