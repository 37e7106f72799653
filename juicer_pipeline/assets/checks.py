"""Asset checks: each failing check names the offending sample ids in its metadata."""
import math
from itertools import zip_longest

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from ..governance.parquet_batches import iter_parquet_batches
from ..governance.saliency import METHODS
from ..settings import JuicerSettings
from .vocabulary import class_vocabulary
from .partitions import drops_partitions
from .resources import StorageResource
from .vision import read_governor_record

_SHOW = 20
_PROB_TOLERANCE = 1e-6  # probabilities are stored as float32, τ as float64


def _ids(values) -> str:
    values = list(values)
    return ", ".join(values[:_SHOW]) + (f" … (+{len(values) - _SHOW})" if len(values) > _SHOW else "")


def _sql(wh, sql: str, params: list):
    """A query over warehouse tables (local or object storage), as a DataFrame."""
    with wh.duckdb() as con:
        return con.execute(sql, params).df()


def _same_ids_in_order(raw: pq.ParquetFile, saliency: pq.ParquetFile, batch_rows: int = 8192) -> int | None:
    """The number of valid raw_samples rows if patch_saliency holds exactly their ids, in their
    order (as `patch_saliency` writes them); None otherwise. Streamed, so memory stays flat whatever
    the drop's size: set queries over every id held ~20 MB more at 200k samples than at 20k."""
    def valid_ids():
        for batch in iter_parquet_batches(raw, batch_rows, ["sample_id", "status"]):
            yield from (sid for sid, status in zip(*(c.to_pylist() for c in batch.columns)) if status == "valid")

    def scored_ids():
        for batch in iter_parquet_batches(saliency, batch_rows, ["sample_id"]):
            yield from batch.column(0).to_pylist()

    n, missing = 0, object()
    for a, b in zip_longest(valid_ids(), scored_ids(), fillvalue=missing):
        if a != b:
            return None
        n += 1
    return n


def _non_finite_ids(pf: pq.ParquetFile, column: str, batch_rows: int = 4096) -> list[str]:
    """Sample ids whose list column is null, empty, or holds a null, NaN or ±inf (streamed)."""
    bad = []
    for batch in iter_parquet_batches(pf, batch_rows, ["sample_id", column]):
        values = batch.column(1)
        lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False)
        row_bad = lengths == 0
        finite = pc.fill_null(pc.is_finite(pc.list_flatten(values)), False).to_numpy(zero_copy_only=False)
        if (~finite).any():
            parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
            row_bad[np.unique(parents[~finite])] = True
        ids = batch.column(0).to_pylist()
        bad.extend(ids[i] for i in np.flatnonzero(row_bad))
    return bad


