"""The DuckDB catalog: small tables written in short transactions, views over warehouse Parquet.

DuckDB allows one writing process at a time and Dagster runs steps in parallel processes, so
every write opens a connection, does one short transaction and closes it; lock conflicts are
retried with jittered exponential backoff for `lock_timeout_s`. Readers outside the pipeline use
`snapshot()` (a copy) or the Parquet files, never a long-lived connection to this file. Bulk
per-sample data stays in Parquet.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import duckdb

log = logging.getLogger(__name__)
T = TypeVar("T")
SNAPSHOT_NAME = "catalog-snapshot.duckdb"

# Append-only: a released migration is never edited; a schema change is a new entry.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
    CREATE TABLE drops (
        drop_id VARCHAR PRIMARY KEY,
        path VARCHAR NOT NULL,
        format VARCHAR NOT NULL,
        sources VARCHAR NOT NULL,          -- JSON list of manifest / shard files
        n_samples INTEGER NOT NULL,
        n_valid INTEGER NOT NULL,
        n_quarantined INTEGER NOT NULL,
        bytes BIGINT NOT NULL,
        ingested_at TIMESTAMP NOT NULL,
        run_id VARCHAR
    );
    CREATE TABLE samples (
        sample_id VARCHAR PRIMARY KEY,     -- '<drop>/<local id>', stable across re-ingestion
        drop_id VARCHAR NOT NULL,
        local_id VARCHAR NOT NULL,
        content_hash VARCHAR,              -- sha256 of the file bytes
        path VARCHAR NOT NULL,
        width INTEGER,
        height INTEGER,
        n_bytes BIGINT,
        raw_caption VARCHAR,
        status VARCHAR NOT NULL,           -- 'valid' | 'quarantined'
        quarantine_reason VARCHAR
    );
    CREATE INDEX samples_drop ON samples (drop_id);
    CREATE INDEX samples_hash ON samples (content_hash);
    CREATE TABLE lineage (
        artifact VARCHAR PRIMARY KEY,      -- '<asset>/<partition>'
        asset VARCHAR NOT NULL,
        partition_key VARCHAR,
        inputs VARCHAR NOT NULL,           -- JSON list of upstream artifacts or files
        run_id VARCHAR,
        code_version VARCHAR NOT NULL,
        config_hash VARCHAR NOT NULL,
        governor_id VARCHAR,
        created_at TIMESTAMP NOT NULL
    );
    """),
    (2, """
    CREATE TABLE models (
        model_id VARCHAR PRIMARY KEY,      -- sha256 of the weights file
        role VARCHAR NOT NULL,             -- 'governor' | 'student'
        source VARCHAR NOT NULL,
        config VARCHAR NOT NULL,           -- JSON: architecture / settings
        record VARCHAR NOT NULL,           -- JSON: training record and held-out scores
        tau DOUBLE,                        -- calibrated class threshold (governors)
        calibration VARCHAR,               -- JSON: how tau was chosen and what it reached
        created_at TIMESTAMP NOT NULL
    );
    """),
    (3, """
    CREATE TABLE training_sets (
        training_set_id VARCHAR PRIMARY KEY,  -- sha256 of (sample id, caption, kept patches) of every member
        recipe VARCHAR NOT NULL,
        n_members INTEGER NOT NULL,
        excluded VARCHAR NOT NULL,            -- JSON: reason -> count
        drops VARCHAR NOT NULL,               -- JSON list of drop ids it was assembled from
        config_hash VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    );
    CREATE TABLE training_set_members (
        training_set_id VARCHAR NOT NULL,
        recipe VARCHAR NOT NULL,
        sample_id VARCHAR NOT NULL,
        caption_version VARCHAR NOT NULL,     -- 'original' | 'cleaned' | 'enriched'
        caption VARCHAR NOT NULL,
        kept_patches VARCHAR NOT NULL         -- 'all', 'random', or the kept indices
    );
    CREATE INDEX members_sample ON training_set_members (sample_id);
    CREATE TABLE checkpoints (
        checkpoint_id VARCHAR PRIMARY KEY,    -- sha256 of the weights file
        recipe VARCHAR NOT NULL,
        seed INTEGER NOT NULL,
        training_set_id VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        config_hash VARCHAR NOT NULL,
        tokens_seen BIGINT NOT NULL,
        samples_seen BIGINT NOT NULL,
        wall_seconds DOUBLE NOT NULL,
        final_loss DOUBLE NOT NULL,
        record VARCHAR NOT NULL,              -- JSON: phases, step times, learning curve
        created_at TIMESTAMP NOT NULL
    );
    CREATE TABLE benchmark_scores (
        score_id VARCHAR PRIMARY KEY,         -- '<checkpoint id>:<metric>'
        checkpoint_id VARCHAR NOT NULL,
        recipe VARCHAR NOT NULL,
        seed INTEGER NOT NULL,
        metric VARCHAR NOT NULL,
        value DOUBLE NOT NULL,
        eval_set VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    );
    """),
    # Lineage becomes append-only (one row per materialisation, ordered by seq) so that a checkpoint
    # can be traced to the versions it was trained on; lineage_current is the latest row per artifact.
    # Rows from before this migration keep their order; overwritten history is not recoverable.
    (4, """
    CREATE SEQUENCE lineage_seq;
    CREATE TABLE lineage_log (
        seq BIGINT PRIMARY KEY DEFAULT nextval('lineage_seq'),
        artifact VARCHAR NOT NULL,         -- '<asset>/<partition>'
        asset VARCHAR NOT NULL,
        partition_key VARCHAR,
        inputs VARCHAR NOT NULL,           -- JSON list of upstream artifacts or files
        run_id VARCHAR,                    -- Dagster run that materialised it
        code_version VARCHAR NOT NULL,
        config_hash VARCHAR NOT NULL,
        governor_id VARCHAR,
        created_at TIMESTAMP NOT NULL
    );
    INSERT INTO lineage_log (artifact, asset, partition_key, inputs, run_id, code_version, config_hash,
                             governor_id, created_at)
        SELECT * FROM lineage ORDER BY created_at, artifact;
    DROP TABLE lineage;
    ALTER TABLE lineage_log RENAME TO lineage;
    CREATE INDEX lineage_artifact ON lineage (artifact);
    CREATE VIEW lineage_current AS
        SELECT * FROM lineage QUALIFY row_number() OVER (PARTITION BY artifact ORDER BY seq DESC) = 1;
    -- the last lineage seq a checkpoint saw: its trace reads lineage as of then
    ALTER TABLE checkpoints ADD COLUMN lineage_seq BIGINT;
    UPDATE checkpoints SET lineage_seq = (SELECT max(seq) FROM lineage);
    """),
    # Two fair comparisons: a checkpoint was trained at the equal vision-token budget or at the
    # equal wall-clock budget; earlier checkpoints were all token-budget runs.
    (5, """
    ALTER TABLE checkpoints ADD COLUMN budget VARCHAR DEFAULT 'tokens';
    UPDATE checkpoints SET budget = 'tokens';
    """),
    # Commit records folded by the committer (storage/commits.py): a record's id is written in the
    # same transaction as its rows, so no record is ever applied twice.
    (6, """
    CREATE TABLE commits (
        commit_id VARCHAR PRIMARY KEY,        -- '<submission time ns>-<random>'
        n_ops INTEGER NOT NULL,
        folded_at TIMESTAMP NOT NULL
    );
    """),
    # Drops as versioned inputs: the content fingerprint each was ingested at, and whether its
    # folder is still there (the drop sensor marks a drop whose folder was deleted).
    (7, """
    ALTER TABLE drops ADD COLUMN version VARCHAR;             -- fingerprint of the files ingested
    ALTER TABLE drops ADD COLUMN status VARCHAR DEFAULT 'present';  -- 'present' | 'deleted'
    ALTER TABLE drops ADD COLUMN status_changed_at TIMESTAMP;
    UPDATE drops SET status = 'present';
    """),
]


