"""The DuckDB catalog: small tables written in short transactions, views over warehouse Parquet.

DuckDB allows one writing process at a time and Dagster runs steps in parallel processes, so
every write opens a connection, does one short transaction and closes it; lock conflicts are
retried with jittered exponential backoff for `lock_timeout_s`. Readers outside the pipeline use
`snapshot()` (a copy) or the Parquet files, never a long-lived connection to this file. Bulk
per-sample data stays in Parquet.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import duckdb

from .records import _now
from .schema import MIGRATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")
SNAPSHOT_NAME = "catalog-snapshot.duckdb"

class CatalogLocked(RuntimeError):
    pass


_lock_backoffs = 0  # back-offs on lock or write conflicts in this process (reported by the committer)


def lock_backoffs() -> int:
    return _lock_backoffs


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


def _db_name(con: duckdb.DuckDBPyConnection) -> str:
    return con.execute("SELECT current_database()").fetchone()[0]


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflict" in text


@dataclass(frozen=True)
class Catalog:
    path: Path
    lock_timeout_s: float = 120.0  # settings: [catalog] lock_timeout_s
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    # an fsspec filesystem registered on every connection, when the warehouse is on object storage
    # (the views and drop rows read its Parquet files)
    filesystem: object | None = field(default=None, compare=False)
    # DuckDB's memory limit for this process's catalog connections (settings: [catalog]
    # memory_limit). Replacing a 200k-sample drop's rows otherwise holds ~1 KB per row in memory;
    # under the limit DuckDB spills to a temporary folder beside the catalog instead.
    memory_limit: str | None = None

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._open(read_only)
        try:
            yield con
        finally:
            con.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        con = self._retry_locked(lambda: duckdb.connect(str(self.path), read_only=read_only))
        if self.memory_limit:
            con.execute(f"SET memory_limit = '{self.memory_limit}'")
        if self.filesystem is not None:
            con.register_filesystem(self.filesystem)
        return con

    def _retry_locked(self, attempt: Callable[[], T]) -> T:
        """Run `attempt`, backing off (jittered, exponential, capped) while it fails on a lock or
        write conflict, for at most lock_timeout_s: another process may hold the file briefly."""
        deadline = time.monotonic() + self.lock_timeout_s
        for n in itertools.count():
            try:
                return attempt()
            except duckdb.Error as exc:
                left = deadline - time.monotonic()
                if not _is_lock_error(exc):
                    raise
                if left <= 0:
                    raise CatalogLocked(f"catalog {self.path} stayed locked for {self.lock_timeout_s:g} s: another "
                                        f"process holds it (an open connection, even read-only, or a long "
                                        f"write). Close it and query catalog-snapshot.duckdb instead, or raise "
                                        f"[catalog] lock_timeout_s. DuckDB said: {exc}") from exc
                global _lock_backoffs
                _lock_backoffs += 1
                delay = min(self.base_delay_s * 2 ** min(n, 10), self.max_delay_s) * random.uniform(0.5, 1.5)
                log.info("catalog locked (attempt %d), retrying in %.2fs", n + 1, delay)
                time.sleep(min(delay, max(left, 0.001)))
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One short read-write transaction; rolled back on any error. Backs off at connect and at
        BEGIN; use `write` where a conflict later in the transaction should be retried too."""
        with self.connect() as con:
            self._retry_locked(lambda: con.execute("BEGIN TRANSACTION"))
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise

    def write(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `work` in one transaction, re-running the whole transaction while it hits a lock or
        write conflict anywhere (connect, a statement, COMMIT), within lock_timeout_s."""
        def once() -> T:
            with self.transaction() as con:
                return work(con)
        return self._retry_locked(once)

    @property
    def snapshot_path(self) -> Path:
        return Path(self.path).with_name(SNAPSHOT_NAME)

    def snapshot(self, dest: Path | None = None) -> Path:
        """Copy the catalog to `dest` (default: catalog-snapshot.duckdb beside it) for readers outside
        the pipeline: they open the copy, so they never hold the lock that writers need. The copy
        is written to a temporary file and renamed, so an open snapshot is never half-written."""
        dest = Path(dest) if dest is not None else self.snapshot_path
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with self.connect() as con:  # read-write: ATTACH needs it; held only for the copy
                con.execute(f"ATTACH '{_sql_str(tmp)}' AS snapshot_copy")
                con.execute(f"COPY FROM DATABASE \"{_db_name(con)}\" TO snapshot_copy")
                con.execute("DETACH snapshot_copy")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def migrate(self) -> int:
        """Apply pending migrations; return the schema version."""
        return self.write(_migrate)

    def refresh_views(self, warehouse) -> list[str]:
        """A view per warehouse asset over all its partition files (read per query, never copied)."""
        assets = warehouse.assets()
        return self.write(lambda con: _refresh_views(con, {a: f"{warehouse.asset_dir(a)}/*.parquet" for a in assets}))

    def query(self, sql: str, params: list | dict | None = None):
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).df()


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:  # a failed COMMIT has already ended the transaction
        pass


def _migrate(con: duckdb.DuckDBPyConnection) -> int:
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
    current = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    for version, sql in MIGRATIONS:
        if version > current:
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, _now()])
            current = version
    return current


def _refresh_views(con: duckdb.DuckDBPyConnection, globs: dict[str, str]) -> list[str]:
    for name, glob in globs.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS "
                    f"SELECT * FROM read_parquet('{glob.replace(chr(39), chr(39) * 2)}', union_by_name = true)")
    return list(globs)
