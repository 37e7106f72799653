"""Asset checks: each failing check names the offending sample ids in its metadata."""
import math

import duckdb
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from ..settings import JuicerSettings
from .partitions import drops_partitions
from .resources import StorageResource

_SHOW = 20


def _ids(values) -> str:
    values = list(values)
    return ", ".join(values[:_SHOW]) + (f" … (+{len(values) - _SHOW})" if len(values) > _SHOW else "")


def build_checks(settings: JuicerSettings) -> list:
    rho = settings.saliency.rho

    @asset_check(asset="enriched_captions", partitions_def=drops_partitions, blocking=False,
                 description="Every valid sample has saliency, kept patches, classes and a caption.")
    def coverage(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        drop = context.partition_key
        wh = storage.warehouse
        valid = set(duckdb.execute("SELECT sample_id FROM read_parquet(?) WHERE status = 'valid'",
                                   [str(wh.partition_path("raw_samples", drop))]).df().sample_id)
        missing = {}
        for asset in ("patch_saliency", "pruned_images", "extracted_classes", "enriched_captions"):
            path = wh.partition_path(asset, drop)
            have = set(duckdb.execute("SELECT sample_id FROM read_parquet(?)", [str(path)]).df().sample_id) \
                if path.exists() else set()
            if valid - have:
                missing[asset] = sorted(valid - have)
        return AssetCheckResult(passed=not missing, metadata={
            "valid_samples": len(valid), **{f"missing_{a}": _ids(v) for a, v in missing.items()}})

    @asset_check(asset="pruned_images", partitions_def=drops_partitions, blocking=False,
                 description="Each image keeps ⌈ρ·N⌉ patches (retention within one patch of ρ).")
    def retention(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        df = duckdb.execute("SELECT sample_id, n_kept, n_patches FROM read_parquet(?)",
                            [str(storage.warehouse.partition_path("pruned_images", context.partition_key))]).df()
        expected = df.n_patches.map(lambda n: math.ceil(rho * n - 1e-9))
        bad = df[df.n_kept != expected]
        share = float(df.n_kept.sum() / max(df.n_patches.sum(), 1))
        return AssetCheckResult(passed=bad.empty, metadata={
            "rho": rho, "kept_share": round(share, 4), "offending_samples": _ids(bad.sample_id)})

    @asset_check(asset="enriched_captions", partitions_def=drops_partitions, blocking=False,
                 description="No enriched caption is empty or whitespace.")
    def no_empty_caption(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        df = duckdb.execute("SELECT sample_id FROM read_parquet(?) WHERE trim(coalesce(enriched_caption, '')) = ''",
                            [str(storage.warehouse.partition_path("enriched_captions", context.partition_key))]).df()
        return AssetCheckResult(passed=df.empty, metadata={"empty": len(df), "offending_samples": _ids(df.sample_id)})

    @asset_check(asset="training_set", blocking=True,
                 description="No training set member has the content hash of an evaluation image.")
    def eval_disjoint(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
        wh = storage.warehouse
        members, evals = wh.asset_dir("training_set"), wh.asset_dir("eval_sets")
        if not any(members.glob("*.parquet")) or not any(evals.glob("*.parquet")):
            return AssetCheckResult(passed=True, severity=AssetCheckSeverity.WARN,
                                    metadata={"note": "no training set or eval set materialised yet"})
        leaked = duckdb.execute(
            "SELECT m.recipe_file, m.sample_id FROM (SELECT filename AS recipe_file, sample_id, content_hash "
            "FROM read_parquet(?, filename = true)) m JOIN read_parquet(?) e USING (content_hash)",
            [f"{members.as_posix()}/*.parquet", f"{evals.as_posix()}/*.parquet"]).df()
        return AssetCheckResult(passed=leaked.empty, metadata={"leaked": len(leaked),
                                                               "offending_samples": _ids(leaked.sample_id)})

    return [coverage, retention, no_empty_caption, eval_disjoint]
