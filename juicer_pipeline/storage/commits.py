"""Commit records: how workers on many machines get their rows into a single-writer catalog.

DuckDB allows one writing process per file, and its lock does not hold across machines sharing a
network folder. So with ``[catalog] writes = "commit_records"`` a per-drop step never opens the
catalog: it writes its Parquet, then one small JSON record of the catalog operations it would have
run (``commits/pending/<time>-<id>.json``, written atomically). One committer (the
``catalog_committer`` sensor, or ``juicer catalog fold``) folds pending records in order, each in
one catalog transaction, and moves them to ``commits/folded/``.

Folding is idempotent: a record's id is inserted into the ``commits`` table in the same
transaction as its rows, so a committer killed between the commit and the move (or a second
committer) never applies a record twice.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb

from .catalog import Catalog, lock_backoffs
from .records import LineageRow, mark_drop, replace_drop, write_lineage
from .warehouse import atomic_path

log = logging.getLogger(__name__)


def lineage_op(row: LineageRow) -> dict:
    return {"op": "lineage", "row": asdict(row)}


def drop_op(drop: dict, samples_parquet: str) -> dict:
    """Replace one drop's `drops` and `samples` rows from its raw_samples Parquet."""
    return {"op": "replace_drop", "drop": drop, "samples_parquet": str(samples_parquet)}


def drop_status_op(drop_id: str, status: str) -> dict:
    """Mark one drop 'deleted' (its folder is gone) or 'present' again."""
    return {"op": "mark_drop", "drop_id": drop_id, "status": status}


def apply_ops(con: duckdb.DuckDBPyConnection, ops: list[dict]) -> None:
    """Run catalog operations inside the caller's transaction (the direct path and the committer
    share this, so both write exactly the same rows)."""
    for op in ops:
        if op["op"] == "lineage":
            write_lineage(con, LineageRow(**op["row"]))
        elif op["op"] == "replace_drop":
            replace_drop(con, op["drop"], op["samples_parquet"])
        elif op["op"] == "mark_drop":
            mark_drop(con, op["drop_id"], op["status"])
        else:
            raise ValueError(f"unknown catalog operation {op['op']!r}")


@dataclass(frozen=True)
class FoldReport:
    folded: int        # records whose rows were written now
    already: int       # records found in `commits` already (a re-fold after a crash): moved, not re-applied
    pending: int       # records still waiting (written while this fold ran)
    lock_backoffs: int  # this fold's waits on a catalog lock or write conflict (0 when it is the only writer)

    def __str__(self) -> str:
        return (f"folded {self.folded} commit record(s), {self.already} already in the catalog, "
                f"{self.pending} pending, {self.lock_backoffs} lock back-off(s)")


@dataclass(frozen=True)
class CommitLog:
    root: Path  # <data dir>/commits

    @property
    def pending_dir(self) -> Path:
        return self.root / "pending"

    @property
    def folded_dir(self) -> Path:
        return self.root / "folded"

    def submit(self, ops: list[dict]) -> Path:
        """Write one record atomically. Names sort by submission time, so folding keeps the order in
        which materialisations finished (lineage seq follows it)."""
        commit_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        path = self.pending_dir / f"{commit_id}.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"commit_id": commit_id, "ops": list(ops)}))
        return path

    def pending(self) -> list[Path]:
        return sorted(self.pending_dir.glob("*.json")) if self.pending_dir.exists() else []

    def fold(self, catalog: Catalog) -> FoldReport:
        """Fold every pending record, oldest first; the caller refreshes views afterwards."""
        folded = already = 0
        backoffs_before = lock_backoffs()
        for path in self.pending():
            record = json.loads(path.read_text())
            if catalog.write(lambda con: _fold_one(con, record)):
                folded += 1
            else:
                already += 1
            self.folded_dir.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.folded_dir / path.name)
        report = FoldReport(folded, already, len(self.pending()), lock_backoffs() - backoffs_before)
        if folded or already:
            log.info("%s", report)
        return report

    def latest(self, op: str, key: str) -> dict | None:
        """The newest record's operation `op` for `key` (a drop id), pending or folded: what a worker
        committed, for checks that run before the committer has folded it."""
        for folder in (self.pending_dir, self.folded_dir):
            for path in sorted(folder.glob("*.json"), reverse=True) if folder.exists() else []:
                for entry in json.loads(path.read_text())["ops"]:
                    if entry["op"] == op and _key(entry) == key:
                        return entry
        return None


def _key(entry: dict) -> str | None:
    if entry["op"] == "replace_drop":
        return entry["drop"]["drop_id"]
    return entry["row"]["partition_key"]


def _fold_one(con: duckdb.DuckDBPyConnection, record: dict) -> bool:
    if con.execute("SELECT 1 FROM commits WHERE commit_id = ?", [record["commit_id"]]).fetchone():
        return False
    apply_ops(con, record["ops"])
    con.execute("INSERT INTO commits VALUES (?, ?, now())", [record["commit_id"], len(record["ops"])])
    return True
