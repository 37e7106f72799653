"""The juiced dataset, per recipe, as WebDataset shards (the `juiced_dataset` asset), and the helpers
that `juicer export` shares with it: the same inputs, the same export, the same lineage."""

import dataclasses
import hashlib
import json

import pyarrow as pa
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from ..export import ExportRequest, ExportResult, GovernorInfo, export_training_set, governor_geometry
from ..export.webdataset_export import open_clip_train_command
from ..training import student_config
from ..governance.recipes import RECIPES
from ..models.loader import cached_foundation_model, model_fingerprint, weights_path
from ..settings import JuicerSettings, code_version
from ..storage import LineageRow, write_lineage
from ..storage.lineage import latest_seq
from .resources import StorageResource
from .training import recipe_partitions
from .ui import kept_preview, markdown_table, png_markdown
from .vision import read_governor_record

EXPORT_REVISION = "juiced_dataset-1"
MEMBERS_TABLE = "juiced_dataset_members"  # uid -> sample of every export (a catalog view over its Parquet)


def export_code_version(settings: JuicerSettings) -> str:
    return code_version(EXPORT_REVISION, settings.saliency, model_fingerprint(settings.governor.source))


def export_config_hash(settings: JuicerSettings, request: ExportRequest) -> str:
    """What besides the training set decides the export's bytes."""
    payload = {"saliency": settings.saliency.config_hash(), "grids": [list(g) for g in request.grids],
               "lossless": request.lossless, "uids_only": request.uids_only,
               "samples_per_shard": request.samples_per_shard, "jpeg_quality": request.jpeg_quality}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def governor_info(settings: JuicerSettings, storage: StorageResource) -> GovernorInfo:
    """The governor the drops were scored with, and the geometry of the images it saw."""
    record = read_governor_record(storage)
    fm = cached_foundation_model(settings.governor.source, settings.governor.device)
    if fm.model_id != record["model_id"]:
        raise ValueError(f"the configured governor {fm.model_id[:12]} is not the one recorded "
                         f"({record['model_id'][:12]}): re-materialise governor and the drops before exporting")
    weights = weights_path(settings.governor.source)
    card = weights.with_suffix(".md") if weights is not None else None
    return GovernorInfo(fm.model_id, fm.source, governor_geometry(fm.preprocess),
                        card.read_text() if card is not None and card.exists() else None)


def is_sample_filter(recipe_name: str) -> bool:
    """A recipe that only chooses samples (all patches, original captions): exported DataComp's
    way, as the uids it keeps, to subset any export of the pool with."""
    r = RECIPES[recipe_name]
    return r.sieve and r.patches == "all" and r.caption == "original"


def export_request(settings: JuicerSettings, storage: StorageResource, recipe_name: str, grids=(),
                   lossless: bool = False, uids_only: bool | None = None, samples_per_shard: int = 1000,
                   governor: GovernorInfo | None = None) -> tuple[ExportRequest, GovernorInfo]:
    if recipe_name not in RECIPES:
        raise ValueError(f"unknown recipe {recipe_name!r}: one of {', '.join(RECIPES)}")
    recipe = RECIPES[recipe_name]
    governor = governor or governor_info(settings, storage)
    request = ExportRequest(
        recipe=recipe_name, patches=recipe.patches, saliency_method=settings.saliency.method, rho=settings.saliency.rho,
        grids=tuple(grids), lossless=lossless, uids_only=is_sample_filter(recipe_name) if uids_only is None else uids_only,
        samples_per_shard=samples_per_shard, open_clip_arch=student_config(settings).arch)
    provenance = {"code_version": export_code_version(settings), "config_hash": export_config_hash(settings, request),
                  "training_config_hash": settings.training.config_hash(),
                  "lineage_seq": _training_set_seq(storage, recipe_name)}
    return dataclasses.replace(request, provenance=provenance), governor


