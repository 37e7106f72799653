"""Text branch: rectified, enriched captions, scored against the stored image embeddings."""
import time
from collections import Counter

import numpy as np
import pyarrow as pa
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult,
                     MetadataValue, asset)

from ..governance.caption_refiner import ObjectVocabulary, RulesRefiner, TransformersRefiner, caption_version
from ..governance.metrics import matched_caption_percentile
from ..governance.vision import stored_vectors
from ..models.loader import cached_foundation_model, model_fingerprint
from ..automation.conditions import PER_DROP
from ..settings import ClassSettings, JuicerSettings, code_version
from ..storage import LineageRow, lineage_op
from .partitions import drops_partitions
from .resources import StorageResource
from .vocabulary import class_vocabulary, vocabulary_fingerprint
from .ui import markdown_table

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


def build_text_assets(settings: JuicerSettings) -> list:
    gov, cap = settings.governor, settings.captions
    fingerprint = model_fingerprint(gov.source)
    model_part = model_fingerprint(f"file:{cap.model_path}") if cap.backend == "transformers" else "rules"

    @asset(automation_condition=PER_DROP, partitions_def=drops_partitions, deps=["raw_samples", "extracted_classes", "patch_saliency"],
           group_name="text", code_version=code_version("enriched_captions-1", cap, fingerprint, model_part,
                                                     vocabulary_fingerprint(settings.classes)),
           kinds={"parquet"},
           check_specs=[AssetCheckSpec("similarity_not_worse", asset="enriched_captions",
                                       description="Mean governor image-text similarity after enrichment ≥ before. "
                                                   "It means something only where the governor knows the drop's "
                                                   "domain: when the governor ranks the drop's own captions no "
                                                   f"better than a percentile of {DOMAIN_PERCENTILE} among the "
                                                   "drop's other captions (e.g. the world governor on real photos), "
                                                   "a failure is a warning, not an error.")],
           description="Captions rectified (markup, URLs, file names, boilerplate, casing, typos) and enriched "
                       "with the extracted classes; governor similarity before/after from the stored image "
                       "embedding (no second image pass).")
    def enriched_captions(context: AssetExecutionContext, storage: StorageResource):
        drop = context.partition_key
        wh = storage.warehouse
        fm = cached_foundation_model(gov.source, gov.device)
        emb_table = wh.read_table("patch_saliency", drop, ["sample_id", "embedding"])
        ids = emb_table.column("sample_id").to_pylist()
        image_emb = stored_vectors(emb_table, "embedding")
        raw = wh.read_table("raw_samples", drop, ["sample_id", "caption"]).to_pydict()
        captions = dict(zip(raw["sample_id"], raw["caption"]))
        cls = wh.read_table("extracted_classes", drop, ["sample_id", "classes"]).to_pydict()
        classes = dict(zip(cls["sample_id"], cls["classes"]))
        refiner = make_refiner(settings)
        t0 = time.perf_counter()
        before = [captions[s] for s in ids]
        refined = refiner.refine(before, [classes.get(s, []) for s in ids])
        refine_seconds = time.perf_counter() - t0
        after = [r.text for r in refined]
        versions = [caption_version(b, r) for b, r in zip(before, refined)]
        text_before = fm.encode_text(before, gov.batch_size).numpy() if ids else np.zeros((0, 1))
        sim_before = (image_emb * text_before).sum(-1) if ids else np.zeros(0)
        percentile = matched_caption_percentile(image_emb, text_before)
        sim_after = (image_emb * fm.encode_text(after, gov.batch_size).numpy()).sum(-1) if ids else np.zeros(0)
        table = pa.Table.from_pydict({
            "sample_id": ids, "raw_caption": before, "enriched_caption": after,
            "backend": [r.backend for r in refined], "caption_version": versions,
            "classes_used": [r.classes_used for r in refined],
            "fallback_reason": [r.fallback_reason for r in refined],
            "sim_before": sim_before.astype(np.float32), "sim_after": sim_after.astype(np.float32)}, schema=SCHEMA)
        version = context.assets_def.code_versions_by_key[context.asset_key]
        path = wh.write_table("enriched_captions", drop, table)
        storage.commit([lineage_op(LineageRow(
            "enriched_captions", drop, [f"raw_samples/{drop}", f"extracted_classes/{drop}", f"patch_saliency/{drop}"],
            context.run.run_id, version, cap.config_hash(), fm.model_id))])
        mean_before = float(np.mean(sim_before)) if ids else 0.0
        mean_after = float(np.mean(sim_after)) if ids else 0.0
        fallbacks = Counter(r.fallback_reason for r in refined if r.fallback_reason)
        # the table shows enriched captions first: the ones where visual evidence reached the text
        order = sorted(range(len(ids)), key=lambda i: (versions[i] != "enriched", i))[:_PAIRS]
        pairs = [{"sample_id": ids[i], "version": versions[i], "added": ", ".join(refined[i].classes_used),
                  "before": before[i], "after": after[i]} for i in order]
        yield MaterializeResult(metadata={
            "captions": len(ids), "backend": cap.backend, "mean_similarity_before": round(mean_before, 4),
            "mean_similarity_after": round(mean_after, 4), "enriched": versions.count("enriched"),
            "cleaned": versions.count("cleaned"), "original": versions.count("original"),
            "classes_added": sum(len(r.classes_used) for r in refined),
            "captions_per_second": round(len(ids) / max(refine_seconds, 1e-9), 1),
            "fallbacks_by_reason": MetadataValue.md(markdown_table(
                [{"reason": k, "count": v} for k, v in fallbacks.most_common()])),
            "before_after": MetadataValue.md(markdown_table(pairs, max_chars=120)), "path": MetadataValue.path(str(path))})
        worse = [s for s, b, a in zip(ids, sim_before, sim_after) if a < b]
        knows_domain = bool(percentile >= DOMAIN_PERCENTILE)  # NaN (under 2 samples): not known
        yield AssetCheckResult(check_name="similarity_not_worse", passed=bool(mean_after >= mean_before),
                               severity=AssetCheckSeverity.ERROR if knows_domain else AssetCheckSeverity.WARN,
                               metadata={"mean_before": mean_before, "mean_after": mean_after,
                                         "samples_worse": len(worse), "examples_worse": ", ".join(worse[:10]),
                                         "matched_caption_percentile": round(percentile, 4),
                                         "governor_knows_domain": knows_domain})

    return [enriched_captions]
