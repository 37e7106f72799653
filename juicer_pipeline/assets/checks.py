"""Asset checks: each failing check names the offending sample ids in its metadata.

Each per-drop check is a function of (storage, drop) that returns its result, so a test can call it;
`build_checks` gives each its asset, name and description.
"""
import math
from itertools import zip_longest

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from ..governance.parquet_batches import iter_parquet_batches
from ..governance.saliency import METHODS
from ..settings import ClassSettings, JuicerSettings
from ..storage.contract_queries import (counted_rows, leaked_members, partition_frame, raw_row_problems,
                                        scored_row_problems, status_counts)
from .partitions import drops_partitions
from .resources import StorageResource
from .vision import read_governor_record
from .vocabulary import class_vocabulary

_SHOW = 20
_PROB_TOLERANCE = 1e-6  # probabilities are stored as float32, τ as float64


def build_checks(settings: JuicerSettings) -> list:
    rho, alarm, classes = settings.saliency.rho, settings.ingest.quarantine_alarm, settings.classes
    return [
        _drop_check("raw_samples", "rows_in_rows_out", rows_in_rows_out,
                    "Rows in = rows out: every input row the ingestion counted (catalog `drops`) is in the Parquet "
                    "file once, valid or quarantined with a reason, and matches the catalog `samples` rows of the "
                    "drop."),
        _drop_check("raw_samples", "quarantine_share", lambda storage, drop: quarantine_share(storage, drop, alarm),
                    f"The quarantined share of the drop is under `ingest.quarantine_alarm` ({alarm:g})."),
        _drop_check("patch_saliency", "one_row_per_valid_image", one_row_per_valid_image,
                    "Exactly one row per valid raw_samples image: none missing, none extra, none twice."),
        _drop_check("patch_saliency", "finite_values", finite_values,
                    "The embedding and every saliency column are non-empty and all finite."),
        _drop_check("extracted_classes", "classes_in_vocabulary",
                    lambda storage, drop: classes_in_vocabulary(storage, drop, classes),
                    "Every extracted class is a class of the configured vocabulary."),
        _drop_check("extracted_classes", "probs_at_least_tau", probs_at_least_tau,
                    "Every extracted class has a probability ≥ τ (the governor's calibrated threshold)."),
        _drop_check("enriched_captions", "coverage", coverage,
                    "Every valid sample has saliency, kept patches, classes and a caption."),
        _drop_check("pruned_images", "retention", lambda storage, drop: retention(storage, drop, rho),
                    "Each image keeps ⌈ρ·N⌉ patches (retention within one patch of ρ)."),
        _drop_check("enriched_captions", "no_empty_caption", no_empty_caption,
                    "No enriched caption is empty or whitespace."),
        eval_disjoint,
    ]