def _training_set_seq(storage: StorageResource, recipe: str) -> int | None:
    """The lineage seq of the training set the export reads: its trace reads lineage as of then."""
    if storage.uses_commit_records and not storage.catalog.path.exists():
        return None
    return latest_seq(storage.catalog, f"training_set/{recipe}")


def record_export(storage: StorageResource, result: ExportResult, run_id: str | None) -> int:
    """The export's lineage row and its uid -> sample table (a catalog view), so that `juicer
    lineage --export` traces the export to its samples and an exported uid back to its sample."""
    m = result.manifest
    wh = storage.warehouse
    n = result.members.num_rows
    members = result.members.append_column("export_id", pa.array([result.export_id] * n)) \
        .append_column("recipe", pa.array([m["recipe"]] * n)).append_column("out", pa.array([result.out] * n))
    wh.write_table(MEMBERS_TABLE, f"{m['recipe']}-{result.export_id[:12]}", members)
    row = LineageRow("juiced_dataset", m["recipe"],
                     [f"training_set/{m['recipe']}", f"training_set_id:{m['training_set_id']}",
                      f"export_id:{result.export_id}", f"out:{result.out}"],
                     run_id, m["provenance"]["code_version"], m["provenance"]["config_hash"], m["governor"]["model_id"])
    seq = storage.catalog.write(lambda con: write_lineage(con, row))
    storage.catalog.refresh_views(wh)
    return seq


def export_summary(result: ExportResult) -> dict:
    m = result.manifest
    return {"export_id": result.export_id, "out": result.out, "recipe": m["recipe"], "samples": result.n_samples,
            "shards": result.n_shards, "bytes": result.bytes,
            "k_per_grid": {g["name"]: g["k"] for g in m["grids"]}, "uids_only": m["uids_only"]}


def preview_markdown(result: ExportResult) -> str:
    parts = []
    for p in result.previews:
        picture = p["image"] if p["kept"] is None else kept_preview(p["image"], p["kept"], p["grid"])
        kept = "all patches" if p["kept"] is None else f"kept {len(p['kept'])}/{p['grid'][0] * p['grid'][1]}"
        parts.append(f"**{p['sample_id']}** ({kept}; classes: {', '.join(p['classes']) or 'none'})\n\n"
                     f"{p['caption']}\n\n" + png_markdown(picture, p["sample_id"]))
    return "\n\n".join(parts) or "_(uids only: no images in this export)_"


def build_export_assets(settings: JuicerSettings) -> list:
    @asset(partitions_def=recipe_partitions, deps=["training_set"], group_name="export", kinds={"parquet"},
           code_version=export_code_version(settings),
           description="A recipe's training set as WebDataset shards in img2dataset's layout, for open_clip_train "
                       "and DataComp-style tools: images as the governor saw them, the caption the recipe trains "
                       "on, classes, saliency and kept patch indices per sample; sizes.json, uids.npy, "
                       "excluded.parquet and manifest.json per export (a sample filter such as datasieve: "
                       "uids.npy alone). Written atomically under the warehouse's juiced_dataset/<recipe>/.")
    def juiced_dataset(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        recipe = context.partition_key
        wh = storage.warehouse
        request, governor = export_request(settings, storage, recipe)
        out = wh.object_path("juiced_dataset", recipe)
        result = export_training_set(wh, out, request, governor, wh.storage_options, progress=context.log.info)
        record_export(storage, result, context.run.run_id)
        summary = export_summary(result)
        meta = {**{k: v for k, v in summary.items() if k != "k_per_grid"},
                "path": MetadataValue.path(out),
                "k_per_grid": MetadataValue.md(markdown_table([{"grid": g, "k": k}
                                                               for g, k in summary["k_per_grid"].items()])),
                "preview": MetadataValue.md(preview_markdown(result))}
        if not result.manifest["uids_only"]:
            meta["open_clip_train"] = MetadataValue.md(f"```\n{open_clip_train_command(out, result.manifest)}\n```")
        return MaterializeResult(metadata=meta)

    return [juiced_dataset]
