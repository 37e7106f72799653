"""Ingestion: every record of a drop becomes one row, valid or quarantined with a precise reason.

A bad sample never stops the drop; only a drop that cannot be read at all (see `DropError`)
does. Rows stream out in batches so memory stays bounded whatever the drop size.
"""
from __future__ import annotations

from collections import Counter, deque
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Iterable, Iterator

import pyarrow as pa

from .captions_text import CaptionRejected, normalise_caption, raw_caption_text, storable_text
from .drop_sources import DropSource, RawRecord, iter_records
from .images import ImageLimits, ImageRejected
from .inspection import Inspection, inspect_chunk, inspect_image
from .seen_keys import SeenKeys

# The raw_samples Parquet contract. `image` holds the original file bytes of valid samples
# (null when quarantined), so later stages never depend on the drop folder still existing.
RAW_SAMPLES_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("drop_id", pa.string()),
    ("local_id", pa.string()),
    ("path", pa.string()),
    ("content_hash", pa.string()),
    ("n_bytes", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("mode", pa.string()),
    ("format", pa.string()),
    ("raw_caption", pa.string()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("label", pa.string()),
    ("status", pa.string()),
    ("quarantine_reason", pa.string()),
    ("quarantine_detail", pa.string()),
    ("image", pa.binary()),
    ("thumbprint", pa.binary()),  # near-duplicate fingerprint of valid images (near_duplicates.py)
])


# How raw_samples is written.
# - Image bytes are JPEG/PNG files, already compressed, and hashes are random: compressing either
#   costs CPU for nothing.
# - Dictionary encoding pays only where values repeat (ids, paths and captions are mostly unique).
# - No min/max statistics for image bytes and thumbprints: nothing filters on them, and their
#   statistics are two whole values per row group (~6 KB) that the Parquet writer holds until it
#   closes, three quarters of the file's metadata (3.1 MB at 180k rows with them, 0.8 MB without).
RAW_SAMPLES_WRITER_OPTIONS = dict(
    write_statistics=[name for name in RAW_SAMPLES_SCHEMA.names if name not in ("image", "thumbprint")],
    compression={name: "none" if name in ("image", "thumbprint", "content_hash") else "snappy"
                 for name in RAW_SAMPLES_SCHEMA.names},
    use_dictionary=["drop_id", "mode", "format", "status", "quarantine_reason", "label"],
)


@dataclass
class IngestStats:
    n_samples: int = 0
    n_valid: int = 0
    bytes: int = 0
    quarantined: Counter = field(default_factory=Counter)

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())


def sample_id_for(drop_id: str, local_id: str) -> str:
    return f"{drop_id}/{local_id}"


# Keys of the exact-duplicate stores held in memory before they go to disk (~1 MB each).
SEEN_KEYS_IN_MEMORY = 8192


def ingest_batches(source: DropSource, drop_id: str, limits: ImageLimits, max_caption_chars: int,
                   stats: IngestStats, batch_rows: int = 512, workers: int = 1) -> Iterator[pa.RecordBatch]:
    """Rows of the drop, in record order. `workers` processes inspect images (decode, hash,
    fingerprint); the decisions that depend on earlier rows (repeated ids, repeated content) are
    taken here, in order, so the rows are the same for any number of workers."""
    # Every content digest and id seen so far (an id maps to how many later duplicates it has
    # had), on disk: as a Python set and dict they grew ~23 MB per 100k samples.
    with SeenKeys(SEEN_KEYS_IN_MEMORY) as seen_hashes, SeenKeys(SEEN_KEYS_IN_MEMORY) as seen_ids:
        records = map(_make_storable, iter_records(source, limits.max_file_bytes))
        inspected = _inspect_all(records, limits, workers)
        while chunk := list(islice(inspected, batch_rows)):
            # one query per store for the whole batch; the rows' checks below are then in memory
            seen_ids.prefetch(rec.local_id for rec, _ in chunk)
            seen_hashes.prefetch(_digest(seen.content_hash) for _, seen in chunk if seen.content_hash)
            batch = [_row(rec, seen, drop_id, max_caption_chars, seen_hashes, seen_ids) for rec, seen in chunk]
            for row in batch:
                stats.n_samples += 1
                stats.bytes += row["n_bytes"] or 0
                if row["status"] == "valid":
                    stats.n_valid += 1
                else:
                    stats.quarantined[row["quarantine_reason"]] += 1
            seen_ids.flush_if_full()
            seen_hashes.flush_if_full()
            yield pa.RecordBatch.from_pylist(batch, schema=RAW_SAMPLES_SCHEMA)


def _digest(content_hash: str) -> bytes:
    """The sha256 hex digest as its 32 bytes: half the size on disk and in memory."""
    return bytes.fromhex(content_hash)


# Records inspected serially before a process pool is worth its start (a spawned worker starts
# an interpreter and imports inspection.py, a few tenths of a second); drops smaller than this
# never start one.
POOL_AFTER_RECORDS = 512
# A task sent to a worker process: up to this many records (enough to amortise the pickling
# round trip) or this many image bytes (photo-sized drops), whichever comes first.
POOL_CHUNK = 64
POOL_CHUNK_BYTES = 32_000_000


