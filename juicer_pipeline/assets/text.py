"""Text branch: rectified, enriched captions, scored against the stored image embeddings."""
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult,
                     MetadataValue, asset)

from ..governance.caption_refiner import (ObjectVocabulary, RulesRefiner, TransformersRefiner, caption_version,
                                          enrichment_by_class)
from ..governance.metrics import matched_caption_percentile
from ..governance.vision import stored_vectors
from ..models.loader import cached_foundation_model, model_fingerprint
from ..automation.conditions import PER_DROP
from ..settings import ClassSettings, JuicerSettings, code_version
from .asset_lineage import commit_lineage
from .partitions import drops_partitions
from .resources import StorageResource
from .vocabulary import class_vocabulary, vocabulary_fingerprint
from .ui import markdown_table, metadata_table

_PAIRS = 8
# A governor that knows a drop's domain ranks each image's own caption high among the drop's
# captions (the world governor on world drops: well above 0.9); chance is 0.5.
DOMAIN_PERCENTILE = 0.75
SCHEMA = pa.schema([("sample_id", pa.string()), ("raw_caption", pa.string()), ("enriched_caption", pa.string()),
                    ("backend", pa.string()), ("caption_version", pa.string()),
                    ("classes_used", pa.list_(pa.string())),
                    ("fallback_reason", pa.string()), ("sim_before", pa.float32()), ("sim_after", pa.float32())])


def object_vocabulary(cls: ClassSettings) -> ObjectVocabulary:
    vocab = class_vocabulary(cls)
    return ObjectVocabulary(vocab.names, vocab.synonyms, vocab.attributes)


def make_refiner(settings: JuicerSettings):
    cap = settings.captions
    if cap.backend == "transformers":
        return TransformersRefiner(cap.model_path, object_vocabulary(settings.classes), cap.batch_size,
                                   cap.max_new_tokens, settings.governor.device)
    return RulesRefiner(object_vocabulary(settings.classes))


_SIMILARITY_CHECK = AssetCheckSpec(
    "similarity_not_worse", asset="enriched_captions",
    description="Mean governor image-text similarity after enrichment ≥ before. It means something only where the "
                "governor knows the drop's domain: when the governor ranks the drop's own captions no better than "
                f"a percentile of {DOMAIN_PERCENTILE} among the drop's other captions (e.g. the world governor on "
                "real photos), a failure is a warning, not an error.")


def build_text_assets(settings: JuicerSettings) -> list:
    gov, cap = settings.governor, settings.captions
    fingerprint = model_fingerprint(gov.source)
    model_part = model_fingerprint(f"file:{cap.model_path}") if cap.backend == "transformers" else "rules"

    @asset(automation_condition=PER_DROP, partitions_def=drops_partitions,
           deps=["raw_samples", "extracted_classes", "patch_saliency"], group_name="text",
           code_version=code_version("enriched_captions-1", cap, fingerprint, model_part,
                                     vocabulary_fingerprint(settings.classes)),
           kinds={"parquet"}, check_specs=[_SIMILARITY_CHECK],
           description="Captions rectified (markup, URLs, file names, boilerplate, casing, typos) and enriched "
                       "with the extracted classes; governor similarity before/after from the stored image "
                       "embedding (no second image pass).")
    def enriched_captions(context: AssetExecutionContext, storage: StorageResource):
        drop = context.partition_key
        wh = storage.warehouse
        fm = cached_foundation_model(gov.source, gov.device)
        ids, image_emb, captions, classes = _read_inputs(wh, drop)
        result = enrich_captions(fm, make_refiner(settings), ids, image_emb, captions, classes, gov.batch_size)
        path = wh.write_table("enriched_captions", drop, result.table)
        commit_lineage(context, storage, [f"raw_samples/{drop}", f"extracted_classes/{drop}", f"patch_saliency/{drop}"],
                       cap.config_hash(), fm.model_id)
        yield MaterializeResult(metadata={**_caption_metadata(result, cap.backend),
                                          "path": MetadataValue.path(str(path))})
        yield _similarity_check(result)

    return [enriched_captions]


@dataclass
class CaptionEnrichment:
    """A drop's captions before and after the refiner, and their similarity to the stored images."""
    ids: list[str]
    before: list[str]
    refined: list  # the refiner's results, one per sample
    versions: list[str]  # 'enriched' | 'cleaned' | 'original'
    sim_before: np.ndarray
    sim_after: np.ndarray
    percentile: float  # how the governor ranks each image's own caption among the drop's (NaN under 2)
    refine_seconds: float
    table: pa.Table
    by_class: list[dict]  # `enrichment_by_class`: per class, extracted / added / already named

    @property
    def mean_before(self) -> float:
        return float(np.mean(self.sim_before)) if self.ids else 0.0

    @property
    def mean_after(self) -> float:
        return float(np.mean(self.sim_after)) if self.ids else 0.0


