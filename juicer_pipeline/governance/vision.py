"""Driving the governor over a partition: batches in, saliency + embeddings + classes out."""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..training.runtime import autocast
from .images import load_rgb
from .parquet_batches import iter_parquet_batches
from .saliency import METHODS, VisionPass

# patch_saliency is written in row groups of this many rows (under 1 MB compressed with the world
# governor), not one per scored batch: see RowGroupWriter.
SALIENCY_ROW_GROUP_ROWS = 1024

SALIENCY_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("grid_h", pa.int16()), ("grid_w", pa.int16()),
     ("embedding", pa.list_(pa.float32()))] + [(m, pa.list_(pa.float32())) for m in METHODS]
)


def iter_valid_images(raw_samples: "str | pq.ParquetFile", batch_size: int, start: int = 0,
                      stop: int | None = None) -> Iterator[tuple[list[str], list[Image.Image]]]:
    """Valid samples of a raw_samples Parquet file (a path, or a ParquetFile on any filesystem),
    decoded, in batches (bounded memory).

    `start`/`stop` select a range of valid images by their position among the valid rows (as
    `range(start, stop)`); row groups wholly outside it are not read and rows outside it are not
    decoded. Batches are counted from `start`, so a range that starts on a multiple of
    `batch_size` yields exactly the batches a pass over the whole file yields for those rows.
    """
    ids, images = [], []
    for sid, data in _valid_rows(_parquet(raw_samples), batch_size, start, stop):
        ids.append(sid)
        images.append(load_rgb(data))
        if len(ids) == batch_size:
            yield ids, images
            ids, images = [], []
    if ids:
        yield ids, images


def _valid_rows(pf: pq.ParquetFile, batch_rows: int, start: int, stop: int | None) -> Iterator[tuple[str, bytes]]:
    """(sample_id, image bytes) of valid rows start..stop, undecoded."""
    groups, index = list(range(pf.num_row_groups)), 0
    if start > 0 or stop is not None:
        groups, index = _row_groups_holding(pf, start, stop)
    if not groups:
        return
    for batch in iter_parquet_batches(pf, batch_rows, ["sample_id", "status", "image"], groups):
        for sid, status, data in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if status != "valid":
                continue
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield sid, data
            index += 1


def _row_groups_holding(pf: pq.ParquetFile, start: int, stop: int | None) -> tuple[list[int], int]:
    """The row groups that hold valid rows start..stop, and how many valid rows precede the first."""
    groups, before, seen = [], 0, 0
    for g in range(pf.num_row_groups):
        n = pc.sum(pc.equal(pf.read_row_group(g, columns=["status"]).column(0), "valid")).as_py() or 0
        if seen + n > start and (stop is None or seen < stop):
            if not groups:
                before = seen
            groups.append(g)
        seen += n
    return groups, before


def _parquet(source: "str | pq.ParquetFile") -> pq.ParquetFile:
    return source if isinstance(source, pq.ParquetFile) else pq.ParquetFile(source)


def count_valid_images(raw_samples: "str | pq.ParquetFile") -> int:
    """How many valid samples a raw_samples Parquet file holds (reads only the status column)."""
    status = _parquet(raw_samples).read(columns=["status"]).column(0)
    return pc.sum(pc.equal(status, "valid")).as_py() or 0


def shard_ranges(n_valid: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Split valid rows 0..n_valid into at most `shards` contiguous ranges of whole batches.

    Every boundary falls on a multiple of `batch_size`, so each image is scored in the very batch
    a single pass would score it in (a model's numerics can depend on the batch), and the
    concatenated shards equal the single pass exactly. There is never more than one shard per
    batch, and an empty drop is one empty range.
    """
    if shards < 1 or batch_size < 1:
        raise ValueError(f"shards and batch_size must be at least 1, got {shards} and {batch_size}")
    n_batches = -(-n_valid // batch_size)
    if n_batches == 0:
        return [(0, 0)]
    k = min(shards, n_batches)
    base, extra = divmod(n_batches, k)
    ranges, first = [], 0
    for i in range(k):
        last = first + base + (1 if i < extra else 0)
        ranges.append((first * batch_size, min(last * batch_size, n_valid)))
        first = last
    return ranges


def range_digests(raw_samples: "str | pq.ParquetFile", ranges: list[tuple[int, int]], batch_rows: int = 8192) -> list[str]:
    """sha256 of (sample_id, content_hash) of the valid rows of each range, in row order: what a
    shard scored, so that a shard written for other rows or other image bytes is never reused."""
    digests = [hashlib.sha256() for _ in ranges]
    index, r = 0, 0
    pf = _parquet(raw_samples)
    for batch in iter_parquet_batches(pf, batch_rows, ["sample_id", "status", "content_hash"]):
        for sid, status, content in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if status != "valid":
                continue
            while r < len(ranges) and index >= ranges[r][1]:
                r += 1
            if r < len(ranges) and index >= ranges[r][0]:
                digests[r].update(f"{sid}\0{content}\n".encode())
            index += 1
    return [d.hexdigest() for d in digests]


def score_batch(fm, vision: VisionPass, images: list[Image.Image], precision: str = "fp32"):
    x = torch.stack([fm.preprocess(im) for im in images]).to(fm.device)
    with autocast(fm.device, precision):
        return vision.run(x)


def saliency_record_batch(ids: list[str], grid: tuple[int, int], out) -> pa.RecordBatch:
    cols = {"sample_id": ids, "grid_h": [grid[0]] * len(ids), "grid_w": [grid[1]] * len(ids),
            "embedding": list(out.embeddings.cpu().numpy().astype(np.float32))}
    cols.update({m: list(out.saliency[m].numpy().astype(np.float32)) for m in METHODS})
    return pa.RecordBatch.from_pydict(cols, schema=SALIENCY_SCHEMA)


class CorruptStoredRow(ValueError):
    """A stored embedding or saliency row that cannot be what the governor wrote."""


def stored_vectors(table: pa.Table, column: str, expected_len: int | None = None) -> np.ndarray:
    """A list<float32> column as a 2-D array; a row of the wrong length or with NaN fails loudly,
    naming the sample, instead of silently producing wrong decisions downstream."""
    values = table.column(column).to_pylist()
    ids = table.column("sample_id").to_pylist()
    width = expected_len if expected_len is not None else (len(values[0]) if values else 0)
    out = np.zeros((len(values), width), dtype=np.float32)
    for i, (sid, v) in enumerate(zip(ids, values)):
        if v is None or len(v) != width:
            raise CorruptStoredRow(f"{column} of sample {sid!r} has {0 if v is None else len(v)} values, "
                                   f"expected {width}: re-materialise patch_saliency for this drop")
        out[i] = v
    if not np.isfinite(out).all():
        bad = ids[int(np.where(~np.isfinite(out).all(axis=1))[0][0])]
        raise CorruptStoredRow(f"{column} of sample {bad!r} holds NaN or inf: re-materialise patch_saliency")
    return out
