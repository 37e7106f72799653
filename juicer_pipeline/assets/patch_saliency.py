"""`patch_saliency`: one governor pass per valid image of a drop, in one step or in row-range shards.

With `[governor] shards = 1` (the default) it is one asset step. With more, it is a graph-backed
asset of the same key, partitions, code version, automation condition, kinds and upstream assets,
so downstream assets, the drop job and the UI see the same asset; only its steps differ
(`patch_saliency.plan_saliency_shards`, `patch_saliency.score_saliency_shard[rows_<start>_<stop>]`,
`patch_saliency.merge_saliency_shards`). Both write the same table (test_sharded_vision compares
them), because both score rows with `_score_rows`.
"""
import hashlib
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
from dagster import (AssetExecutionContext, AssetIn, Backoff, DynamicOut, DynamicOutput, Failure, In,
                     MaterializeResult, Nothing, OpExecutionContext, Out, Output, RetryPolicy, asset, graph_asset, op)

from ..automation.conditions import PER_DROP
from ..governance.parquet_batches import coalesced_row_groups
from ..governance.saliency import VisionPass
from ..governance.vision import (SALIENCY_ROW_GROUP_ROWS, SALIENCY_SCHEMA, count_valid_images, iter_valid_images,
                                 range_digests, saliency_record_batch, score_batch, shard_ranges)
from ..models.loader import ModelNotFound
from ..settings import GovernorSettings, code_version
from ..storage import atomic_path
from ..storage.warehouse import stream_parquet
from .asset_lineage import commit_lineage
from .partitions import drops_partitions
from .progress import ThrottledProgress
from .resources import StorageResource

# A shard that fails (a lost worker, a flaky device) is retried on its own; the other shards keep
# their results. Errors that a retry cannot fix (a missing model) fail at once.
SHARD_RETRY = RetryPolicy(max_retries=2, delay=1.0, backoff=Backoff.EXPONENTIAL)
_SHARD_META = ".json"  # a shard is finished when its metadata file sits next to its Parquet file

_DESCRIPTION = ("One governor pass per valid image: pooled normalised embedding and the patch saliency grid of "
                "every method (so a method or ρ change never re-runs the model). ")
# What both forms share, so that downstream assets, jobs and the UI see one asset whatever `shards` is.
_ASSET = dict(name="patch_saliency", partitions_def=drops_partitions, automation_condition=PER_DROP,
              group_name="vision", kinds={"pytorch", "parquet"})


def build_patch_saliency(gov: GovernorSettings, fingerprint: str, load):
    """The `patch_saliency` asset for these governor settings; `load()` returns the governor."""
    version = code_version("patch_saliency-2", fingerprint)
    if gov.shards == 1:
        return _single_step_patch_saliency(gov, version, load)
    return _sharded_patch_saliency(gov, version, fingerprint, load)


def _score_rows(fm, out_file, raw_path, gov: GovernorSettings, log, label: str, start: int = 0,
                stop: int | None = None) -> tuple[int, int]:
    """Score the valid images [start, stop) of a raw_samples file into `out_file`, batch after batch:
    (images scored, full-image forward passes)."""
    vision = VisionPass(fm.model)
    n, progress = 0, ThrottledProgress(log)
    try:
        with coalesced_row_groups(out_file, SALIENCY_ROW_GROUP_ROWS) as writer:
            for ids, images in iter_valid_images(raw_path, gov.batch_size, start, stop):
                writer.write_batch(saliency_record_batch(ids, fm.grid, score_batch(fm, vision, images, gov.precision)))
                n += len(ids)
                progress(lambda: f"{label}: {n} images scored")
    finally:
        vision.close()
    return n, vision.forward_calls


def _saliency_metadata(images: int, forward_calls: int, seconds: float, grid, governor_id: str, shards: int) -> dict:
    return {"images": images, "full_image_forward_passes": forward_calls, "seconds": round(seconds, 2),
            "images_per_second": round(images / max(seconds, 1e-9), 1), "grid": f"{grid[0]}x{grid[1]}",
            "governor_id": governor_id, "shards": shards}


def _commit_saliency_lineage(context, storage: StorageResource, config_hash: str, governor_id: str) -> None:
    drop = context.partition_key
    commit_lineage(context, storage, [f"raw_samples/{drop}", "governor"], config_hash, governor_id)


# --- one step ---------------------------------------------------------------------------------------