def _read_inputs(wh, drop: str) -> tuple[list[str], np.ndarray, dict, dict]:
    """(sample ids in patch_saliency order, their stored image embeddings, caption by id, classes by id)."""
    emb_table = wh.read_table("patch_saliency", drop, ["sample_id", "embedding"])
    raw = wh.read_table("raw_samples", drop, ["sample_id", "caption"]).to_pydict()
    cls = wh.read_table("extracted_classes", drop, ["sample_id", "classes"]).to_pydict()
    return (emb_table.column("sample_id").to_pylist(), stored_vectors(emb_table, "embedding"),
            dict(zip(raw["sample_id"], raw["caption"])), dict(zip(cls["sample_id"], cls["classes"])))


def enrich_captions(fm, refiner, ids: list[str], image_emb: np.ndarray, captions: dict, classes: dict,
                    batch_size: int) -> CaptionEnrichment:
    """Refine each sample's caption with its classes and score both against its stored image embedding."""
    t0 = time.perf_counter()
    before = [captions[s] for s in ids]
    extracted = [classes.get(s, []) for s in ids]
    refined = refiner.refine(before, extracted)
    refine_seconds = time.perf_counter() - t0
    after = [r.text for r in refined]
    versions = [caption_version(b, r) for b, r in zip(before, refined)]
    text_before = fm.encode_text(before, batch_size).numpy() if ids else np.zeros((0, 1))
    sim_before = (image_emb * text_before).sum(-1) if ids else np.zeros(0)
    percentile = matched_caption_percentile(image_emb, text_before)
    sim_after = (image_emb * fm.encode_text(after, batch_size).numpy()).sum(-1) if ids else np.zeros(0)
    table = pa.Table.from_pydict({
        "sample_id": ids, "raw_caption": before, "enriched_caption": after,
        "backend": [r.backend for r in refined], "caption_version": versions,
        "classes_used": [r.classes_used for r in refined],
        "fallback_reason": [r.fallback_reason for r in refined],
        "sim_before": sim_before.astype(np.float32), "sim_after": sim_after.astype(np.float32)}, schema=SCHEMA)
    return CaptionEnrichment(ids, before, refined, versions, sim_before, sim_after, percentile, refine_seconds, table,
                             enrichment_by_class(extracted, refined, refiner.vocab))


def _caption_metadata(r: CaptionEnrichment, backend: str) -> dict:
    fallbacks = Counter(x.fallback_reason for x in r.refined if x.fallback_reason)
    # the table shows enriched captions first: the ones where visual evidence reached the text
    order = sorted(range(len(r.ids)), key=lambda i: (r.versions[i] != "enriched", i))[:_PAIRS]
    pairs = [{"sample_id": r.ids[i], "version": r.versions[i], "added": ", ".join(r.refined[i].classes_used),
              "before": r.before[i], "after": r.refined[i].text} for i in order]
    return {
        "captions": len(r.ids), "backend": backend, "mean_similarity_before": round(r.mean_before, 4),
        "mean_similarity_after": round(r.mean_after, 4), "enriched": r.versions.count("enriched"),
        "cleaned": r.versions.count("cleaned"), "original": r.versions.count("original"),
        "classes_added": sum(len(x.classes_used) for x in r.refined),
        # counts only: whether an added class is in the image is the truth report's (world drops only)
        "enrichment_by_class": metadata_table(r.by_class),
        "captions_per_second": round(len(r.ids) / max(r.refine_seconds, 1e-9), 1),
        "fallbacks_by_reason": MetadataValue.md(markdown_table(
            [{"reason": k, "count": v} for k, v in fallbacks.most_common()])),
        "before_after": MetadataValue.md(markdown_table(pairs, max_chars=120))}


def _similarity_check(r: CaptionEnrichment) -> AssetCheckResult:
    worse = [s for s, b, a in zip(r.ids, r.sim_before, r.sim_after) if a < b]
    knows_domain = bool(r.percentile >= DOMAIN_PERCENTILE)  # NaN (under 2 samples): not known
    return AssetCheckResult(check_name="similarity_not_worse", passed=bool(r.mean_after >= r.mean_before),
                            severity=AssetCheckSeverity.ERROR if knows_domain else AssetCheckSeverity.WARN,
                            metadata={"mean_before": r.mean_before, "mean_after": r.mean_after,
                                      "samples_worse": len(worse), "examples_worse": ", ".join(worse[:10]),
                                      "matched_caption_percentile": round(r.percentile, 4),
                                      "governor_knows_domain": knows_domain})
