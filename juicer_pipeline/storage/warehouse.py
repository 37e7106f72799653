"""The warehouse: where every artifact lives on disk, and atomic writes into it.

Layout under the data root (``JUICER_DATA_DIR``, default ``./data``)::

    drops/                      incoming drops, one folder each
    world/                      the synthetic world's corpus and held-out sets
    warehouse/<asset>/<partition>.parquet   (or under [warehouse] url, e.g. s3://bucket/prefix)
    shards/<asset>/<partition>/ pieces of a partition being computed by several steps (removed
                                once merged into the warehouse)
    catalog.duckdb
    commits/pending|folded/     commit records, with [catalog] writes = "commit_records"
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Iterator

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

DATA_DIR_ENV = "JUICER_DATA_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plain_partition_name(partition: str) -> str:
    """`partition` if it names one file in a folder; a ValueError otherwise. Partition keys become
    file names, and a dynamic partition can be added by hand in the UI with any key: a key with a
    slash, a NUL byte or a leading dot would write outside its asset's folder or be hidden."""
    if (not partition or partition.startswith(".") or len(partition.encode("utf-8", "surrogatepass")) > 200
            or any(c in partition for c in "/\\\x00")):
        raise ValueError(f"partition key {partition[:80]!r} cannot name a file: use letters, digits, '_', '.', '-' "
                         f"(not first), at most 200 bytes")
    return partition


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
    """The data root (a local folder: drops, the world, the catalog, commit records) and the tables.

    The tables live under ``<root>/warehouse`` by default, or under any fsspec URL
    (``[warehouse] url``, e.g. ``s3://bucket/juicer``) shared by workers on many machines. Every
    table path this class hands out is a string that pyarrow (with `filesystem`) and DuckDB (after
    `register`) both read, local or not.
    """

    root: Path
    url: str | None = None
    storage_options: dict = field(default_factory=dict, hash=False, compare=False, repr=False)  # may hold keys

    @property
    def drops_dir(self) -> Path:
        return self.root / "drops"

    @property
    def world_dir(self) -> Path:
        return self.root / "world"

    @property
    def commits_dir(self) -> Path:
        return self.root / "commits"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    # --- the tables: local or object storage ----------------------------------------------

    @property
    def is_local(self) -> bool:
        return not self.url

    @property
    def tables_dir(self) -> str:
        """The tables' root: a local path, or the URL as given (what DuckDB and pyarrow read)."""
        return str(self.root / "warehouse") if self.is_local else self.url.rstrip("/")

    @cached_property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.tables_dir, **self.storage_options)[0]

    def asset_dir(self, asset: str) -> str:
        return f"{self.tables_dir}/{asset}"

    def partition_path(self, asset: str, partition: str) -> str:
        return f"{self.asset_dir(asset)}/{plain_partition_name(partition)}.parquet"

    def object_path(self, asset: str, name: str) -> str:
        """A non-table artifact of an asset (governor.json, a checkpoint, a chart)."""
        return f"{self.asset_dir(asset)}/{name}"

    def exists(self, path: str) -> bool:
        return self.filesystem.exists(path)

    def partitions(self, asset: str) -> list[str]:
        """Partition names of an asset's Parquet files, sorted."""
        if not self.exists(self.asset_dir(asset)):
            return []
        names = self.filesystem.glob(f"{self.asset_dir(asset)}/*.parquet")
        return sorted(PurePosixPath(n).stem for n in names if not PurePosixPath(n).name.startswith("."))

    def assets(self) -> list[str]:
        """Asset folders holding at least one Parquet file (one catalog view each)."""
        if not self.exists(self.tables_dir):
            return []
        folders = sorted(PurePosixPath(p).name for p in self.filesystem.ls(self.tables_dir, detail=False)
                         if self.filesystem.isdir(p))
        return [a for a in folders if self.partitions(a)]

    @contextmanager
    def duckdb(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection that can read these tables."""
        con = duckdb.connect()
        try:
            self.register(con)
            yield con
        finally:
            con.close()

    def local_copy(self, path: str) -> "contextlib.AbstractContextManager[Path]":
        """A local file with `path`'s content (the file itself when local), for readers that need one."""
        if self.is_local:
            return contextlib.nullcontext(Path(path))
        return self._downloaded(path)

    @contextmanager
    def _downloaded(self, path: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="juicer-download-") as folder:
            local = Path(folder) / PurePosixPath(path).name
            self.filesystem.get_file(path, str(local))
            yield local

    def register(self, con) -> None:
        """Let a DuckDB connection read these tables (object storage through fsspec, since DuckDB's
        httpfs extension is not assumed to be installable)."""
        if not self.is_local:
            con.register_filesystem(self.filesystem)

    def write_table(self, asset: str, partition: str, table: pa.Table) -> str:
        path = self.partition_path(asset, partition)
        with self.writing(path) as tmp:
            pq.write_table(table, tmp)
        return path

    @contextmanager
    def stream_table(self, asset: str, partition: str, schema: pa.Schema,
                     **writer_options) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer for row batches, so memory stays bounded whatever the partition size.
        `writer_options` go to `pq.ParquetWriter` (per-column compression and dictionary encoding)."""
        with self.writing(self.partition_path(asset, partition)) as tmp:
            writer = pq.ParquetWriter(tmp, schema, **writer_options)
            try:
                yield writer
            finally:
                writer.close()

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard_dir(self, asset: str, partition: str) -> Path:
        """Where the steps that compute one partition in pieces put their pieces (no catalog view
        and no reader of the warehouse looks here)."""
        return self.shards_dir / asset / plain_partition_name(partition)

    def adopt(self, asset: str, partition: str, finished: Path) -> str:
        """Make a finished local file (written under the same data root) the partition, atomically:
        renamed into place, or uploaded whole to object storage."""
        path = self.partition_path(asset, partition)
        if not self.is_local:
            self.filesystem.put_file(str(finished), path)
            Path(finished).unlink()
            return path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        os.replace(finished, path)
        _remove_leftovers(Path(path), started)
        return path

    def read_table(self, asset: str, partition: str, columns: list[str] | None = None,
                   filters=None) -> pa.Table:
        path = self.partition_path(asset, partition)
        if not self.exists(path):
            raise FileNotFoundError(f"{asset} has no partition {partition!r} at {path}; materialise it first")
        return pq.read_table(path, columns=columns, filters=filters, filesystem=self.filesystem)

    def parquet_file(self, asset: str, partition: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.partition_path(asset, partition), filesystem=self.filesystem)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.writing(path) as tmp:
            Path(tmp).write_bytes(data)

    def read_text(self, path: str) -> str:
        with self.filesystem.open(path, "r") as f:
            return f.read()

    @contextmanager
    def writing(self, path: str) -> Iterator[Path]:
        """A local temporary file that becomes `path` only if the block succeeds: renamed into
        place locally; uploaded on object storage, where an object appears whole or not at all."""
        if self.is_local:
            with atomic_path(Path(path)) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory(prefix="juicer-upload-") as folder:
            tmp = Path(folder) / PurePosixPath(path).name
            yield tmp
            self.filesystem.put_file(str(tmp), path)
