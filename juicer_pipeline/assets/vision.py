"""Vision branch: the governor, and per drop one FM pass → saliency, kept patches, classes, sieve."""
import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import torch
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from ..automation.conditions import PER_DROP, SHARED
from ..governance.classes import CropPlan, decide_classes, region_class_scores
from ..governance.images import load_rgb
from ..governance.prompts import abstain_embedding, class_embeddings
from ..governance.pruning import keep_top
from ..governance.vision import iter_valid_images, stored_vectors
from ..governance.vocabulary import ClassVocabulary
from ..models.loader import cached_foundation_model, model_fingerprint
from ..settings import ClassSettings, GovernorSettings, JuicerSettings, SaliencySettings, code_version
from ..storage import LineageRow, upsert_model, write_lineage
from ..world.calibration import calibrate_world_governor
from .asset_lineage import asset_version, commit_lineage
from .partitions import drops_partitions
from .patch_saliency import build_patch_saliency
from .resources import StorageResource
from .ui import bar_chart, line_chart, markdown_table, png_markdown, prune_preview
from .vocabulary import class_vocabulary, vocabulary_fingerprint

_PREVIEWS = 4
_CLASSES_SCHEMA = pa.schema([("sample_id", pa.string()), ("classes", pa.list_(pa.string())),
                             ("probs", pa.list_(pa.float32())), ("scores", pa.list_(pa.float32())),
                             ("region_probs", pa.list_(pa.list_(pa.float32()))),
                             ("n_regions", pa.int16())])

_CLASS_EMBEDDINGS: dict[tuple[str, str], torch.Tensor] = {}


def _class_embeddings(fm, vocab: ClassVocabulary) -> torch.Tensor:
    """The vocabulary's prompt-ensembled text embeddings, computed once per model, vocabulary and process."""
    key = (fm.model_id, vocab.fingerprint())
    if key not in _CLASS_EMBEDDINGS:
        _CLASS_EMBEDDINGS[key] = class_embeddings(fm.encode_text, list(vocab.names), vocab.attributes, vocab.templates)
    return _CLASS_EMBEDDINGS[key]


def _crop_plan(cls) -> CropPlan:
    return CropPlan(tuple(cls.region_fractions), cls.max_regions, tuple(cls.crop_margins), cls.turns)


def _abstain_embedding(fm, enabled: bool) -> torch.Tensor | None:
    return abstain_embedding(fm.encode_text) if enabled else None


def read_governor_record(storage: StorageResource) -> dict:
    wh = storage.warehouse
    path = wh.object_path("governor", "governor.json")
    if not wh.exists(path):
        raise FileNotFoundError(f"{path} is missing: materialise the `governor` asset first")
    return json.loads(wh.read_text(path))


def _per_drop_asset(**kwargs):
    """The decorator of a per-drop asset of this branch: partitioned by drop, materialised as drops arrive."""
    return asset(automation_condition=PER_DROP, partitions_def=drops_partitions, group_name="vision", **kwargs)


def build_vision_assets(settings: JuicerSettings) -> list:
    gov, sal, cls = settings.governor, settings.saliency, settings.classes
    fingerprint = model_fingerprint(gov.source)
    load = lambda: cached_foundation_model(gov.source, gov.device)  # noqa: E731
    governor = _governor_asset(gov, cls, fingerprint, load)
    patch_saliency = build_patch_saliency(gov, fingerprint, load)
    return [governor, patch_saliency, _pruned_images_asset(sal, fingerprint, patch_saliency),
            _extracted_classes_asset(gov, cls, fingerprint, load, patch_saliency, governor),
            _sieve_scores_asset(gov, fingerprint, load, patch_saliency)]


# --- governor ---------------------------------------------------------------------------------------

