"""Catalog writes of the pipeline's records: drops, models, training sets, checkpoints, lineage.

Each takes an open connection inside the caller's transaction (`Catalog.write`), so a record and
its lineage row commit together or not at all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb


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


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def write_lineage(con: duckdb.DuckDBPyConnection, row: LineageRow) -> int:
    """Append one materialisation's lineage and return its seq; call inside the transaction that
    writes its data. Earlier rows stay, so older checkpoints can still be traced as they were."""
    return con.execute(
        "INSERT INTO lineage (artifact, asset, partition_key, inputs, run_id, code_version, config_hash, "
        "governor_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        [row.artifact, row.asset, row.partition_key, json.dumps(row.inputs), row.run_id,
         row.code_version, row.config_hash, row.governor_id, _now()],
    ).fetchone()[0]


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


# --- reads of the same records, for `juicer status`, the demo's summary and the report ----------

def drop_counts(catalog, drops: list[str] | None = None):
    """drop_id, format, sample counts and ingestion time of the given drops (all when None)."""
    where, params = ("WHERE list_contains(?, drop_id)", [drops]) if drops is not None else ("", [])
    return catalog.query(f"SELECT drop_id, format, n_samples, n_valid, n_quarantined, ingested_at FROM drops "
                         f"{where} ORDER BY 1", params)


def quarantine_reasons(catalog, drops: list[str] | None = None):
    """Quarantined samples counted by drop and reason (all drops when None), most frequent first."""
    where, params = ("AND list_contains(?, drop_id)", [drops]) if drops is not None else ("", [])
    return catalog.query(f"SELECT drop_id, quarantine_reason AS reason, count(*) AS n FROM samples "
                         f"WHERE status = 'quarantined' {where} GROUP BY ALL ORDER BY 1, 3 DESC, 2", params)


def training_sets_overview(catalog):
    return catalog.query("SELECT recipe, training_set_id, n_members, excluded, drops FROM training_sets ORDER BY recipe")


def checkpoints_overview(catalog):
    return catalog.query("SELECT recipe, seed, checkpoint_id, tokens_seen, samples_seen, wall_seconds "
                         "FROM checkpoints ORDER BY recipe, seed")


def current_governor(catalog):
    """The most recently recorded governor: model_id, source, tau (no row when none was recorded)."""
    return catalog.query("SELECT model_id, source, tau FROM models WHERE role = 'governor' "
                         "ORDER BY created_at DESC LIMIT 1")
