"""Vision branch: the governor, and per drop one FM pass → saliency, kept patches, classes, sieve."""
import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from dagster import (AssetExecutionContext, AssetIn, Backoff, DynamicOut, DynamicOutput, Failure, In, MaterializeResult,
                     MetadataValue, Nothing, OpExecutionContext, Out, Output, RetryPolicy, asset, graph_asset, op)

from ..world.calibration import calibrate_world_governor
from ..governance.classes import CropPlan, decide_classes, region_class_scores
from ..governance.images import load_rgb
from ..governance.prompts import abstain_embedding, class_embeddings
from ..governance.pruning import keep_top
from ..governance.saliency import VisionPass
from ..governance.parquet_batches import coalesced_row_groups
from ..governance.vision import (SALIENCY_ROW_GROUP_ROWS, SALIENCY_SCHEMA, count_valid_images, iter_valid_images,
                                 range_digests, saliency_record_batch, score_batch, shard_ranges, stored_vectors)
from ..models.loader import ModelNotFound, cached_foundation_model, model_fingerprint
from ..automation.conditions import PER_DROP, SHARED
from ..settings import GovernorSettings, JuicerSettings, code_version
from ..storage import LineageRow, atomic_path, lineage_op, upsert_model, write_lineage
from ..storage.warehouse import stream_parquet
from ..governance.vocabulary import ClassVocabulary
from .partitions import drops_partitions
from .progress import ThrottledProgress
from .resources import StorageResource
from .vocabulary import class_vocabulary, vocabulary_fingerprint
from .ui import bar_chart, line_chart, markdown_table, png_markdown, prune_preview

_PREVIEWS = 4


_CLASS_EMBEDDINGS: dict[tuple[str, str], torch.Tensor] = {}


def _class_embeddings(fm, vocab: ClassVocabulary) -> torch.Tensor:
    """The vocabulary's prompt-ensembled text embeddings, computed once per model, vocabulary and process."""
    key = (fm.model_id, vocab.fingerprint())
    if key not in _CLASS_EMBEDDINGS:
        _CLASS_EMBEDDINGS[key] = class_embeddings(fm.encode_text, list(vocab.names), vocab.attributes, vocab.templates)
    return _CLASS_EMBEDDINGS[key]


def _crop_plan(cls) -> CropPlan:
    return CropPlan(tuple(cls.region_fractions), cls.max_regions, tuple(cls.crop_margins))


def _abstain_embedding(fm, enabled: bool) -> torch.Tensor | None:
    return abstain_embedding(fm.encode_text) if enabled else None


def _version(context) -> str:
    return context.assets_def.code_versions_by_key[context.asset_key]


def _commit_lineage(storage: StorageResource, row: LineageRow) -> None:
    storage.commit([lineage_op(row)])


def read_governor_record(storage: StorageResource) -> dict:
    wh = storage.warehouse
    path = wh.object_path("governor", "governor.json")
    if not wh.exists(path):
        raise FileNotFoundError(f"{path} is missing: materialise the `governor` asset first")
    return json.loads(wh.read_text(path))


# A shard that fails (a lost worker, a flaky device) is retried on its own; the other shards keep
# their results. Errors that a retry cannot fix (a missing model) fail at once.
SHARD_RETRY = RetryPolicy(max_retries=2, delay=1.0, backoff=Backoff.EXPONENTIAL)
_SHARD_META = ".json"  # a shard is finished when its metadata file sits next to its Parquet file