def _single_step_patch_saliency(gov: GovernorSettings, version: str, load):
    """The default (`shards = 1`): one step, no planning or merging steps to start, so a drop run
    on the multiprocess or celery executor pays no extra step start-up."""
    @asset(**_ASSET, deps=["raw_samples", "governor"], code_version=version,
           description=_DESCRIPTION + "`[governor] shards` > 1 splits it into row-range steps.")
    def patch_saliency(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        fm = load()
        t0 = time.perf_counter()
        with wh.stream_table("patch_saliency", drop, SALIENCY_SCHEMA) as out_file:
            n, forward_calls = _score_rows(fm, out_file, wh.parquet_file("raw_samples", drop), gov,
                                           context.log.info, drop)
        seconds = time.perf_counter() - t0
        _commit_saliency_lineage(context, storage, gov.config_hash(), fm.model_id)
        return MaterializeResult(metadata=_saliency_metadata(n, forward_calls, seconds, fm.grid, fm.model_id, 1))

    return patch_saliency


# --- row-range shards ---------------------------------------------------------------------------------

def _sharded_patch_saliency(gov: GovernorSettings, version: str, fingerprint: str, load):
    """Plan row-range shards, score each in its own step, merge them in row order into the drop's
    one Parquet file."""
    config_hash = gov.config_hash()  # `shards` is not in it: the split changes no output
    plan_saliency_shards = _plan_op(gov, version, fingerprint, config_hash)
    score_saliency_shard = _score_op(gov, load)
    merge_saliency_shards = _merge_op(config_hash)

    @graph_asset(**_ASSET, code_version=version,
                 ins={"raw_samples": AssetIn("raw_samples", dagster_type=Nothing),
                      "governor": AssetIn("governor", dagster_type=Nothing)},
                 description=_DESCRIPTION + "Scored in row-range shards (`[governor] shards`), one step each, "
                                            "merged in row order: the table is the same for any number of shards.")
    def patch_saliency(raw_samples, governor):
        shards = plan_saliency_shards(raw_samples=raw_samples, governor=governor)
        return merge_saliency_shards(shards.map(score_saliency_shard).collect())

    return patch_saliency


def _plan_op(gov: GovernorSettings, version: str, fingerprint: str, config_hash: str):
    @op(ins={"raw_samples": In(Nothing), "governor": In(Nothing)}, out=DynamicOut(dict),
        description="Split the drop's valid images into row ranges of whole batches ([governor] shards).")
    def plan_saliency_shards(context: OpExecutionContext, storage: StorageResource):
        drop = context.partition_key
        raw = storage.warehouse.parquet_file("raw_samples", drop)
        n = count_valid_images(raw)
        ranges = shard_ranges(n, gov.batch_size, gov.shards)
        context.log.info(f"{drop}: {n} valid images in {len(ranges)} shard(s) of at most "
                         f"{max(b - a for a, b in ranges)} rows")
        identity = {"asset": "patch_saliency", "code_version": version, "governor": fingerprint,
                    "config_hash": config_hash}
        for shard in _shard_identities(raw, ranges, identity):
            yield DynamicOutput(shard, mapping_key=f"rows_{shard['start']}_{shard['stop']}")

    return plan_saliency_shards


def _shard_identities(raw, ranges: list[tuple[int, int]], identity: dict) -> list[dict]:
    """Each shard's identity (what it is computed from, rows included) and the file name it hashes to:
    a shard written for the same identity is kept by a retry or a re-run."""
    shards = []
    for (start, stop), digest in zip(ranges, range_digests(raw, ranges)):
        shard = {**identity, "start": start, "stop": stop, "rows_digest": digest}
        key = hashlib.sha256(json.dumps(shard, sort_keys=True).encode()).hexdigest()[:16]
        shards.append({**shard, "key": key, "file": f"{start:09d}-{stop:09d}-{key}.parquet"})
    return shards


def _score_op(gov: GovernorSettings, load):
    @op(retry_policy=SHARD_RETRY, description="Score one row range with the governor into its own shard file "
                                              "(kept if already written for the same rows, model and version).")
    def score_saliency_shard(context: OpExecutionContext, storage: StorageResource, shard: dict) -> dict:
        drop = context.partition_key
        wh = storage.warehouse
        path = wh.shard_dir("patch_saliency", drop) / shard["file"]
        done = _finished_shard(path, shard)
        if done is not None:
            context.log.info(f"{drop}: rows {shard['start']}-{shard['stop']} already scored, kept")
            return {**done, "reused": True}
        try:
            fm = load()
        except ModelNotFound as exc:
            raise Failure(str(exc), allow_retries=False) from exc
        done = _score_shard(fm, wh.parquet_file("raw_samples", drop), path, shard, gov, context.log.info, drop)
        return {**done, "reused": False}

    return score_saliency_shard


def _score_shard(fm, raw_path, path: Path, shard: dict, gov: GovernorSettings, log, drop: str) -> dict:
    """Score one shard's rows into `path`, then write the metadata file that marks it finished."""
    start, stop = shard["start"], shard["stop"]
    t0 = time.perf_counter()
    with stream_parquet(path, SALIENCY_SCHEMA) as out_file:
        n, forward_calls = _score_rows(fm, out_file, raw_path, gov, log, f"{drop} rows {start}-{stop}", start, stop)
        if n != stop - start:  # raised inside the block: the shard file is never put in place
            raise RuntimeError(f"{drop}: rows {start}-{stop} yielded {n} images: "
                               f"raw_samples changed since the shards were planned")
    done = {**shard, "rows": n, "model_id": fm.model_id, "grid": list(fm.grid),
            "forward_calls": forward_calls, "seconds": round(time.perf_counter() - t0, 3)}
    with atomic_path(path.with_suffix(_SHARD_META)) as tmp:
        tmp.write_text(json.dumps(done, indent=1))
    return done


def _merge_op(config_hash: str):
    @op(out=Out(Nothing), description="Concatenate the shards in row order into the drop's patch_saliency "
                                      "Parquet file, record lineage, remove the shards.")
    def merge_saliency_shards(context: OpExecutionContext, storage: StorageResource, shards: list) -> Output:
        drop = context.partition_key
        wh = storage.warehouse
        shards = sorted(shards, key=lambda s: s["start"])
        folder = wh.shard_dir("patch_saliency", drop)
        model_id = _merge_shards(wh, drop, folder, shards)
        _commit_saliency_lineage(context, storage, config_hash, model_id)
        shutil.rmtree(folder, ignore_errors=True)  # merged shards, and stale ones of older versions
        meta = _saliency_metadata(sum(s["rows"] for s in shards), sum(s["forward_calls"] for s in shards),
                                  sum(s["seconds"] for s in shards), shards[0]["grid"], model_id, len(shards))
        return Output(None, metadata={**meta, "shards_reused": sum(1 for s in shards if s["reused"])})

    return merge_saliency_shards


def _merge_shards(wh, drop: str, folder: Path, shards: list[dict]) -> str:
    """Write the finished shards (in row order) as the drop's patch_saliency file; the governor id
    they were all scored by."""
    _check_contiguous(drop, shards)
    paths = [folder / s["file"] for s in shards]
    for s, path in zip(shards, paths):
        if _finished_shard(path, s) is None:
            raise FileNotFoundError(f"{drop}: shard rows {s['start']}-{s['stop']} is missing at {path} "
                                    f"(removed by a concurrent run?): re-materialise patch_saliency")
    model_ids = {s["model_id"] for s in shards}
    if len(model_ids) != 1:
        raise RuntimeError(f"{drop}: shards were scored by different models {sorted(model_ids)}")
    if len(paths) == 1:
        wh.adopt("patch_saliency", drop, paths[0])  # the very file a single step writes
    else:
        with wh.stream_table("patch_saliency", drop, SALIENCY_SCHEMA) as writer:
            for path in paths:
                pf = pq.ParquetFile(path)
                for g in range(pf.num_row_groups):  # the shard's own row groups, one at a time
                    writer.write_table(pf.read_row_group(g))
    return model_ids.pop()


def _finished_shard(path: Path, shard: dict) -> dict | None:
    """The shard's record when its Parquet file and metadata exist for exactly this identity."""
    meta = path.with_suffix(_SHARD_META)
    if not (path.exists() and meta.exists()):
        return None
    try:
        done = json.loads(meta.read_text())
    except ValueError:
        return None
    same = all(done.get(k) == v for k, v in shard.items() if k != "reused")
    if not same or pq.ParquetFile(path).metadata.num_rows != done.get("rows"):
        return None
    return done


def _check_contiguous(drop: str, shards: list[dict]) -> None:
    at = 0
    for s in shards:
        if s["start"] != at:
            raise RuntimeError(f"{drop}: shards do not cover the rows contiguously at row {at}: "
                               f"{[(x['start'], x['stop']) for x in shards]}")
        at = s["stop"]