class CatalogLocked(RuntimeError):
    pass


_lock_backoffs = 0  # back-offs on lock or write conflicts in this process (reported by the committer)


def lock_backoffs() -> int:
    return _lock_backoffs


@dataclass(frozen=True)
class LineageRow:
    asset: str
    partition_key: str | None
    inputs: list[str]
    run_id: str | None
    code_version: str
    config_hash: str
    governor_id: str | None = None

    @property
    def artifact(self) -> str:
        return f"{self.asset}/{self.partition_key}" if self.partition_key else self.asset


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

    def query(self, sql: str, params: list | None = None):
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


def write_lineage(con: duckdb.DuckDBPyConnection, row: LineageRow) -> int:
    """Append one materialisation's lineage and return its seq; call inside the transaction that
    writes its data. Earlier rows stay, so older checkpoints can still be traced as they were."""
    return con.execute(
        "INSERT INTO lineage (artifact, asset, partition_key, inputs, run_id, code_version, config_hash, "
        "governor_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        [row.artifact, row.asset, row.partition_key, json.dumps(row.inputs), row.run_id,
         row.code_version, row.config_hash, row.governor_id, _now()],
    ).fetchone()[0]


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def replace_drop(con: duckdb.DuckDBPyConnection, drop: dict, samples_parquet: "str | Path") -> None:
    """Replace exactly one drop's catalog rows from its raw_samples Parquet (read by DuckDB
    directly, so no per-sample Python objects are built)."""
    con.execute("DELETE FROM samples WHERE drop_id = ?", [drop["drop_id"]])
    con.execute(
        """INSERT INTO samples
           SELECT sample_id, drop_id, local_id, content_hash, path, width, height, n_bytes,
                  raw_caption, status, quarantine_reason
           FROM read_parquet(?)""",
        [str(samples_parquet)],
    )
    con.execute("DELETE FROM drops WHERE drop_id = ?", [drop["drop_id"]])
    con.execute(
        "INSERT INTO drops (drop_id, path, format, sources, n_samples, n_valid, n_quarantined, bytes, ingested_at, "
        "run_id, version, status, status_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'present', ?)",
        [drop["drop_id"], drop["path"], drop["format"], json.dumps(drop["sources"]), drop["n_samples"],
         drop["n_valid"], drop["n_quarantined"], drop["bytes"], _now(), drop.get("run_id"), drop.get("version"),
         _now()],
    )


