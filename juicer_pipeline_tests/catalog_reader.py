"""The outside reader of the end-to-end tests: a process that keeps querying the catalog the way
the README tells users to (a snapshot, never the live file, and the Parquet files directly) until a
stop file appears, then prints what it saw as JSON.

    python juicer_pipeline_tests/catalog_reader.py DATA_DIR STOP_FILE own|published

`own`: the reader takes its own snapshots (`Catalog.snapshot`, which waits on the writers' lock;
its lock retries are counted). `published`: it reads the snapshot a committer publishes, once there.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import duckdb


class _CountMessages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _snapshot_source(data: Path, mode: str):
    """A function returning the snapshot to query now (or None), and the lock retries it counted."""
    if mode == "published":
        published = data / "catalog-snapshot.duckdb"
        return (lambda: published if published.exists() else None), None
    from juicer_pipeline.storage import Catalog

    retries = _CountMessages()
    log = logging.getLogger("juicer_pipeline.storage.catalog")
    log.setLevel(logging.INFO)
    log.addHandler(retries)
    catalog = Catalog(data / "catalog.duckdb", lock_timeout_s=60)
    return (lambda: catalog.snapshot(data / "reader-snapshot.duckdb")), retries


def read_until_stopped(data: Path, stop: Path, mode: str) -> dict:
    snapshot, retries = _snapshot_source(data, mode)
    reads, errors, most = 0, [], 0
    while not stop.exists():
        try:
            snap = snapshot()
            if snap is not None:
                with duckdb.connect(str(snap), read_only=True) as con:
                    most = max(most, con.execute("SELECT count(*) FROM samples").fetchone()[0])
            files = [str(p) for p in (data / "warehouse" / "raw_samples").glob("*.parquet")]
            if files:
                duckdb.sql(f"SELECT count(*) FROM read_parquet({files})").fetchall()
            reads += 1
        except Exception as exc:  # every failure is reported, none hidden
            errors.append(f"{type(exc).__name__}: {exc}")
        time.sleep(0.5)
    seen = {"reads": reads, "errors": errors, "most_samples": most}
    return seen if retries is None else {**seen, "lock_retries": len(retries.messages)}


def reader_command(data: Path, stop: Path, mode: str) -> list[str]:
    """The command line that starts this reader in its own process."""
    return [sys.executable, str(Path(__file__).resolve()), str(data), str(stop), mode]


if __name__ == "__main__":
    print(json.dumps(read_until_stopped(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])))