def _governor_asset(gov: GovernorSettings, cls: ClassSettings, fingerprint: str, load):
    @asset(code_version=code_version("governor-3", gov, fingerprint, cls, vocabulary_fingerprint(cls)),
           group_name="vision", kinds={"pytorch", "duckdb"}, automation_condition=SHARED,
           description="The foundation model every stage uses (settings `governor.source`), its held-out "
                       "scores and its calibrated class threshold τ. Catalog row in `models`.")
    def governor(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        fm = load()
        calibration = _calibrate(fm, gov, cls, context.log)
        _record_governor(storage, fm, calibration, LineageRow(
            "governor", None, [f"model:{fm.source}"], context.run.run_id, asset_version(context),
            gov.config_hash(), fm.model_id))
        return MaterializeResult(metadata=_governor_metadata(fm, calibration))

    return governor


def _calibrate(fm, gov: GovernorSettings, cls: ClassSettings, log) -> dict:
    """τ calibrated on the world's labelled validation split, or the fallback τ with the reason."""
    class_emb = _class_embeddings(fm, class_vocabulary(cls))
    # the world's calibration split is labelled with the world's shapes: it calibrates τ for
    # that vocabulary only
    if (gov.source == "world" or gov.source.startswith("file:")) and cls.vocabulary is None:
        log.info("calibrating τ on the world corpus validation split")
        return calibrate_world_governor(fm, class_emb, cls.saliency_method, _crop_plan(cls), cls.target_precision,
                                        cls.k, n_images=cls.calibration_images, batch_size=gov.batch_size,
                                        abstain_emb=_abstain_embedding(fm, cls.abstain),
                                        addition=(cls.caption_false_share, cls.caption_claim))
    return {"calibrated": False, "tau": cls.fallback_tau,
            "reason": "no labelled calibration split for this governor and vocabulary; fallback τ used"}


def addition_tau(record: dict) -> float | tuple[float, ...]:
    """The τ for classes added to captions, one per class (`calibrate_addition_tau`; a record of an
    older calibration holds one for all); the class τ for a governor record without a calibration split."""
    tau = record.get("calibration", {}).get("addition", {}).get("tau", record["tau"])
    return tuple(float(t) for t in tau) if isinstance(tau, list | tuple) else float(tau)


def _record_governor(storage: StorageResource, fm, calibration: dict, lineage: LineageRow) -> None:
    """The catalog's `models` row and lineage (one transaction), then governor.json for the stages."""
    record = {k: v for k, v in fm.info.items() if k not in ("loss_curve",)}

    def register(con):
        upsert_model(con, fm.model_id, "governor", fm.source, fm.info.get("arch", {}), record,
                     calibration["tau"], calibration)
        write_lineage(con, lineage)

    storage.catalog.write(register)
    storage.warehouse.write_bytes(storage.warehouse.object_path("governor", "governor.json"), json.dumps(
        {"model_id": fm.model_id, "source": fm.source, "tau": calibration["tau"], "calibration": calibration},
        indent=1).encode())


def _governor_metadata(fm, calibration: dict) -> dict:
    scores = fm.info.get("scores", {})
    meta = {
        "model_id": fm.model_id, "source": fm.source, "tau": calibration["tau"],
        "calibration": MetadataValue.json(calibration),
        "held_out_scores": MetadataValue.md(markdown_table(
            [{"metric": k, "value": round(v, 4)} for k, v in scores.items() if k != "step"])),
    }
    if fm.info.get("loss_curve"):
        meta["loss_curve"] = MetadataValue.md(png_markdown(line_chart(fm.info["loss_curve"], title="training loss")))
    return meta


# --- pruned_images ----------------------------------------------------------------------------------

def _pruned_images_asset(sal: SaliencySettings, fingerprint: str, patch_saliency):
    @_per_drop_asset(deps=[patch_saliency], code_version=code_version("pruned_images-1", fingerprint, sal),
                     kinds={"parquet"},
                     description="Top ⌈ρ·N⌉ patches per image by the configured saliency method: the kept "
                                 "indices that training feeds to the vision tower.")
    def pruned_images(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        table = wh.read_table("patch_saliency", drop, ["sample_id", "grid_h", "grid_w", sal.method])
        out, scores, kept, n_patches = pruned_table(table, sal.method, sal.rho)
        wh.write_table("pruned_images", drop, out)
        info = read_governor_record(storage)
        commit_lineage(context, storage, [f"patch_saliency/{drop}"], sal.config_hash(), info["model_id"])
        tokens_before, tokens_after = n_patches * len(kept), sum(len(k) for k in kept)
        meta = {"images": len(kept), "rho": sal.rho, "method": sal.method, "tokens_before": tokens_before,
                "tokens_after": tokens_after, "kept_share": round(tokens_after / max(tokens_before, 1), 4)}
        if len(kept):
            meta["preview"] = MetadataValue.md(_previews(wh, drop, table, scores, kept))
        return MaterializeResult(metadata=meta)

    return pruned_images


def pruned_table(table: pa.Table, method: str, rho: float) -> tuple[pa.Table, np.ndarray, list, int]:
    """The top ⌈ρ·N⌉ patches of each image by `method`'s saliency: (the pruned_images table, the
    scores, the kept indices, patches per image)."""
    n_patches = int(table.column("grid_h")[0].as_py() * table.column("grid_w")[0].as_py()) if len(table) else 0
    scores = stored_vectors(table, method, n_patches)
    kept = [keep_top(s, rho) for s in scores]
    out = pa.table({"sample_id": table.column("sample_id"),
                    "n_patches": pa.array([n_patches] * len(kept), pa.int16()),
                    "n_kept": pa.array([len(k) for k in kept], pa.int16()),
                    "kept": pa.array([k.tolist() for k in kept], pa.list_(pa.int16())),
                    "method": pa.array([method] * len(kept)), "rho": pa.array([rho] * len(kept))})
    return out, scores, kept, n_patches


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


# --- extracted_classes ------------------------------------------------------------------------------

def _extracted_classes_asset(gov: GovernorSettings, cls: ClassSettings, fingerprint: str, load, patch_saliency,
                             governor):
    @_per_drop_asset(deps=[patch_saliency, governor], kinds={"pytorch", "parquet"},
                     code_version=code_version("extracted_classes-3", fingerprint, cls, vocabulary_fingerprint(cls)),
                     description="At most k object classes per image with probability ≥ τ (calibrated), from "
                                 "zero-shot classification of crops around connected salient regions (a second, "
                                 "small FM pass); every region's probabilities (`region_probs`), from which "
                                 "enrichment decides what a caption lacks.")
    def extracted_classes(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        fm = load()
        info = read_governor_record(storage)
        tau = float(info["tau"])
        prompts = class_prompts(fm, cls)
        saliency = wh.read_table("patch_saliency", drop, ["sample_id", cls.saliency_method])
        t0 = time.perf_counter()
        rows, crops = classify_drop(fm, wh.parquet_file("raw_samples", drop), saliency, prompts, cls, tau,
                                    gov.batch_size)
        wh.write_table("extracted_classes", drop, pa.Table.from_pylist(rows, schema=_CLASSES_SCHEMA))
        commit_lineage(context, storage, [f"patch_saliency/{drop}", f"raw_samples/{drop}", "governor"],
                       cls.config_hash(), info["model_id"])
        added_at = addition_tau(info)
        if isinstance(added_at, tuple):  # per class: shown by name
            added_at = MetadataValue.json(dict(zip(prompts[0], added_at)))
        return MaterializeResult(metadata=_classes_metadata(rows, (tau, added_at), cls.k, crops,
                                                            time.perf_counter() - t0))

    return extracted_classes


def class_prompts(fm, cls: ClassSettings) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """(the vocabulary's class names, their text embeddings, the abstain embedding or None)."""
    vocab = class_vocabulary(cls)
    return list(vocab.names), _class_embeddings(fm, vocab), _abstain_embedding(fm, cls.abstain)


def classify_drop(fm, raw_path, saliency: pa.Table, prompts: tuple, cls: ClassSettings, tau: float,
                  batch_size: int) -> tuple[list[dict], int]:
    """At most k classes with probability ≥ τ per valid image, from crops around its salient regions,
    with every region's probabilities: (one row per image, crops classified)."""
    names, class_emb, abstain = prompts
    maps = stored_vectors(saliency, cls.saliency_method, fm.grid[0] * fm.grid[1])
    position = {sid: i for i, sid in enumerate(saliency.column("sample_id").to_pylist())}
    rows, crops = [], 0
    for ids, images in iter_valid_images(raw_path, batch_size):
        idx = [position[s] for s in ids]
        scores, regions = region_class_scores(fm, images, maps[idx], fm.grid, class_emb, _crop_plan(cls),
                                              batch_size, abstain)
        crops += sum(len(r) for r in regions) * _crop_plan(cls).views  # one crop per region and view
        for sid, s, r in zip(ids, scores, regions):
            chosen = decide_classes(s, names, cls.k, tau)
            rows.append({"sample_id": sid, "classes": [c for c, _ in chosen], "probs": [p for _, p in chosen],
                         "scores": s.tolist(), "region_probs": r.tolist(), "n_regions": len(r)})
    return rows, crops


def _classes_metadata(rows: list[dict], taus: tuple, k: int, crops: int, seconds: float) -> dict:
    hist = Counter(c for r in rows for c in r["classes"])
    labels = [c for c, _ in hist.most_common()]
    return {
        "images": len(rows), "tau": taus[0], "addition_tau": taus[1], "k": k, "region_crop_forward_passes": crops,

        "images_with_classes": sum(1 for r in rows if r["classes"]),
        "classes_per_image": round(sum(len(r["classes"]) for r in rows) / max(len(rows), 1), 3),
        "seconds": round(seconds, 2),
        "class_histogram": MetadataValue.md(png_markdown(bar_chart(labels, [hist[c] for c in labels],
                                                                   title="extracted classes"))),
        "note": "classes come from a second FM pass over crops of salient regions; the full-image pass "
                "is not repeated"}


# --- sieve_scores -----------------------------------------------------------------------------------

def _sieve_scores_asset(gov: GovernorSettings, fingerprint: str, load, patch_saliency):
    @_per_drop_asset(deps=[patch_saliency, "raw_samples"], code_version=code_version("sieve_scores-1", fingerprint),
                     kinds={"pytorch", "parquet"},
                     description="Governor image-text cosine per sample from the stored image embedding and the "
                                 "caption embedding: the sample-level sieve's (DataSieve baseline) input.")
    def sieve_scores(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        drop = context.partition_key
        wh = storage.warehouse
        fm = load()
        table = wh.read_table("patch_saliency", drop, ["sample_id", "embedding"])
        raw = wh.read_table("raw_samples", drop, ["sample_id", "caption", "status"])
        ids, cos = sieve_cosines(fm, table, raw, gov.batch_size)
        wh.write_table("sieve_scores", drop, pa.table({"sample_id": ids, "sieve_score": pa.array(cos, pa.float32())}))
        info = read_governor_record(storage)
        commit_lineage(context, storage, [f"patch_saliency/{drop}", f"raw_samples/{drop}"], gov.config_hash(),
                       info["model_id"])
        q = np.quantile(cos, [0.1, 0.5, 0.9]).round(4).tolist() if len(cos) else []
        return MaterializeResult(metadata={"samples": len(ids), "mean_cosine": float(np.mean(cos)) if len(cos) else 0.0,
                                           "cosine_p10_p50_p90": str(q)})

    return sieve_scores


def sieve_cosines(fm, saliency: pa.Table, raw: pa.Table, batch_size: int) -> tuple[list[str], np.ndarray]:
    """(sample ids, cosine of each stored image embedding with its caption's embedding)."""
    emb = stored_vectors(saliency, "embedding")
    captions = dict(zip(raw.column("sample_id").to_pylist(), raw.column("caption").to_pylist()))
    ids = saliency.column("sample_id").to_pylist()
    text = fm.encode_text([captions[s] for s in ids], batch_size).numpy()
    cos = (emb * text).sum(-1) if len(ids) else np.zeros(0, np.float32)
    return ids, cos
