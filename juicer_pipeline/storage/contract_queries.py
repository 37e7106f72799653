"""The queries behind the asset checks: what the data contract says of one drop's Parquet files
(and of the catalog rows that count them), as sample ids or counts. The checks decide pass/fail."""
from __future__ import annotations

import pandas as pd


def partition_frame(wh, asset: str, drop: str, columns: str, where: str = "TRUE") -> pd.DataFrame:
    """`columns` of one partition's rows that satisfy `where`, ordered by sample id."""
    with wh.duckdb() as con:
        return con.execute(f"SELECT {columns} FROM read_parquet(?) WHERE {where} ORDER BY sample_id",
                           [wh.partition_path(asset, drop)]).df()


def counted_rows(con, drop: str) -> tuple | None:
    """(n_samples, n_valid, n_quarantined) that ingestion recorded for the drop in the catalog."""
    return con.execute("SELECT n_samples, n_valid, n_quarantined FROM drops WHERE drop_id = ?", [drop]).fetchone()


def status_counts(con, path: str) -> tuple:
    """(rows, valid, quarantined) of a raw_samples file."""
    return con.execute("SELECT count(*), count(*) FILTER (WHERE status = 'valid'), "
                       "count(*) FILTER (WHERE status = 'quarantined') FROM read_parquet(?)", [path]).fetchone()


def raw_row_problems(con, drop: str, path: str, against_catalog: bool) -> dict[str, list[str]]:
    """Sample ids of a raw_samples file by what is wrong with them: missing on either side of the
    catalog's `samples` rows (with `against_catalog`), twice, or without a status or reason."""
    problems = {}
    if against_catalog:
        problems["missing_from_parquet"] = con.execute(
            "SELECT sample_id FROM samples WHERE drop_id = ? "
            "EXCEPT SELECT sample_id FROM read_parquet(?) ORDER BY 1", [drop, path]).fetchall()
        problems["missing_from_catalog"] = con.execute(
            "SELECT sample_id FROM read_parquet(?) "
            "EXCEPT SELECT sample_id FROM samples WHERE drop_id = ? ORDER BY 1", [path, drop]).fetchall()
    problems["duplicated"] = con.execute("SELECT sample_id FROM read_parquet(?) GROUP BY sample_id "
                                         "HAVING count(*) > 1 ORDER BY 1", [path]).fetchall()
    problems["no_status_or_reason"] = con.execute(
        "SELECT sample_id FROM read_parquet(?) WHERE status IS NULL "
        "OR status NOT IN ('valid', 'quarantined') "
        "OR (status = 'quarantined' AND coalesce(quarantine_reason, '') = '') ORDER BY 1", [path]).fetchall()
    return {k: [r[0] for r in v] for k, v in problems.items()}


def scored_row_problems(wh, drop: str) -> dict:
    """patch_saliency rows against the valid raw_samples rows: ids missing, extra (not valid or
    unknown) and twice, and both counts."""
    raw, sal = wh.partition_path("raw_samples", drop), wh.partition_path("patch_saliency", drop)
    with wh.duckdb() as con:
        def ids(sql, params):
            return [r[0] for r in con.execute(sql, params).fetchall()]
        out = {"missing": ids("SELECT sample_id FROM read_parquet(?) WHERE status = 'valid' "
                              "EXCEPT SELECT sample_id FROM read_parquet(?) ORDER BY 1", [raw, sal]),
               "extra": ids("SELECT sample_id FROM read_parquet(?) EXCEPT "
                            "SELECT sample_id FROM read_parquet(?) WHERE status = 'valid' ORDER BY 1", [sal, raw]),
               "twice": ids("SELECT sample_id FROM read_parquet(?) GROUP BY sample_id HAVING count(*) > 1 "
                            "ORDER BY 1", [sal])}
        out["n_valid"], out["n_rows"] = con.execute(
            "SELECT (SELECT count(*) FROM read_parquet(?) WHERE status = 'valid'), "
            "(SELECT count(*) FROM read_parquet(?))", [raw, sal]).fetchone()
    return out


def leaked_members(wh) -> pd.DataFrame:
    """Training-set members (recipe file, sample id) whose content hash is an evaluation image's."""
    members, evals = wh.asset_dir("training_set"), wh.asset_dir("eval_sets")
    with wh.duckdb() as con:
        return con.execute(
            "SELECT m.recipe_file, m.sample_id FROM (SELECT filename AS recipe_file, sample_id, content_hash "
            "FROM read_parquet(?, filename = true)) m JOIN read_parquet(?) e USING (content_hash)",
            [f"{members}/*.parquet", f"{evals}/*.parquet"]).df()
