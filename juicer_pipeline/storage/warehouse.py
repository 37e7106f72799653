"""The warehouse: where every artifact lives on disk, and atomic writes into it.

Layout under the data root (``JUICER_DATA_DIR``, default ``./data``)::

    drops/                      incoming drops, one folder each
    world/                      the synthetic world's corpus and held-out sets
    warehouse/<asset>/<partition>.parquet
    shards/<asset>/<partition>/ pieces of a partition being computed by several steps (removed
                                once merged into the warehouse)
    catalog.duckdb
"""
from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

DATA_DIR_ENV = "JUICER_DATA_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it into place only if the block succeeds.

    Readers therefore see the old file or the new one, never half of one. A process killed
    mid-write leaves only its hidden temporary file (no reader globs it); the next successful
    write of the same artifact removes such leftovers.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
        _remove_leftovers(final, started)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_leftovers(final: Path, before: float) -> None:
    """Temporary files of `final` begun before this write: left by a killed or failed writer."""
    for old in final.parent.glob(f".{final.name}.*.tmp"):
        try:
            if old.stat().st_mtime < before:
                old.unlink()
        except FileNotFoundError:  # another writer's own cleanup got there first
            pass


@contextmanager
def stream_parquet(final: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer for row batches into `final`, renamed into place only if the block succeeds."""
    with atomic_path(final) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        try:
            yield writer
        finally:
            writer.close()


@dataclass(frozen=True)
class Warehouse:
    root: Path

    @property
    def drops_dir(self) -> Path:
        return self.root / "drops"

    @property
    def world_dir(self) -> Path:
        return self.root / "world"

    @property
    def tables_dir(self) -> Path:
        return self.root / "warehouse"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def asset_dir(self, asset: str) -> Path:
        return self.tables_dir / asset

    def partition_path(self, asset: str, partition: str) -> Path:
        return self.asset_dir(asset) / f"{partition}.parquet"

    def write_table(self, asset: str, partition: str, table: pa.Table) -> Path:
        path = self.partition_path(asset, partition)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    @contextmanager
    def stream_table(self, asset: str, partition: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer for row batches, so memory stays bounded whatever the partition size."""
        with stream_parquet(self.partition_path(asset, partition), schema) as writer:
            yield writer

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard_dir(self, asset: str, partition: str) -> Path:
        """Where the steps that compute one partition in pieces put their pieces (no catalog view
        and no reader of the warehouse looks here)."""
        return self.shards_dir / asset / partition

    def adopt(self, asset: str, partition: str, finished: Path) -> Path:
        """Move a finished file (written under the same data root) into place as the partition, atomically."""
        path = self.partition_path(asset, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        os.replace(finished, path)
        _remove_leftovers(path, started)
        return path

    def read_table(self, asset: str, partition: str, columns: list[str] | None = None) -> pa.Table:
        path = self.partition_path(asset, partition)
        if not path.exists():
            raise FileNotFoundError(f"{asset} has no partition {partition!r} at {path}; materialise it first")
        return pq.read_table(path, columns=columns)
