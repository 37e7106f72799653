"""Text branch: rectified, enriched captions, scored against the stored image embeddings."""
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult,
                     MetadataValue, asset)

from ..governance.caption_refiner import (ObjectVocabulary, Refined, RulesRefiner, TransformersRefiner,
                                          caption_version, clean_caption, enrichment_by_class)
from ..governance.classes import AdditionRule
from ..governance.metrics import caption_percentiles, matched_caption_percentile
from ..governance.vision import stored_vectors
from ..models.loader import cached_foundation_model, model_fingerprint
from ..automation.conditions import PER_DROP
from ..settings import ClassSettings, JuicerSettings, code_version
from .asset_lineage import commit_lineage
from .partitions import drops_partitions
from .resources import StorageResource
from .vision import addition_tau, read_governor_record
from .vocabulary import class_vocabulary, vocabulary_fingerprint
from .ui import markdown_table, metadata_table

_PAIRS = 8
# A governor that knows a drop's domain ranks each image's own caption high among the drop's
# captions (the world governor on world drops: well above 0.9); chance is 0.5.
DOMAIN_PERCENTILE = 0.75
SCHEMA = pa.schema([("sample_id", pa.string()), ("raw_caption", pa.string()), ("enriched_caption", pa.string()),
                    ("backend", pa.string()), ("caption_version", pa.string()),
                    ("classes_used", pa.list_(pa.string())),
                    ("fallback_reason", pa.string()), ("sim_before", pa.float32()), ("sim_after", pa.float32()),
                    ("caption_percentile", pa.float32())])
MISALIGNED = "misaligned"  # the fallback reason of a replaced caption


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
           code_version=code_version("enriched_captions-2", cap, fingerprint, model_part, settings.classes,
                                     vocabulary_fingerprint(settings.classes)),
           kinds={"parquet"}, check_specs=[_SIMILARITY_CHECK],
           description="Captions rectified (markup, URLs, file names, boilerplate, casing, typos) and enriched "
                       "with what the image's unclaimed regions show at the addition τ; a caption the "
                       "governor ranks low for its own image is replaced by one of its classes (`replaced`). "
                       "Governor similarity before/after from the stored image embedding (no second image pass).")
    def enriched_captions(context: AssetExecutionContext, storage: StorageResource):
        drop = context.partition_key
        wh = storage.warehouse
        fm = cached_foundation_model(gov.source, gov.device)
        ids, image_emb, captions, classes, regions = _read_inputs(wh, drop)
        cls = settings.classes
        rule = AdditionRule(tuple(class_vocabulary(cls).names), addition_tau(read_governor_record(storage)),
                            cls.caption_claim, cls.k)
        result = enrich_captions(fm, make_refiner(settings), ids, image_emb, captions, classes, gov.batch_size,
                                 lambda sid, named: rule.classes(regions.get(sid, []), named), cap.misaligned_below)
        if result.replaced:
            context.log.info(f"{result.replaced} captions ranked below {cap.misaligned_below} for their own image: "
                             f"replaced by their classes")
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
    caption_percentile: np.ndarray  # per sample, `caption_percentiles` of its rectified caption
    refined: list  # the refiner's results, one per sample
    versions: list[str]  # 'enriched' | 'cleaned' | 'original' | 'replaced'
    sim_before: np.ndarray
    sim_after: np.ndarray
    percentile: float  # how the governor ranks each image's own caption among the drop's (NaN under 2)
    refine_seconds: float
    table: pa.Table
    by_class: list[dict]  # `enrichment_by_class`: per class, extracted / added / already named

    @property
    def replaced(self) -> int:
        return self.versions.count("replaced")

    @property
    def mean_before(self) -> float:
        return float(np.mean(self.sim_before)) if self.ids else 0.0

    @property
    def mean_after(self) -> float:
        return float(np.mean(self.sim_after)) if self.ids else 0.0


