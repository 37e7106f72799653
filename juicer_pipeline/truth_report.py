"""`juicer truth`: how a juiced world drop compares with the world's ground truth.

Only this report and the tests read `_truth.parquet`; the pipeline never does.
"""
from __future__ import annotations

import json
from pathlib import Path

from .storage import Warehouse


def truth_report(wh: Warehouse, drop: str, rho: float, settings=None) -> str:
    from .world.truth_metrics import class_table, saliency_table

    drop_dir = wh.drops_dir / drop
    if not (drop_dir / "_truth.parquet").exists():
        raise FileNotFoundError(f"{drop_dir} has no _truth.parquet: truth metrics exist for world drops only")
    table = saliency_table(drop_dir, wh.partition_path("patch_saliency", drop), drop, rho)
    lines = [f"saliency vs truth on {drop} (ρ={rho}, {int(table.images[0])} images):",
             table.drop(columns=["images"]).to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    classes_path = wh.partition_path("extracted_classes", drop)
    if wh.exists(classes_path):
        c = class_table(drop_dir, classes_path, drop)
        lines.append(f"classes vs truth: precision {c['precision']:.3f}, recall {c['recall']:.3f} "
                     f"({c['true_positives']} correct, {c['false_positives']} wrong, {c['missed']} missed)")
        lines.append(_pooled_baseline_line(wh, drop_dir, drop, settings))
    captions_path = wh.partition_path("enriched_captions", drop)
    if wh.exists(captions_path):
        lines += _caption_lines(drop_dir, captions_path, drop)
    return "\n".join(lines)


def _fmt(df) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def _caption_lines(drop_dir: Path, captions_path: Path, drop: str) -> list[str]:
    """Captions against truth: object coverage, what enrichment added per class, what rectification repaired."""
    from .world.truth_metrics import caption_table, enrichment_table, rectification_table

    t = caption_table(drop_dir, captions_path, drop)
    lines = [f"captions mentioning every true object: {t['all_objects_mentioned_before']:.3f} before, "
             f"{t['all_objects_mentioned_after']:.3f} after enrichment; mentioning an object not in the "
             f"image: {t['foreign_object_before']:.3f} before, {t['foreign_object_after']:.3f} after",
             "enrichment vs truth, captions per class: added_true / added_false = it was added and is / is not "
             "in the image;",
             "  missed = in the image, named by neither caption nor enrichment; lacking = added_true + missed;",
             "  precision = added_true / added; filled = added_true / lacking; "
             "false_rate = added_false / captions whose image lacks it",
             _fmt(enrichment_table(drop_dir, captions_path, drop))]
    r = rectification_table(drop_dir, captions_path, drop)
    if r is None:
        return lines + ["rectification vs truth: this drop's truth has no caption stages (regenerate it)"]
    lines += ["rectification vs truth, share of each caption damage repaired; noise: every word of the undamaged "
              "caption back,",
              "  cased as there, one final stop; boilerplate: none of its words left and no intact word lost;",
              "  omitted_object: the lost class named after enrichment; misaligned: exactly the true classes named;",
              "  empty_caption: every true class named",
              _fmt(r["kinds"]) if len(r["kinds"]) else "  (no damaged captions)",
              f"clean captions changed by rectification: {r['clean_changed']} of {r['clean']} "
              f"({r['clean_changed_share']:.3f}; it must not damage them)"]
    lines += [f"  changed: {raw!r} -> {rect!r}" for raw, rect in r["examples"]]
    return lines


def _pooled_baseline_line(wh: Warehouse, drop_dir: Path, drop: str, settings=None) -> str:
    """Region crops (the pipeline's choice) vs the pooled-embedding alternative, same τ and k."""
    from .assets.vocabulary import class_vocabulary
    from .governance.classes import model_temperature
    from .governance.prompts import class_embeddings
    from .models.loader import cached_foundation_model
    from .settings import load_settings
    from .world.truth_metrics import pooled_class_baseline

    settings = settings or load_settings(data_dir=wh.root)
    record = json.loads(wh.read_text(wh.object_path("governor", "governor.json")))
    fm = cached_foundation_model(settings.governor.source, settings.governor.device)
    vocab = class_vocabulary(settings.classes)
    classes = class_embeddings(fm.encode_text, list(vocab.names), vocab.attributes, vocab.templates)
    b = pooled_class_baseline(drop_dir, wh.partition_path("patch_saliency", drop), drop, classes,
                              list(vocab.names), record["tau"], settings.classes.k, model_temperature(fm))
    return (f"  pooled-embedding alternative at the same τ={record['tau']:.2f}: precision {b['precision']:.3f}, "
            f"recall {b['recall']:.3f}")
