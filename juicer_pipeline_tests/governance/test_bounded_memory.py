"""What keeps a stage's memory from growing with the drop: Parquet streamed one row group at a
time, and a DuckDB memory limit on catalog connections."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from juicer_pipeline.governance.parquet_batches import coalesced_row_groups, iter_parquet_batches
from juicer_pipeline.storage import Catalog


def _blob_file(path, groups=40, rows=50, blob=20_000):
    schema = pa.schema([("sample_id", pa.string()), ("image", pa.binary())])
    with pq.ParquetWriter(path, schema) as w:
        for g in range(groups):
            ids = [f"s{g * rows + i}" for i in range(rows)]
            w.write_table(pa.table({"sample_id": ids, "image": [os.urandom(blob) for _ in ids]}, schema=schema))
    return pq.ParquetFile(path)


def _stream(pf, batch_rows=16):
    before, peak, ids = pa.total_allocated_bytes(), 0, []
    for batch in iter_parquet_batches(pf, batch_rows, ["sample_id", "image"]):
        assert batch.num_rows <= batch_rows
        ids += batch.column(0).to_pylist()
        peak = max(peak, pa.total_allocated_bytes() - before)
        del batch
    return ids, peak, pa.total_allocated_bytes() - before


def test_streamed_batches_hold_the_same_rows_in_memory_that_does_not_grow_with_the_file(tmp_path):
    small = _blob_file(tmp_path / "small.parquet", groups=10)  # 10 MB of images in 1 MB row groups
    big = _blob_file(tmp_path / "big.parquet", groups=60)  # 60 MB
    ids, small_peak, _ = _stream(small)
    assert ids == small.read(columns=["sample_id"]).column(0).to_pylist()
    ids, big_peak, left = _stream(big)
    assert ids == big.read(columns=["sample_id"]).column(0).to_pylist()
    # A few 1 MB row groups at most (2 to 4 MB measured, by the allocator's state), for a 10 MB
    # file and a 60 MB one alike.
    assert small_peak < 8_000_000 and big_peak < 8_000_000, (small_peak, big_peak)
    # After the last batch at most a few row groups' worth stays allocated (1 to 4 MB, depending
    # on the allocator's state), never the file: pyarrow's iter_batches left all 60 MB.
    assert left < 8_000_000, left
    some = [b.column(0).to_pylist() for b in iter_parquet_batches(big, 100, ["sample_id"], [3, 7])]
    assert some == [[f"s{i}" for i in range(150, 200)], [f"s{i}" for i in range(350, 400)]]


def test_catalog_connections_carry_the_memory_limit(tmp_path):
    cat = Catalog(tmp_path / "catalog.duckdb", memory_limit="64MB")
    with cat.connect() as con:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit.replace(" ", "") in ("61.0MiB", "64.0MB", "61MiB")  # DuckDB reports it in MiB


def test_a_malformed_memory_limit_is_a_settings_error():
    from pydantic import ValidationError

    from juicer_pipeline.settings import CatalogSettings

    with pytest.raises(ValidationError, match="memory_limit"):
        CatalogSettings(memory_limit="lots")
    assert CatalogSettings().memory_limit == "64MB"


def test_small_batches_are_written_as_row_groups_of_at_least_the_minimum(tmp_path):
    """patch_saliency scores 64 images at a time; a row group per batch made the writer's
    metadata grow with the drop. Coalesced: 1000 rows in batches of 64 and a minimum of 256 are
    4 row groups (256+ rows each, the rest last), every row in order."""
    schema = pa.schema([("i", pa.int64())])
    path = tmp_path / "t.parquet"
    with pq.ParquetWriter(path, schema) as raw, coalesced_row_groups(raw, 256) as writer:
        for start in range(0, 1000, 64):
            writer.write_batch(pa.record_batch([pa.array(range(start, min(start + 64, 1000)))], schema=schema))
    pf = pq.ParquetFile(path)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    assert sizes == [256, 256, 256, 232]
    assert pf.read().column("i").to_pylist() == list(range(1000))


def test_rows_pending_in_a_coalescing_writer_are_not_written_when_the_block_fails(tmp_path):
    schema = pa.schema([("i", pa.int64())])
    path = tmp_path / "t.parquet"
    with pq.ParquetWriter(path, schema) as raw:
        with pytest.raises(RuntimeError):
            with coalesced_row_groups(raw, 256) as writer:
                writer.write_batch(pa.record_batch([pa.array([1, 2, 3])], schema=schema))
                raise RuntimeError("scoring failed")
    assert pq.ParquetFile(path).metadata.num_rows == 0  # the atomic write around it discards the file
