"""Streaming a Parquet file in bounded memory."""
from __future__ import annotations

from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def iter_parquet_batches(pf: pq.ParquetFile, batch_rows: int, columns: list[str] | None = None,
                         row_groups: Iterable[int] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of at most `batch_rows` rows, read one row group at a time.

    Instead of `ParquetFile.iter_batches`: with pyarrow 26 it keeps the buffers it has read
    allocated until the iterator ends. Measured on a 100k-sample raw_samples file: 215 MB still
    allocated after the last batch (the whole image column) against 5 MB at most here. Memory
    is bounded by one row group (the pipeline writes 512 rows per group)."""
    for group in range(pf.num_row_groups) if row_groups is None else row_groups:
        yield from pf.read_row_group(group, columns=columns).to_batches(max_chunksize=batch_rows)