def _drop_check(asset: str, name: str, body, description: str):
    """A non-blocking check of one drop partition of `asset` that returns `body(storage, drop)`."""
    @asset_check(asset=asset, name=name, partitions_def=drops_partitions, blocking=False, description=description)
    def _check(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        return body(storage, context.partition_key)

    return _check


def _ids(values) -> str:
    values = list(values)
    return ", ".join(values[:_SHOW]) + (f" … (+{len(values) - _SHOW})" if len(values) > _SHOW else "")


# --- raw_samples ------------------------------------------------------------------------------------

def rows_in_rows_out(storage: StorageResource, drop: str) -> AssetCheckResult:
    path = storage.warehouse.partition_path("raw_samples", drop)
    if storage.uses_commit_records:
        # this worker never opens the catalog: compare with the counts it committed; the
        # committer inserts the `samples` rows from this same Parquet file
        entry = storage.commit_log.latest("replace_drop", drop)
        counted = tuple(entry["drop"][k] for k in ("n_samples", "n_valid", "n_quarantined")) if entry else None
        with storage.warehouse.duckdb() as con:
            return _rows_against_counts(con, drop, path, counted, against_catalog=False)
    with storage.catalog.connect(read_only=True) as con:
        counted = counted_rows(con, drop)
        return _rows_against_counts(con, drop, path, counted, against_catalog=True)


def _rows_against_counts(con, drop: str, path: str, counted, against_catalog: bool) -> AssetCheckResult:
    out = status_counts(con, path)
    if counted is None:
        return AssetCheckResult(passed=False, metadata={
            "rows_out": out[0], "note": f"no `drops` row for {drop} (catalog or commit record): "
                                        "ingestion did not record it"})
    problems = raw_row_problems(con, drop, path, against_catalog)
    rows_in, valid_in, quarantined_in = counted
    offending = sorted({s for ids in problems.values() for s in ids})
    passed = not offending and tuple(out) == (rows_in, valid_in, quarantined_in)
    return AssetCheckResult(passed=passed, metadata={
        "rows_in": rows_in, "rows_out": out[0], "valid": out[1], "quarantined": out[2],
        "valid_counted": valid_in, "quarantined_counted": quarantined_in,
        "counted_in": "catalog" if against_catalog else "commit record",
        **{k: _ids(v) for k, v in problems.items() if v}, "offending_samples": _ids(offending)})


def quarantine_share(storage: StorageResource, drop: str, alarm: float) -> AssetCheckResult:
    df = partition_frame(storage.warehouse, "raw_samples", drop, "sample_id, quarantine_reason", "status <> 'valid'")
    total = storage.warehouse.parquet_file("raw_samples", drop).metadata.num_rows
    share = len(df) / total if total else 0.0
    reasons = df.quarantine_reason.fillna("(none)").value_counts()
    return AssetCheckResult(passed=bool(share < alarm), metadata={
        "quarantine_alarm": alarm, "quarantined_share": round(share, 4), "quarantined": len(df),
        "samples": total, "by_reason": ", ".join(f"{r}: {n}" for r, n in reasons.items()),
        "offending_samples": _ids(df.sample_id) if share >= alarm else ""})


# --- patch_saliency ---------------------------------------------------------------------------------

def one_row_per_valid_image(storage: StorageResource, drop: str) -> AssetCheckResult:
    wh = storage.warehouse
    n_valid = _same_ids_in_order(wh.parquet_file("raw_samples", drop), wh.parquet_file("patch_saliency", drop))
    if n_valid is not None:  # the usual case, decided in one streamed pass
        return AssetCheckResult(passed=True, metadata={"valid_images": n_valid, "rows": n_valid})
    p = scored_row_problems(wh, drop)
    missing, extra, twice, n_valid, n_rows = p["missing"], p["extra"], p["twice"], p["n_valid"], p["n_rows"]
    offending = sorted({*missing, *extra, *twice})
    return AssetCheckResult(passed=not offending and n_valid == n_rows, metadata={
        "valid_images": n_valid, "rows": n_rows, "missing": _ids(missing), "not_valid_or_unknown": _ids(extra),
        "duplicated": _ids(twice), "offending_samples": _ids(offending)})


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


def finite_values(storage: StorageResource, drop: str) -> AssetCheckResult:
    pf = storage.warehouse.parquet_file("patch_saliency", drop)
    bad = {c: _non_finite_ids(pf, c) for c in ("embedding", *METHODS)}
    offending = sorted({s for ids in bad.values() for s in ids})
    return AssetCheckResult(passed=not offending, metadata={
        "columns": ", ".join(bad), **{f"non_finite_{c}": _ids(v) for c, v in bad.items() if v},
        "offending_samples": _ids(offending)})


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


# --- extracted_classes ------------------------------------------------------------------------------

def classes_in_vocabulary(storage: StorageResource, drop: str, cls: ClassSettings) -> AssetCheckResult:
    shapes = set(class_vocabulary(cls).names)
    df = partition_frame(storage.warehouse, "extracted_classes", drop, "sample_id, classes")
    unknown = {sid: [c for c in classes if c not in shapes]
               for sid, classes in zip(df.sample_id, df.classes) if classes is not None}
    unknown = {s: u for s, u in unknown.items() if u}
    names = sorted({c for u in unknown.values() for c in u}, key=str)
    return AssetCheckResult(passed=not unknown, metadata={
        "vocabulary_size": len(shapes), "unknown_classes": ", ".join(map(str, names[:_SHOW])),
        "offending_samples": _ids(sorted(unknown))})


def probs_at_least_tau(storage: StorageResource, drop: str) -> AssetCheckResult:
    try:
        record = read_governor_record(storage)
    except FileNotFoundError as exc:
        return AssetCheckResult(passed=False, metadata={"note": str(exc)})
    tau = float(record["tau"])
    df = partition_frame(storage.warehouse, "extracted_classes", drop, "sample_id, classes, probs")
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


# --- pruned_images and enriched_captions ------------------------------------------------------------

def retention(storage: StorageResource, drop: str, rho: float) -> AssetCheckResult:
    df = partition_frame(storage.warehouse, "pruned_images", drop, "sample_id, n_kept, n_patches")
    expected = df.n_patches.map(lambda n: math.ceil(rho * n - 1e-9))
    bad = df[df.n_kept != expected]
    share = float(df.n_kept.sum() / max(df.n_patches.sum(), 1))
    return AssetCheckResult(passed=bad.empty, metadata={
        "rho": rho, "kept_share": round(share, 4), "offending_samples": _ids(bad.sample_id)})


def coverage(storage: StorageResource, drop: str) -> AssetCheckResult:
    wh = storage.warehouse
    valid = set(partition_frame(wh, "raw_samples", drop, "sample_id", "status = 'valid'").sample_id)
    missing = {}
    for asset in ("patch_saliency", "pruned_images", "extracted_classes", "enriched_captions"):
        have = set(partition_frame(wh, asset, drop, "sample_id").sample_id) \
            if wh.exists(wh.partition_path(asset, drop)) else set()
        if valid - have:
            missing[asset] = sorted(valid - have)
    return AssetCheckResult(passed=not missing, metadata={
        "valid_samples": len(valid), **{f"missing_{a}": _ids(v) for a, v in missing.items()}})


def no_empty_caption(storage: StorageResource, drop: str) -> AssetCheckResult:
    df = partition_frame(storage.warehouse, "enriched_captions", drop, "sample_id",
                         "trim(coalesce(enriched_caption, '')) = ''")
    return AssetCheckResult(passed=df.empty, metadata={"empty": len(df), "offending_samples": _ids(df.sample_id)})


# --- training_set -----------------------------------------------------------------------------------

@asset_check(asset="training_set", blocking=True,
             description="No training set member has the content hash of an evaluation image.")
def eval_disjoint(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
    wh = storage.warehouse
    if not wh.partitions("training_set") or not wh.partitions("eval_sets"):
        return AssetCheckResult(passed=True, severity=AssetCheckSeverity.WARN,
                                metadata={"note": "no training set or eval set materialised yet"})
    leaked = leaked_members(wh)
    return AssetCheckResult(passed=leaked.empty, metadata={"leaked": len(leaked),
                                                           "offending_samples": _ids(leaked.sample_id)})