def build_checks(settings: JuicerSettings) -> list:
    rho = settings.saliency.rho
    alarm = settings.ingest.quarantine_alarm

    @asset_check(asset="raw_samples", partitions_def=drops_partitions, blocking=False,
                 description="Rows in = rows out: every input row the ingestion counted (catalog `drops`) is "
                             "in the Parquet file once, valid or quarantined with a reason, and matches the "
                             "catalog `samples` rows of the drop.")
    def rows_in_rows_out(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        drop = context.partition_key
        path = storage.warehouse.partition_path("raw_samples", drop)
        if storage.uses_commit_records:
            # this worker never opens the catalog: compare with the counts it committed; the
            # committer inserts the `samples` rows from this same Parquet file
            entry = storage.commit_log.latest("replace_drop", drop)
            counted = tuple(entry["drop"][k] for k in ("n_samples", "n_valid", "n_quarantined")) if entry else None
            with storage.warehouse.duckdb() as con:
                return _rows_in_rows_out(con, drop, path, counted, against_catalog=False)
        with storage.catalog.connect(read_only=True) as con:
            counted = con.execute("SELECT n_samples, n_valid, n_quarantined FROM drops WHERE drop_id = ?",
                                  [drop]).fetchone()
            return _rows_in_rows_out(con, drop, path, counted, against_catalog=True)

    @asset_check(asset="raw_samples", partitions_def=drops_partitions, blocking=False,
                 description=f"The quarantined share of the drop is under `ingest.quarantine_alarm` ({alarm:g}).")
    def quarantine_share(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        df = _sql(storage.warehouse, "SELECT sample_id, quarantine_reason FROM read_parquet(?) "
                                     "WHERE status <> 'valid' ORDER BY sample_id",
                  [storage.warehouse.partition_path("raw_samples", context.partition_key)])
        total = storage.warehouse.parquet_file("raw_samples", context.partition_key).metadata.num_rows
        share = len(df) / total if total else 0.0
        reasons = df.quarantine_reason.fillna("(none)").value_counts()
        return AssetCheckResult(passed=bool(share < alarm), metadata={
            "quarantine_alarm": alarm, "quarantined_share": round(share, 4), "quarantined": len(df),
            "samples": total, "by_reason": ", ".join(f"{r}: {n}" for r, n in reasons.items()),
            "offending_samples": _ids(df.sample_id) if share >= alarm else ""})

    @asset_check(asset="patch_saliency", partitions_def=drops_partitions, blocking=False,
                 description="Exactly one row per valid raw_samples image: none missing, none extra, none twice.")
    def one_row_per_valid_image(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        wh = storage.warehouse
        drop = context.partition_key
        n_valid = _same_ids_in_order(wh.parquet_file("raw_samples", drop), wh.parquet_file("patch_saliency", drop))
        if n_valid is not None:  # the usual case, decided in one streamed pass
            return AssetCheckResult(passed=True, metadata={"valid_images": n_valid, "rows": n_valid})
        raw, sal = wh.partition_path("raw_samples", drop), wh.partition_path("patch_saliency", drop)
        with wh.duckdb() as con:
            q = lambda sql, params: [r[0] for r in con.execute(sql, params).fetchall()]  # noqa: E731
            missing = q("SELECT sample_id FROM read_parquet(?) WHERE status = 'valid' "
                        "EXCEPT SELECT sample_id FROM read_parquet(?) ORDER BY 1", [raw, sal])
            extra = q("SELECT sample_id FROM read_parquet(?) EXCEPT "
                      "SELECT sample_id FROM read_parquet(?) WHERE status = 'valid' ORDER BY 1", [sal, raw])
            twice = q("SELECT sample_id FROM read_parquet(?) GROUP BY sample_id HAVING count(*) > 1 ORDER BY 1",
                      [sal])
            n_valid, n_rows = con.execute(
                "SELECT (SELECT count(*) FROM read_parquet(?) WHERE status = 'valid'), "
                "(SELECT count(*) FROM read_parquet(?))", [raw, sal]).fetchone()
        offending = sorted({*missing, *extra, *twice})
        return AssetCheckResult(passed=not offending and n_valid == n_rows, metadata={
            "valid_images": n_valid, "rows": n_rows, "missing": _ids(missing), "not_valid_or_unknown": _ids(extra),
            "duplicated": _ids(twice), "offending_samples": _ids(offending)})

    @asset_check(asset="patch_saliency", partitions_def=drops_partitions, blocking=False,
                 description="The embedding and every saliency column are non-empty and all finite.")
    def finite_values(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        pf = storage.warehouse.parquet_file("patch_saliency", context.partition_key)
        bad = {c: _non_finite_ids(pf, c) for c in ("embedding", *METHODS)}
        offending = sorted({s for ids in bad.values() for s in ids})
        return AssetCheckResult(passed=not offending, metadata={
            "columns": ", ".join(bad), **{f"non_finite_{c}": _ids(v) for c, v in bad.items() if v},
            "offending_samples": _ids(offending)})

    @asset_check(asset="extracted_classes", partitions_def=drops_partitions, blocking=False,
                 description="Every extracted class is a class of the configured vocabulary.")
    def classes_in_vocabulary(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        shapes = set(class_vocabulary(settings.classes).names)
        df = _sql(storage.warehouse, "SELECT sample_id, classes FROM read_parquet(?)",
                  [storage.warehouse.partition_path("extracted_classes", context.partition_key)])
        unknown = {sid: [c for c in classes if c not in shapes]
                   for sid, classes in zip(df.sample_id, df.classes) if classes is not None}
        unknown = {s: u for s, u in unknown.items() if u}
        names = sorted({c for u in unknown.values() for c in u}, key=str)
        return AssetCheckResult(passed=not unknown, metadata={
            "vocabulary_size": len(shapes), "unknown_classes": ", ".join(map(str, names[:_SHOW])),
            "offending_samples": _ids(sorted(unknown))})

    @asset_check(asset="extracted_classes", partitions_def=drops_partitions, blocking=False,
                 description="Every extracted class has a probability ≥ τ (the governor's calibrated threshold).")
    def probs_at_least_tau(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        try:
            record = read_governor_record(storage)
        except FileNotFoundError as exc:
            return AssetCheckResult(passed=False, metadata={"note": str(exc)})
        tau = float(record["tau"])
        df = _sql(storage.warehouse, "SELECT sample_id, classes, probs FROM read_parquet(?)",
                  [storage.warehouse.partition_path("extracted_classes", context.partition_key)])
        bad = []
        for sid, classes, probs in zip(df.sample_id, df.classes, df.probs):
            classes = [] if classes is None else list(classes)
            probs = [] if probs is None else [np.nan if p is None else float(p) for p in probs]
            if len(probs) != len(classes) or not all(np.isfinite(p) and p >= tau - _PROB_TOLERANCE for p in probs):
                bad.append(sid)
        return AssetCheckResult(passed=not bad, metadata={
            "tau": tau, "governor_id": str(record.get("model_id", "")),
            "classes_checked": int(sum(0 if c is None else len(c) for c in df.classes)),
            "offending_samples": _ids(sorted(bad))})

    @asset_check(asset="enriched_captions", partitions_def=drops_partitions, blocking=False,
                 description="Every valid sample has saliency, kept patches, classes and a caption.")
    def coverage(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        drop = context.partition_key
        wh = storage.warehouse
        valid = set(_sql(storage.warehouse, "SELECT sample_id FROM read_parquet(?) WHERE status = 'valid'",
                         [wh.partition_path("raw_samples", drop)]).sample_id)
        missing = {}
        for asset in ("patch_saliency", "pruned_images", "extracted_classes", "enriched_captions"):
            path = wh.partition_path(asset, drop)
            have = set(_sql(wh, "SELECT sample_id FROM read_parquet(?)", [path]).sample_id) \
                if wh.exists(path) else set()
            if valid - have:
                missing[asset] = sorted(valid - have)
        return AssetCheckResult(passed=not missing, metadata={
            "valid_samples": len(valid), **{f"missing_{a}": _ids(v) for a, v in missing.items()}})

    @asset_check(asset="pruned_images", partitions_def=drops_partitions, blocking=False,
                 description="Each image keeps ⌈ρ·N⌉ patches (retention within one patch of ρ).")
    def retention(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        df = _sql(storage.warehouse, "SELECT sample_id, n_kept, n_patches FROM read_parquet(?)",
                  [storage.warehouse.partition_path("pruned_images", context.partition_key)])
        expected = df.n_patches.map(lambda n: math.ceil(rho * n - 1e-9))
        bad = df[df.n_kept != expected]
        share = float(df.n_kept.sum() / max(df.n_patches.sum(), 1))
        return AssetCheckResult(passed=bad.empty, metadata={
            "rho": rho, "kept_share": round(share, 4), "offending_samples": _ids(bad.sample_id)})

    @asset_check(asset="enriched_captions", partitions_def=drops_partitions, blocking=False,
                 description="No enriched caption is empty or whitespace.")
    def no_empty_caption(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        df = _sql(storage.warehouse, "SELECT sample_id FROM read_parquet(?) WHERE trim(coalesce(enriched_caption, '')) = ''",
                  [storage.warehouse.partition_path("enriched_captions", context.partition_key)])
        return AssetCheckResult(passed=df.empty, metadata={"empty": len(df), "offending_samples": _ids(df.sample_id)})

    @asset_check(asset="training_set", blocking=True,
                 description="No training set member has the content hash of an evaluation image.")
    def eval_disjoint(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        wh = storage.warehouse
        members, evals = wh.asset_dir("training_set"), wh.asset_dir("eval_sets")
        if not wh.partitions("training_set") or not wh.partitions("eval_sets"):
            return AssetCheckResult(passed=True, severity=AssetCheckSeverity.WARN,
                                    metadata={"note": "no training set or eval set materialised yet"})
        leaked = _sql(
            wh, "SELECT m.recipe_file, m.sample_id FROM (SELECT filename AS recipe_file, sample_id, content_hash "
                "FROM read_parquet(?, filename = true)) m JOIN read_parquet(?) e USING (content_hash)",
            [f"{members}/*.parquet", f"{evals}/*.parquet"])
        return AssetCheckResult(passed=leaked.empty, metadata={"leaked": len(leaked),
                                                               "offending_samples": _ids(leaked.sample_id)})

    return [rows_in_rows_out, quarantine_share, one_row_per_valid_image, finite_values, classes_in_vocabulary,
            probs_at_least_tau, coverage, retention, no_empty_caption, eval_disjoint]


def _rows_in_rows_out(con, drop: str, path: str, counted, against_catalog: bool) -> AssetCheckResult:
    out = con.execute("SELECT count(*), count(*) FILTER (WHERE status = 'valid'), "
                      "count(*) FILTER (WHERE status = 'quarantined') FROM read_parquet(?)", [path]).fetchone()
    if counted is None:
        return AssetCheckResult(passed=False, metadata={
            "rows_out": out[0], "note": f"no `drops` row for {drop} (catalog or commit record): "
                                        "ingestion did not record it"})
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
    problems = {k: [r[0] for r in v] for k, v in problems.items()}
    rows_in, valid_in, quarantined_in = counted
    offending = sorted({s for ids in problems.values() for s in ids})
    passed = not offending and tuple(out) == (rows_in, valid_in, quarantined_in)
    return AssetCheckResult(passed=passed, metadata={
        "rows_in": rows_in, "rows_out": out[0], "valid": out[1], "quarantined": out[2],
        "valid_counted": valid_in, "quarantined_counted": quarantined_in,
        "counted_in": "catalog" if against_catalog else "commit record",
        **{k: _ids(v) for k, v in problems.items() if v}, "offending_samples": _ids(offending)})