def _build_patch_saliency(gov: GovernorSettings, fingerprint: str, load):
    """`patch_saliency` as a graph-backed asset: plan row-range shards, score each in its own step,
    merge them in row order into the drop's one Parquet file.

    The asset key, partitions, code version, automation condition, kinds and upstream assets are
    those of the single-step asset it replaces, so downstream assets, the drop job and the UI see
    the same asset; only its steps differ (`patch_saliency.plan_saliency_shards`,
    `patch_saliency.score_saliency_shard[rows_<start>_<stop>]`, `patch_saliency.merge_saliency_shards`).
    """
    version = code_version("patch_saliency-2", fingerprint)
    config_hash = gov.config_hash()  # `shards` is not in it: the split changes no output
    if gov.shards == 1:
        return _single_step_patch_saliency(gov, version, load)

    @op(ins={"raw_samples": In(Nothing), "governor": In(Nothing)}, out=DynamicOut(dict),
        description="Split the drop's valid images into row ranges of whole batches ([governor] shards).")
    def plan_saliency_shards(context: OpExecutionContext, storage: StorageResource):
        drop = context.partition_key
        raw = storage.warehouse.parquet_file("raw_samples", drop)
        n = count_valid_images(raw)
        ranges = shard_ranges(n, gov.batch_size, gov.shards)
        context.log.info(f"{drop}: {n} valid images in {len(ranges)} shard(s) of at most "
                         f"{max(b - a for a, b in ranges)} rows")
        for (start, stop), digest in zip(ranges, range_digests(raw, ranges)):
            identity = {"asset": "patch_saliency", "code_version": version, "governor": fingerprint,
                        "config_hash": config_hash, "start": start, "stop": stop, "rows_digest": digest}
            key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
            yield DynamicOutput({**identity, "key": key, "file": f"{start:09d}-{stop:09d}-{key}.parquet"},
                                mapping_key=f"rows_{start}_{stop}")

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
        vision = VisionPass(fm.model)
        t0, n, progress = time.perf_counter(), 0, ThrottledProgress(context.log.info)
        try:
            with stream_parquet(path, SALIENCY_SCHEMA) as out_file, \
                    coalesced_row_groups(out_file, SALIENCY_ROW_GROUP_ROWS) as writer:
                for ids, images in iter_valid_images(wh.parquet_file("raw_samples", drop), gov.batch_size,
                                                     shard["start"], shard["stop"]):
                    out = score_batch(fm, vision, images, gov.precision)
                    writer.write_batch(saliency_record_batch(ids, fm.grid, out))
                    n += len(ids)
                    progress(lambda: f"{drop} rows {shard['start']}-{shard['stop']}: {n} images scored")
                if n != shard["stop"] - shard["start"]:
                    raise RuntimeError(f"{drop}: rows {shard['start']}-{shard['stop']} yielded {n} images: "
                                       f"raw_samples changed since the shards were planned")
        finally:
            vision.close()
        done = {**shard, "rows": n, "model_id": fm.model_id, "grid": list(fm.grid),
                "forward_calls": vision.forward_calls, "seconds": round(time.perf_counter() - t0, 3)}
        with atomic_path(path.with_suffix(_SHARD_META)) as tmp:
            tmp.write_text(json.dumps(done, indent=1))
        return {**done, "reused": False}

    @op(out=Out(Nothing), description="Concatenate the shards in row order into the drop's patch_saliency "
                                      "Parquet file, record lineage, remove the shards.")
    def merge_saliency_shards(context: OpExecutionContext, storage: StorageResource, shards: list) -> Output:
        drop = context.partition_key
        wh = storage.warehouse
        shards = sorted(shards, key=lambda s: s["start"])
        folder = wh.shard_dir("patch_saliency", drop)
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
        model_id = model_ids.pop()
        _commit_lineage(storage, LineageRow("patch_saliency", drop, [f"raw_samples/{drop}", "governor"],
                                            context.run.run_id, _version(context), config_hash, model_id))
        shutil.rmtree(folder, ignore_errors=True)  # merged shards, and stale ones of older versions
        n = sum(s["rows"] for s in shards)
        seconds = sum(s["seconds"] for s in shards)
        grid = shards[0]["grid"]
        return Output(None, metadata={
            "images": n, "full_image_forward_passes": sum(s["forward_calls"] for s in shards),
            "seconds": round(seconds, 2), "images_per_second": round(n / max(seconds, 1e-9), 1),
            "grid": f"{grid[0]}x{grid[1]}", "governor_id": model_id,
            "shards": len(shards), "shards_reused": sum(1 for s in shards if s["reused"])})

    @graph_asset(name="patch_saliency", partitions_def=drops_partitions, code_version=version,
                 automation_condition=PER_DROP, group_name="vision", kinds={"pytorch", "parquet"},
                 ins={"raw_samples": AssetIn("raw_samples", dagster_type=Nothing),
                      "governor": AssetIn("governor", dagster_type=Nothing)},
                 description="One governor pass per valid image: pooled normalised embedding and the patch "
                             "saliency grid of every method (so a method or ρ change never re-runs the model). "
                             "Scored in row-range shards (`[governor] shards`), one step each, merged in row "
                             "order: the table is the same for any number of shards.")
    def patch_saliency(raw_samples, governor):
        shards = plan_saliency_shards(raw_samples=raw_samples, governor=governor)
        return merge_saliency_shards(shards.map(score_saliency_shard).collect())

    return patch_saliency


