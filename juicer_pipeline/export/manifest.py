"""An export's manifest.json (what it is and where it came from), its stock open_clip config, and the
open_clip_train command that trains on it."""
from __future__ import annotations

import hashlib
import json

import fsspec
import numpy as np
import pyarrow as pa

from .request import (AUGMENTATION_NOTE, MANIFEST, SCHEMA_VERSION, ExportError, ExportRequest, GovernorInfo,
                      grid_name)
from .samples import ExportPlan


def build_manifest(request: ExportRequest, governor: GovernorInfo, plan: ExportPlan, members, shards: list[dict],
                   excluded: pa.Table, has_model: bool) -> dict:
    h, w = governor.geometry.size
    ks = {grid_name(g): int(np.ceil(request.rho * g[0] * g[1] - 1e-9)) for g in plan.grids}
    stored_k = {len(k) for k in members.kept} if plan.has_kept else set()
    if plan.has_kept and stored_k != {ks[grid_name(plan.gov_grid)]}:
        raise ExportError(f"the training set's kept sets hold {sorted(stored_k)} patches, not ⌈ρN⌉ = "
                          f"{ks[grid_name(plan.gov_grid)]} at ρ = {request.rho}: re-materialise pruned_images and "
                          f"training_set[{request.recipe}] with the current settings")
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "juicer-export", "recipe": request.recipe,
        "training_set_id": str(members.training_set_id.iloc[0]), "samples": len(members),
        "uids_only": request.uids_only, "patches": request.patches,
        "caption_versions": {str(k): int(v) for k, v in members.caption_version.value_counts().sort_index().items()},
        "governor": {"model_id": governor.model_id, "source": governor.source, "card": governor.card},
        "provenance": request.provenance,
        "saliency": {"method": request.saliency_method, "rho": request.rho},
        "image": {"format": "png" if request.lossless else "jpg",
                  "jpeg_quality": None if request.lossless else request.jpeg_quality, "width": w, "height": h,
                  "patch_size": list(plan.patch), "governor_grid": list(plan.gov_grid),
                  "geometry": list(governor.geometry.description)},
        "grids": [{"name": grid_name(g), "h": g[0], "w": g[1], "k": ks[grid_name(g)], "file": f"kept.{grid_name(g)}.npy",
                   "source": "training set" if g == plan.gov_grid else "saliency resampled to this grid, top ⌈ρN⌉"}
                  for g in plan.grids],
        "augmentations": AUGMENTATION_NOTE,
        "shards": shards, "excluded": excluded.num_rows,
        "files": {"uids": "uids.npy", "excluded": "excluded.parquet",
                  **({} if request.uids_only else {"sizes": "shards/sizes.json"}),
                  **({"open_clip_model": "open_clip_model"} if has_model else {})},
        "uid": "sha256(sample_id) as 32 hex digits; uids.npy holds them as sorted (u8, u8) halves",
    }
    manifest["export_id"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return manifest


def stock_open_clip_config(arch, image_size: tuple[int, int], patch_size: tuple[int, int]) -> dict | None:
    """An open_clip_config.json for `local-dir:`: a stock ViT (patchify stem) with the student
    architecture's widths, on the export's image size and patch grid, so that the printed
    open_clip_train command trains without a download and `kept.<grid>.npy` fits its tokens."""
    from ..models.loader import OPENAI_MEAN, OPENAI_STD

    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        return None  # open_clip's ViT takes one patch size; non-square geometries need a config of one's own
    return {"model_cfg": {
        "embed_dim": arch.embed_dim,
        "vision_cfg": {"image_size": image_size[0], "patch_size": patch_size[0], "width": arch.vision_width,
                       "layers": arch.vision_layers, "head_width": arch.vision_width // arch.vision_heads},
        "text_cfg": {"context_length": arch.context_length, "vocab_size": 49408, "width": arch.text_width,
                     "heads": arch.text_heads, "layers": arch.text_layers}},
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                           "resize_mode": "squash"}}


def read_manifest(out: str, storage_options: dict | None = None) -> dict:
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    with fs.open(f"{path}/{MANIFEST}", "r") as f:
        return json.load(f)


def shard_pattern(out: str, n_shards: int) -> str:
    """The brace pattern open_clip_train's --train-data takes: DIR/shards/{00000..00003}.tar."""
    last = f"{n_shards - 1:05d}"
    return f"{out.rstrip('/')}/shards/{{00000..{last}}}.tar" if n_shards > 1 else f"{out.rstrip('/')}/shards/00000.tar"


def open_clip_train_command(out: str, manifest: dict, batch_size: int = 64, kept: bool = False) -> str:
    """The command that trains a stock open_clip CLIP on the export (with `kept`, through the
    kept-token launcher, on the governor's grid)."""
    pattern = shard_pattern(out, len(manifest["shards"]))
    model = f"local-dir:{out.rstrip('/')}/open_clip_model" if "open_clip_model" in manifest["files"] else "<model>"
    batch = min(batch_size, max(1, manifest["samples"]))
    args = (f"--train-data '{pattern}' --dataset-type webdataset --model {model} "
            f"--aug-cfg scale='(1.0,1.0)' --batch-size {batch} --epochs 1 --workers 0 --device cpu --precision fp32 "
            f"--lr 1e-3 --warmup 1 --save-frequency 0 --zeroshot-frequency 0 --report-to '' "
            f"--logs open_clip_logs")
    if kept:
        return f"python -m juicer_pipeline.export.open_clip_kept -- {args}"
    return f"python -m open_clip_train.main {args}"