def _read_inputs(wh, drop: str) -> tuple[list[str], np.ndarray, dict, dict, dict]:
    """(sample ids in patch_saliency order, their stored image embeddings, caption by id, extracted
    classes by id, region probabilities by id)."""
    emb_table = wh.read_table("patch_saliency", drop, ["sample_id", "embedding"])
    raw = wh.read_table("raw_samples", drop, ["sample_id", "caption"]).to_pydict()
    cls = wh.read_table("extracted_classes", drop, ["sample_id", "classes", "region_probs"]).to_pydict()
    return (emb_table.column("sample_id").to_pylist(), stored_vectors(emb_table, "embedding"),
            dict(zip(raw["sample_id"], raw["caption"])), dict(zip(cls["sample_id"], cls["classes"])),
            dict(zip(cls["sample_id"], cls["region_probs"])))


def misaligned_captions(fm, refiner, before: list[str], image_emb: np.ndarray, below: float,
                        batch_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(which captions belong to another image, each rectified caption's percentile for its own
    image, the rectified captions). A web caption copied from another page ranks, for this image,
    like a random caption of the drop: spread evenly over [0, 1]. One that fits ranks near 1.
    Below `below` it is replaced.
    Only where the governor knows the domain (mean percentile ≥ DOMAIN_PERCENTILE): elsewhere a low
    rank says nothing about the caption. An empty rectified caption is never flagged: there is
    nothing in it to replace."""
    rectified = [clean_caption(c, refiner.vocab) for c in before]
    if len(before) < 2:
        return np.zeros(len(before), dtype=bool), np.full(len(before), np.nan), rectified
    percentile = caption_percentiles(image_emb, fm.encode_text(rectified, batch_size).numpy())
    if not np.nanmean(percentile) >= DOMAIN_PERCENTILE:
        return np.zeros(len(before), dtype=bool), percentile, rectified
    return (percentile < below) & np.array([bool(t) for t in rectified]), percentile, rectified


def enrich_captions(fm, refiner, ids: list[str], image_emb: np.ndarray, captions: dict, classes: dict,
                    batch_size: int, choose_additions, misaligned_below: float = 0.0) -> CaptionEnrichment:
    """Refine each sample's caption with the classes `choose_additions(sample_id, classes the
    rectified caption names)` gives, and score both against its stored image embedding; a caption
    that belongs to another image (`misaligned_captions`) is replaced by one of its classes (it
    names nothing then). `classes`, the extracted ones, are counted in `by_class`."""
    t0 = time.perf_counter()
    before = [captions[s] for s in ids]
    extracted = [classes.get(s, []) for s in ids]
    flagged, caption_pct, rectified = misaligned_captions(fm, refiner, before, image_emb, misaligned_below,
                                                          batch_size)
    additions = [choose_additions(s, set() if f else refiner.vocab.mentioned(r))
                 for s, f, r in zip(ids, flagged, rectified)]
    refined = refiner.refine(["" if f else c for c, f in zip(before, flagged)], additions)
    refined = [Refined(r.text, r.backend, r.classes_used, MISALIGNED) if f else r for r, f in zip(refined, flagged)]
    refine_seconds = time.perf_counter() - t0
    after = [r.text for r in refined]
    versions = ["replaced" if f else caption_version(b, r) for b, r, f in zip(before, refined, flagged)]
    text_before = fm.encode_text(before, batch_size).numpy() if ids else np.zeros((0, 1))
    sim_before = (image_emb * text_before).sum(-1) if ids else np.zeros(0)
    percentile = matched_caption_percentile(image_emb, text_before)
    sim_after = (image_emb * fm.encode_text(after, batch_size).numpy()).sum(-1) if ids else np.zeros(0)
    table = pa.Table.from_pydict({
        "sample_id": ids, "raw_caption": before, "enriched_caption": after,
        "backend": [r.backend for r in refined], "caption_version": versions,
        "classes_used": [r.classes_used for r in refined],
        "fallback_reason": [r.fallback_reason for r in refined],
        "sim_before": sim_before.astype(np.float32), "sim_after": sim_after.astype(np.float32),
        "caption_percentile": caption_pct.astype(np.float32)}, schema=SCHEMA)
    return CaptionEnrichment(ids, before, caption_pct, refined, versions, sim_before, sim_after, percentile,
                             refine_seconds, table,
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
        "replaced_misaligned": r.replaced,
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