def _single_step_patch_saliency(gov: GovernorSettings, version: str, load):
    """The default (`shards = 1`): one step, no planning or merging steps to start, so a drop run
    on the multiprocess or celery executor pays no extra step start-up. Its table equals the
    sharded asset's (test_sharded_vision compares them)."""
    @asset(name="patch_saliency", automation_condition=PER_DROP, partitions_def=drops_partitions,
           deps=["raw_samples", "governor"], group_name="vision", code_version=version, kinds={"pytorch", "parquet"},
           description="One governor pass per valid image: pooled normalised embedding and the patch "
                       "saliency grid of every method (so a method or ρ change never re-runs the model). "
                       "`[governor] shards` > 1 splits it into row-range steps.")
    def patch_saliency(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        fm = load()
        vision = VisionPass(fm.model)
        t0, n, progress = time.perf_counter(), 0, ThrottledProgress(context.log.info)
        try:
            with wh.stream_table("patch_saliency", drop, SALIENCY_SCHEMA) as out_file, \
                    coalesced_row_groups(out_file, SALIENCY_ROW_GROUP_ROWS) as writer:
                for ids, images in iter_valid_images(wh.parquet_file("raw_samples", drop), gov.batch_size):
                    out = score_batch(fm, vision, images, gov.precision)
                    writer.write_batch(saliency_record_batch(ids, fm.grid, out))
                    n += len(ids)
                    progress(lambda: f"{drop}: {n} images scored")
        finally:
            vision.close()
        seconds = time.perf_counter() - t0
        _commit_lineage(storage, LineageRow("patch_saliency", drop, [f"raw_samples/{drop}", "governor"],
                                            context.run.run_id, version, gov.config_hash(), fm.model_id))
        return MaterializeResult(metadata={
            "images": n, "full_image_forward_passes": vision.forward_calls, "seconds": round(seconds, 2),
            "images_per_second": round(n / max(seconds, 1e-9), 1), "grid": f"{fm.grid[0]}x{fm.grid[1]}",
            "governor_id": fm.model_id, "shards": 1})

    return patch_saliency


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


def build_vision_assets(settings: JuicerSettings) -> list:
    gov, sal, cls = settings.governor, settings.saliency, settings.classes
    fingerprint = model_fingerprint(gov.source)
    load = lambda: cached_foundation_model(gov.source, gov.device)  # noqa: E731

    vocab_version = vocabulary_fingerprint(cls)

    @asset(code_version=code_version("governor-2", gov, fingerprint, cls, vocab_version), group_name="vision",
           kinds={"pytorch", "duckdb"}, automation_condition=SHARED,
           description="The foundation model every stage uses (settings `governor.source`), its held-out "
                       "scores and its calibrated class threshold τ. Catalog row in `models`.")
    def governor(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        fm = load()
        vocab = class_vocabulary(cls)
        class_emb = _class_embeddings(fm, vocab)
        # the world's calibration split is labelled with the world's shapes: it calibrates τ for
        # that vocabulary only
        if (gov.source == "world" or gov.source.startswith("file:")) and cls.vocabulary is None:
            context.log.info("calibrating τ on the world corpus validation split")
            calibration = calibrate_world_governor(fm, class_emb, cls.saliency_method, _crop_plan(cls),
                                                   cls.target_precision, cls.k, n_images=cls.calibration_images,
                                                   batch_size=gov.batch_size,
                                                   abstain_emb=_abstain_embedding(fm, cls.abstain))
        else:
            calibration = {"calibrated": False, "tau": cls.fallback_tau,
                           "reason": "no labelled calibration split for this governor and vocabulary; fallback τ used"}
        record = {k: v for k, v in fm.info.items() if k not in ("loss_curve",)}
        def register(con):
            upsert_model(con, fm.model_id, "governor", fm.source, fm.info.get("arch", {}), record,
                         calibration["tau"], calibration)
            write_lineage(con, LineageRow("governor", None, [f"model:{fm.source}"], context.run.run_id,
                                          _version(context), gov.config_hash(), fm.model_id))

        storage.catalog.write(register)
        storage.warehouse.write_bytes(storage.warehouse.object_path("governor", "governor.json"), json.dumps(
            {"model_id": fm.model_id, "source": fm.source, "tau": calibration["tau"], "calibration": calibration},
            indent=1).encode())
        scores = fm.info.get("scores", {})
        meta = {
            "model_id": fm.model_id, "source": fm.source, "tau": calibration["tau"],
            "calibration": MetadataValue.json(calibration),
            "held_out_scores": MetadataValue.md(markdown_table(
                [{"metric": k, "value": round(v, 4)} for k, v in scores.items() if k != "step"])),
        }
        if fm.info.get("loss_curve"):
            meta["loss_curve"] = MetadataValue.md(png_markdown(line_chart(fm.info["loss_curve"], title="training loss")))
        return MaterializeResult(metadata=meta)

    patch_saliency = _build_patch_saliency(gov, fingerprint, load)

    @asset(automation_condition=PER_DROP, partitions_def=drops_partitions, deps=[patch_saliency], group_name="vision",
           code_version=code_version("pruned_images-1", fingerprint, sal), kinds={"parquet"},
           description="Top ⌈ρ·N⌉ patches per image by the configured saliency method: the kept indices "
                       "that training feeds to the vision tower.")
    def pruned_images(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        table = wh.read_table("patch_saliency", drop, ["sample_id", "grid_h", "grid_w", sal.method])
        n_patches = int(table.column("grid_h")[0].as_py() * table.column("grid_w")[0].as_py()) if len(table) else 0
        scores = stored_vectors(table, sal.method, n_patches)
        kept = [keep_top(s, sal.rho) for s in scores]
        out = pa.table({"sample_id": table.column("sample_id"),
                        "n_patches": pa.array([n_patches] * len(kept), pa.int16()),
                        "n_kept": pa.array([len(k) for k in kept], pa.int16()),
                        "kept": pa.array([k.tolist() for k in kept], pa.list_(pa.int16())),
                        "method": pa.array([sal.method] * len(kept)), "rho": pa.array([sal.rho] * len(kept))})
        wh.write_table("pruned_images", drop, out)
        info = read_governor_record(storage)
        _commit_lineage(storage, LineageRow("pruned_images", drop, [f"patch_saliency/{drop}"],
                                         context.run.run_id, _version(context),
                                         sal.config_hash(), info["model_id"]))
        tokens_before, tokens_after = n_patches * len(kept), sum(len(k) for k in kept)
        meta = {"images": len(kept), "rho": sal.rho, "method": sal.method, "tokens_before": tokens_before,
                "tokens_after": tokens_after, "kept_share": round(tokens_after / max(tokens_before, 1), 4)}
        if len(kept):
            meta["preview"] = MetadataValue.md(_previews(wh, drop, table, scores, kept))
        return MaterializeResult(metadata=meta)

    @asset(automation_condition=PER_DROP, partitions_def=drops_partitions, deps=[patch_saliency, governor], group_name="vision",
           code_version=code_version("extracted_classes-2", fingerprint, cls, vocab_version), kinds={"pytorch", "parquet"},
           description="At most k object classes per image with probability ≥ τ (calibrated), from zero-shot "
                       "classification of crops around connected salient regions (a second, small FM pass).")
    def extracted_classes(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        fm = load()
        info = read_governor_record(storage)
        tau = float(info["tau"])
        vocab = class_vocabulary(cls)
        names = list(vocab.names)
        class_emb = _class_embeddings(fm, vocab)
        abstain = _abstain_embedding(fm, cls.abstain)
        table = wh.read_table("patch_saliency", drop, ["sample_id", cls.saliency_method])
        saliency = stored_vectors(table, cls.saliency_method, fm.grid[0] * fm.grid[1])
        position = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
        rows, crops, t0 = [], 0, time.perf_counter()
        for ids, images in iter_valid_images(wh.parquet_file("raw_samples", drop), gov.batch_size):
            idx = [position[s] for s in ids]
            scores, n_regions = region_class_scores(fm, images, saliency[idx], fm.grid, class_emb, _crop_plan(cls),
                                                    gov.batch_size, abstain)
            crops += sum(n_regions) * len(cls.crop_margins)  # one crop per region and margin
            for sid, s, nr in zip(ids, scores, n_regions):
                chosen = decide_classes(s, names, cls.k, tau)
                rows.append({"sample_id": sid, "classes": [c for c, _ in chosen],
                             "probs": [p for _, p in chosen], "scores": s.tolist(), "n_regions": nr})
        schema = pa.schema([("sample_id", pa.string()), ("classes", pa.list_(pa.string())),
                            ("probs", pa.list_(pa.float32())), ("scores", pa.list_(pa.float32())),
                            ("n_regions", pa.int16())])
        wh.write_table("extracted_classes", drop, pa.Table.from_pylist(rows, schema=schema))
        _commit_lineage(storage, LineageRow("extracted_classes", drop,
                                         [f"patch_saliency/{drop}", f"raw_samples/{drop}", "governor"],
                                         context.run.run_id, _version(context),
                                         cls.config_hash(), info["model_id"]))
        hist = Counter(c for r in rows for c in r["classes"])
        labels = [c for c, _ in hist.most_common()]
        return MaterializeResult(metadata={
            "images": len(rows), "tau": tau, "k": cls.k, "region_crop_forward_passes": crops,
            "images_with_classes": sum(1 for r in rows if r["classes"]),
            "classes_per_image": round(sum(len(r["classes"]) for r in rows) / max(len(rows), 1), 3),
            "seconds": round(time.perf_counter() - t0, 2),
            "class_histogram": MetadataValue.md(png_markdown(bar_chart(labels, [hist[c] for c in labels],
                                                                       title="extracted classes"))),
            "note": "classes come from a second FM pass over crops of salient regions; the full-image pass "
                    "is not repeated"})

    @asset(automation_condition=PER_DROP, partitions_def=drops_partitions, deps=[patch_saliency, "raw_samples"], group_name="vision",
           code_version=code_version("sieve_scores-1", fingerprint), kinds={"pytorch", "parquet"},
           description="Governor image-text cosine per sample from the stored image embedding and the "
                       "caption embedding: the sample-level sieve's (DataSieve baseline) input.")
    def sieve_scores(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        fm = load()
        table = wh.read_table("patch_saliency", drop, ["sample_id", "embedding"])
        emb = stored_vectors(table, "embedding")
        raw = wh.read_table("raw_samples", drop, ["sample_id", "caption", "status"])
        captions = dict(zip(raw.column("sample_id").to_pylist(), raw.column("caption").to_pylist()))
        ids = table.column("sample_id").to_pylist()
        text = fm.encode_text([captions[s] for s in ids], gov.batch_size).numpy()
        cos = (emb * text).sum(-1) if len(ids) else np.zeros(0, np.float32)
        wh.write_table("sieve_scores", drop, pa.table({"sample_id": ids, "sieve_score": pa.array(cos, pa.float32())}))
        info = read_governor_record(storage)
        _commit_lineage(storage, LineageRow("sieve_scores", drop,
                                         [f"patch_saliency/{drop}", f"raw_samples/{drop}"],
                                         context.run.run_id, _version(context),
                                         gov.config_hash(), info["model_id"]))
        q = np.quantile(cos, [0.1, 0.5, 0.9]).round(4).tolist() if len(cos) else []
        return MaterializeResult(metadata={"samples": len(ids), "mean_cosine": float(np.mean(cos)) if len(cos) else 0.0,
                                           "cosine_p10_p50_p90": str(q)})

    return [governor, patch_saliency, pruned_images, extracted_classes, sieve_scores]


def _previews(wh, drop: str, table, scores: np.ndarray, kept: list) -> str:
    wanted = set(table.column("sample_id").to_pylist()[:_PREVIEWS])
    raw = wh.read_table("raw_samples", drop, columns=["sample_id", "image"], filters=[("sample_id", "in", list(wanted))])
    images = dict(zip(raw.column("sample_id").to_pylist(), raw.column("image").to_pylist()))
    grid = (int(table.column("grid_h")[0].as_py()), int(table.column("grid_w")[0].as_py()))
    parts = []
    for i, sid in enumerate(table.column("sample_id").to_pylist()[:_PREVIEWS]):
        panel = prune_preview(load_rgb(images[sid]), scores[i], kept[i], grid)
        parts.append(f"**{sid}** (original | saliency | kept {len(kept[i])}/{scores.shape[1]})\n\n"
                     + png_markdown(panel, sid))
    return "\n\n".join(parts)