def _inspect_all(records: Iterable[RawRecord], limits: ImageLimits,
                 workers: int) -> Iterator[tuple[RawRecord, Inspection]]:
    """(record, inspection) in record order.

    With workers > 1, after the first POOL_AFTER_RECORDS records, chunks of records go to worker
    processes (decoding a small image releases the GIL too briefly for threads to gain). Reading
    stays in this process, so tar members are read in order, and only a bounded window of chunks
    is in flight, so memory stays flat whatever the drop size."""
    records = iter(records)
    head = POOL_AFTER_RECORDS if workers > 1 else None  # None: all of them here
    for rec in islice(records, head):
        yield rec, inspect_image(rec.image_bytes, limits)
    following = next(records, None)
    if following is None:  # a small drop: no pool started
        return
    records = chain([following], records)
    window: deque = deque()
    # spawn, not fork: the caller may be a threaded Dagster process, and workers need only PIL
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for chunk in _chunks(records):
            window.append((chunk, pool.submit(inspect_chunk, [r.image_bytes for r in chunk], limits)))
            if len(window) >= 2 * workers:
                yield from _done(window.popleft())
        while window:
            yield from _done(window.popleft())


def _chunks(records: Iterator[RawRecord]) -> Iterator[list[RawRecord]]:
    chunk, size = [], 0
    for rec in records:
        chunk.append(rec)
        size += len(rec.image_bytes or b"")
        if len(chunk) >= POOL_CHUNK or size >= POOL_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _done(entry) -> Iterator[tuple[RawRecord, Inspection]]:
    chunk, future = entry
    yield from zip(chunk, future.result())


def _row(rec: RawRecord, seen: Inspection, drop_id: str, max_caption_chars: int,
         seen_hashes: SeenKeys, seen_ids: SeenKeys) -> dict:
    data = rec.image_bytes
    repeated_id = _claim_id(rec, seen_ids)
    row = {
        "sample_id": sample_id_for(drop_id, rec.local_id), "drop_id": drop_id, "local_id": rec.local_id,
        "path": rec.path, "content_hash": seen.content_hash,
        "n_bytes": len(data) if data is not None else None, "width": None, "height": None, "mode": None,
        "format": None, "raw_caption": raw_caption_text(rec.caption), "caption": None, "url": rec.url,
        "label": rec.label, "status": "valid", "quarantine_reason": None, "quarantine_detail": None,
        "image": None,
        "thumbprint": None,
    }
    try:
        if repeated_id is not None:
            raise ImageRejected("duplicate_sample_id", f"{repeated_id!r} appears earlier in the drop")
        if rec.fetch_error:
            raise ImageRejected(rec.fetch_error, rec.fetch_detail or rec.path)
        if seen.rejected is not None:
            raise seen.rejected
        row.update(width=seen.width, height=seen.height, mode=seen.mode, format=seen.format)
        row["caption"] = normalise_caption(rec.caption, max_caption_chars)
        digest = _digest(row["content_hash"])
        if digest in seen_hashes:
            raise ImageRejected("duplicate_content", f"same bytes as an earlier sample ({row['content_hash'][:12]})")
        seen_hashes.add(digest)
        row["image"] = data
        row["thumbprint"] = seen.thumbprint
    except (ImageRejected, CaptionRejected) as exc:
        row.update(status="quarantined", quarantine_reason=exc.reason, quarantine_detail=storable_text(str(exc)),
                   caption=None)
    return row


def _make_storable(rec: RawRecord) -> RawRecord:
    """Ids, paths and metadata as the catalog can store them (see `storable_text`), before any id
    is looked up, so that two ids that escape alike are told apart as duplicates."""
    rec.local_id, rec.path = storable_text(rec.local_id), storable_text(rec.path)
    rec.url = storable_text(rec.url) if rec.url is not None else None
    rec.label = storable_text(rec.label) if rec.label is not None else None
    return rec


def _claim_id(rec: RawRecord, seen_ids: SeenKeys) -> str | None:
    """Register the record's id. A later duplicate gets a fresh id (sample_id is the catalog's
    primary key, and every input row keeps a row of its own: rows in = rows out); the id it
    repeats is returned so the row can be quarantined."""
    repeated = rec.local_id
    if repeated not in seen_ids:
        seen_ids[repeated] = 0
        return None
    rec.local_id = _unused_id(repeated, seen_ids)
    seen_ids[rec.local_id] = 0
    return repeated


def _unused_id(local_id: str, seen_ids: SeenKeys) -> str:
    """`<id>#dup<n>` not taken yet; the count kept per id makes many copies of one id linear."""
    n = seen_ids[local_id] + 1
    while f"{local_id}#dup{n}" in seen_ids:
        n += 1
    seen_ids[local_id] = n
    return f"{local_id}#dup{n}"
