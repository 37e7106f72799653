"""A recipe's training set as WebDataset shards that open_clip_train and DataComp-style tools read.

The layout is img2dataset's, plus the juice (no Dagster import; the asset and `juicer export`
both call `export_training_set`)::

    DIR/shards/00000.tar        KEY.jpg (or .png), KEY.txt, KEY.json, KEY.saliency.npy, KEY.kept.<h>x<w>.npy
    DIR/shards/00000.parquet    the KEY.json fields, one row per sample
    DIR/shards/00000_stats.json
    DIR/shards/sizes.json       samples per shard (open_clip_train looks for it beside the shards)
    DIR/uids.npy                DataComp's subset format: the sorted uids as a structured (u8, u8) array
    DIR/excluded.parquet        the samples the recipe left out, with the reason
    DIR/open_clip_model/open_clip_config.json   a stock open_clip ViT on the export's patch grid
    DIR/manifest.json           what the export is and where it came from (written last)

A key is the sample's uid (32 hex digits, no dot: open_clip_train's webdataset splits the member
name at the first dot). Images are written as the governor saw them (its preprocess up to the
tensor conversion), so the stored patch indices line up with the image's own patch grid.
"""
from __future__ import annotations

import json
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import build_manifest, open_clip_train_command, read_manifest, shard_pattern, stock_open_clip_config
from .request import (AUGMENTATION_NOTE, MANIFEST, SCHEMA_VERSION, UID_DTYPE, ExportError, ExportRequest, ExportResult,
                      GovernorInfo, ImageGeometry, governor_geometry, grid_name, parse_grid, uid_for, uids_array)
from .samples import ExportPlan, governor_grid, juiced_samples, read_excluded, read_members
from .shards import SAMPLE_SCHEMA, Shards, npy_bytes
from .staging import Stage

__all__ = ["AUGMENTATION_NOTE", "MANIFEST", "PREVIEWS", "SAMPLE_SCHEMA", "SCHEMA_VERSION", "UID_DTYPE", "ExportError",
           "ExportRequest", "ExportResult", "GovernorInfo", "ImageGeometry", "export_training_set",
           "governor_geometry", "grid_name", "open_clip_train_command", "parse_grid", "read_manifest", "shard_pattern",
           "stock_open_clip_config", "uid_for", "uids_array"]

PREVIEWS = 4


def export_training_set(wh, out: str, request: ExportRequest, governor: GovernorInfo,
                        storage_options: dict | None = None, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Write `request.recipe`'s training set to `out` (a local folder or any fsspec URL) and return
    what was written. Memory holds one batch of images and one shard's table rows; the export
    becomes visible whole, replacing an earlier export at `out`, or not at all."""
    if request.samples_per_shard < 1:
        raise ExportError(f"samples_per_shard must be at least 1, got {request.samples_per_shard}")
    members = read_members(wh, request.recipe)
    excluded = read_excluded(wh, request.recipe)
    plan = ExportPlan(request, governor, governor_grid(wh, members))
    stage = Stage(out, storage_options)
    previews: list[dict] = []
    with stage.open():
        shards = Shards(stage, plan)
        if request.uids_only:  # DataComp's way for a sample filter: no shards, the uids select from the pool
            shards.members = {"uid": [uid_for(s) for s in members.sample_id], "key": [None] * len(members),
                              "shard": [None] * len(members), "sample_id": list(members.sample_id)}
        else:
            previews = _write_shards(wh, members, plan, shards, progress)
        stage.write_bytes("uids.npy", npy_bytes(uids_array(shards.members["uid"])))
        pq.write_table(excluded, stage.file("excluded.parquet"))
        stage.publish("excluded.parquet")
        model_config = None if request.uids_only or request.open_clip_arch is None else \
            stock_open_clip_config(request.open_clip_arch, governor.geometry.size, plan.patch)
        if model_config:
            stage.write_bytes("open_clip_model/open_clip_config.json", json.dumps(model_config, indent=1).encode())
        manifest = build_manifest(request, governor, plan, members, shards.done, excluded, bool(model_config))
        stage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())  # last: it commits the export
    return ExportResult(out, manifest["export_id"], manifest, len(members), len(shards.done),
                        sum(stage.written.values()), pa.table(shards.members), previews)


def _write_shards(wh, members, plan: ExportPlan, shards: Shards, progress: Callable[[str], None] | None) -> list[dict]:
    """Every member's sample into the shards, then shards/sizes.json; the first few samples as previews."""
    previews: list[dict] = []
    for n, sample in enumerate(juiced_samples(wh, members, plan), 1):
        shards.add(sample)
        if len(previews) < PREVIEWS:
            previews.append({"image": sample.picture, "caption": sample.fields["caption"],
                             "classes": sample.fields["classes"], "sample_id": sample.fields["sample_id"],
                             "kept": sample.kept.get(grid_name(plan.gov_grid)), "grid": plan.gov_grid})
        if progress and n % 5000 == 0:
            progress(f"{plan.request.recipe}: {n} of {len(members)} samples exported")
    shards.close_shard()
    shards.stage.write_bytes("shards/sizes.json", json.dumps({s["name"]: s["samples"] for s in shards.done},
                                                              indent=1).encode())
    return previews
