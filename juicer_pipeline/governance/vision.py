"""Driving the governor over a partition: batches in, saliency + embeddings + classes out."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .images import autocast, load_rgb
from .saliency import METHODS, VisionPass

SALIENCY_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("grid_h", pa.int16()), ("grid_w", pa.int16()),
     ("embedding", pa.list_(pa.float32()))] + [(m, pa.list_(pa.float32())) for m in METHODS]
)


def iter_valid_images(raw_samples: "str | pq.ParquetFile", batch_size: int) -> Iterator[tuple[list[str], list[Image.Image]]]:
    """Valid samples of a raw_samples Parquet file (a path, or an open file on any filesystem),
    decoded, in batches (bounded memory)."""
    pf = raw_samples if isinstance(raw_samples, pq.ParquetFile) else pq.ParquetFile(raw_samples)
    ids, images = [], []
    for batch in pf.iter_batches(batch_size=batch_size, columns=["sample_id", "status", "image"]):
        for sid, status, data in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if status != "valid":
                continue
            ids.append(sid)
            images.append(load_rgb(data))
            if len(ids) == batch_size:
                yield ids, images
                ids, images = [], []
    if ids:
        yield ids, images


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
