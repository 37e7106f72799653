"""raw_samples: one drop in, one Parquet file of verified samples (or quarantine rows) out."""

import time
from collections import Counter

from dagster import (AssetExecutionContext, DataVersion, DataVersionsByPartition, MaterializeResult, MetadataValue,
                     asset, observable_source_asset)

from ..governance.drop_fingerprint import drop_version, fingerprint_drop
from ..governance.drop_sources import drop_folder, open_drop
from ..governance.images import ImageLimits, load_rgb
from ..governance.ingest import RAW_SAMPLES_SCHEMA, RAW_SAMPLES_WRITER_OPTIONS, IngestStats, ingest_batches
from ..automation.conditions import RERUN_ON_SETTINGS
from ..settings import JuicerSettings, code_version
from ..storage import LineageRow, drop_op, lineage_op
from .partitions import drops_partitions
from .progress import ThrottledProgress
from .resources import StorageResource
from .ui import image_strip, markdown_table, png_markdown

_PREVIEW_ROWS = 8
_THUMBNAILS = 12


@observable_source_asset(
    partitions_def=drops_partitions, group_name="ingest",
    description="The files of each drop folder, versioned by their content fingerprint (paths, sizes, "
                "modification times; manifest and shard hashes). The drop sensor observes every drop each "
                "tick, so a drop whose files change makes exactly its raw_samples partition unsynced; a "
                "deleted folder is observed as version 'deleted'.")
def drop_files(context, storage: StorageResource) -> DataVersionsByPartition:
    """Observing by hand ('Observe' in the UI) gives the same versions the sensor records."""
    names = context.instance.get_dynamic_partitions(drops_partitions.name)
    return DataVersionsByPartition({n: DataVersion(drop_version(storage.warehouse.drops_dir, n)[0]) for n in names})


def build_ingest_assets(settings: JuicerSettings) -> list:
    cfg = settings.ingest
    version = code_version("ingest-3", cfg)
    limits = ImageLimits(min_side=cfg.min_side, max_side=cfg.max_side, max_pixels=cfg.max_pixels,
                         max_file_bytes=cfg.max_file_bytes)

    @asset(
        partitions_def=drops_partitions, code_version=version, group_name="ingest", deps=[drop_files],
        kinds={"parquet", "duckdb"}, automation_condition=RERUN_ON_SETTINGS,
        description="Every sample of a drop, decoded and verified: valid with its image bytes, or "
                    "quarantined with a precise reason. Catalog rows in `samples` and `drops`.",
    )
    def raw_samples(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop_id = context.partition_key
        wh = storage.warehouse
        source = open_drop(drop_folder(wh.drops_dir, drop_id))
        fingerprint = fingerprint_drop(source.root)  # before reading: a change while reading shows next tick
        context.log.info(f"ingesting drop {drop_id} ({source.format}: {', '.join(source.describe())}; "
                         f"version {fingerprint.version[:12]})")
        stats, preview, thumbs = IngestStats(), [], []
        t0, progress = time.perf_counter(), ThrottledProgress(context.log.info)
        with wh.stream_table("raw_samples", drop_id, RAW_SAMPLES_SCHEMA, **RAW_SAMPLES_WRITER_OPTIONS) as writer:
            for batch in ingest_batches(source, drop_id, limits, cfg.max_caption_chars, stats, cfg.batch_rows,
                                        cfg.workers):
                writer.write_batch(batch)
                _collect_previews(batch, preview, thumbs)
                progress(lambda: f"{drop_id}: {stats.n_samples} samples read, {stats.n_quarantined} quarantined")
        seconds = time.perf_counter() - t0
        context.log.info(f"{drop_id}: {stats.n_samples} samples in {seconds:.1f}s, {stats.n_valid} valid, "
                         f"{stats.n_quarantined} quarantined")
        path = wh.partition_path("raw_samples", drop_id)
        drop_row = {"drop_id": drop_id, "path": str(source.root), "format": source.format,
                    "sources": source.describe(), "n_samples": stats.n_samples, "n_valid": stats.n_valid,
                    "n_quarantined": stats.n_quarantined, "bytes": stats.bytes, "run_id": context.run.run_id,
                    "version": fingerprint.version}
        lineage = LineageRow("raw_samples", drop_id, [f"drop:{source.root}/{s}" for s in source.describe()]
                             + [f"drop_version:{fingerprint.version}"], context.run.run_id, version, cfg.config_hash())
        storage.commit([drop_op(drop_row, path), lineage_op(lineage)])
        return MaterializeResult(metadata={**_metadata(stats, seconds, path, preview, thumbs),
                                           DROP_VERSION_KEY: fingerprint.version, "drop_files": fingerprint.n_files})

    return [drop_files, raw_samples]


DROP_VERSION_KEY = "drop_version"  # raw_samples metadata: the drop version it ingested


def _collect_previews(batch, preview: list, thumbs: list) -> None:
    if len(preview) >= _PREVIEW_ROWS and len(thumbs) >= _THUMBNAILS:
        return
    for row in batch.select(["sample_id", "status", "quarantine_reason", "raw_caption", "image"]).to_pylist():
        if len(preview) < _PREVIEW_ROWS:
            preview.append({k: row[k] for k in ("sample_id", "status", "quarantine_reason", "raw_caption")})
        if row["image"] is not None and len(thumbs) < _THUMBNAILS:
            thumbs.append(load_rgb(row["image"]))


def _metadata(stats: IngestStats, seconds: float, path, preview, thumbs) -> dict:
    reasons = Counter(stats.quarantined)
    meta = {
        "samples": stats.n_samples,
        "valid": stats.n_valid,
        "quarantined": stats.n_quarantined,
        "quarantined_by_reason": MetadataValue.md(markdown_table(
            [{"reason": r, "count": n} for r, n in reasons.most_common()])),
        "bytes": stats.bytes,
        "seconds": round(seconds, 3),
        "samples_per_second": round(stats.n_samples / max(seconds, 1e-9), 1),
        "path": MetadataValue.path(str(path)),
        "preview": MetadataValue.md(markdown_table(preview)),
    }
    if thumbs:
        meta["thumbnails"] = MetadataValue.md(png_markdown(image_strip(thumbs), "first valid samples"))
    return meta