def mark_drop(con: duckdb.DuckDBPyConnection, drop_id: str, status: str) -> None:
    """Record that a drop's folder is gone ('deleted') or back ('present'); its rows stay, marked."""
    if status not in ("present", "deleted"):
        raise ValueError(f"unknown drop status {status!r}")
    con.execute("UPDATE drops SET status = ?, status_changed_at = ? WHERE drop_id = ? AND status <> ?",
                [status, _now(), drop_id, status])


def upsert_model(con: duckdb.DuckDBPyConnection, model_id: str, role: str, source: str, config: dict,
                 record: dict, tau: float | None = None, calibration: dict | None = None) -> None:
    con.execute("DELETE FROM models WHERE model_id = ?", [model_id])
    con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [model_id, role, source, json.dumps(config), json.dumps(record), tau,
                 json.dumps(calibration) if calibration is not None else None, _now()])


def replace_checkpoints(con: duckdb.DuckDBPyConnection, recipe: str,
                        checkpoints: list[tuple[dict, LineageRow]]) -> None:
    """Make these the recipe's checkpoints. Each is recorded with the seq of its own lineage row,
    so its trace reads lineage as of when it was made; `ckpt` holds the checkpoints columns up
    to `record`."""
    con.execute("DELETE FROM checkpoints WHERE recipe = ?", [recipe])
    for ckpt, lineage in checkpoints:
        row = {**ckpt, "lineage_seq": write_lineage(con, lineage)}
        con.execute(f"INSERT INTO checkpoints ({', '.join(row)}, created_at) "
                    f"VALUES ({', '.join('?' * len(row))}, now())", list(row.values()))
    _prune_training_sets(con, recipe)


def replace_training_set(con: duckdb.DuckDBPyConnection, ts: dict, members) -> list[str]:
    """Make `ts` the recipe's training set; return the ids it supersedes."""
    old = [r[0] for r in con.execute("SELECT training_set_id FROM training_sets WHERE recipe = ? "
                                     "AND training_set_id <> ?", [ts["recipe"], ts["training_set_id"]]).fetchall()]
    for table in ("training_set_members", "training_sets"):
        con.execute(f"DELETE FROM {table} WHERE training_set_id = ?", [ts["training_set_id"]])
    con.register("members_df", members)
    con.execute("INSERT INTO training_set_members SELECT * FROM members_df")
    con.unregister("members_df")
    # DuckDB's now(), as in earlier releases: pruning compares created_at with their rows
    con.execute(f"INSERT INTO training_sets ({', '.join(ts)}, created_at) VALUES ({', '.join('?' * len(ts))}, now())",
                list(ts.values()))
    _prune_training_sets(con, ts["recipe"])
    return old


def _prune_training_sets(con: duckdb.DuckDBPyConnection, recipe: str) -> None:
    """Keep the recipe's newest training set and any set a recorded checkpoint was trained on (so
    that checkpoint can still be traced); drop the rest."""
    doomed = """SELECT training_set_id FROM training_sets WHERE recipe = $r
                AND training_set_id NOT IN (SELECT training_set_id FROM checkpoints)
                AND created_at < (SELECT max(created_at) FROM training_sets WHERE recipe = $r)"""
    for table in ("training_set_members", "training_sets"):
        con.execute(f"DELETE FROM {table} WHERE training_set_id IN ({doomed})", {"r": recipe})
