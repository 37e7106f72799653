"""Truth metrics: how well the pipeline's decisions match a world drop's ground truth.

Read only by metrics, tests and `juicer truth` — never by the pipeline's data path. A patch is
an *object patch* when at least `min_cover` of its pixels belong to a true object.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..governance.saliency import METHODS as SALIENCY_METHODS  # the stored saliency columns
from .captions import NOISE_KINDS
from .scenes import OBJECT_PATCH_COVER, patch_coverage
from .writers import TRUTH_FILE


def object_patches(row, grid: tuple[int, int], min_cover: float = OBJECT_PATCH_COVER) -> np.ndarray:
    """Boolean [grid_h * grid_w]: which patches hold a true object."""
    h, w = int(row["height"]), int(row["width"])
    mask = np.unpackbits(np.frombuffer(row["object_mask"], np.uint8))[: h * w].reshape(h, w)
    return patch_coverage(mask, grid) >= min_cover


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC via the rank statistic (ties get average ranks)."""
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank().to_numpy()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def load_truth(drop_dir: Path, drop_id: str) -> pd.DataFrame:
    truth = pd.read_parquet(Path(drop_dir) / TRUTH_FILE)
    truth["sample_id"] = drop_id + "/" + truth["sample_id"]
    return truth.set_index("sample_id")


def saliency_table(drop_dir: Path, saliency_parquet: Path, drop_id: str, rho: float, seed: int = 0,
                   min_cover: float = OBJECT_PATCH_COVER) -> pd.DataFrame:
    """Per method (and random at the same ρ): object-patch recall and precision of the kept
    patches, ROC-AUC of saliency as an object score, and the recall ceiling at this ρ."""
    from ..governance.pruning import keep_random, keep_top

    truth = load_truth(drop_dir, drop_id)
    sal = pq.read_table(saliency_parquet).to_pandas()
    sal = sal[sal.sample_id.isin(truth.index)]
    rng = np.random.default_rng(seed)
    stats = {m: {"kept_obj": 0, "kept": 0, "scores": [], "labels": []} for m in (*SALIENCY_METHODS, "random")}
    total_obj = ceiling = 0
    for row in sal.itertuples():
        grid = (int(row.grid_h), int(row.grid_w))
        labels = object_patches(truth.loc[row.sample_id], grid, min_cover)
        total_obj += labels.sum()
        n = labels.size
        k = len(keep_top(np.zeros(n), rho))
        ceiling += min(k, labels.sum())
        for m in stats:
            if m == "random":
                kept, scores = keep_random(n, rho, rng), rng.random(n)
            else:
                scores = np.asarray(getattr(row, m), dtype=np.float64)
                kept = keep_top(scores, rho)
            stats[m]["kept_obj"] += labels[kept].sum()
            stats[m]["kept"] += len(kept)
            stats[m]["scores"].append(scores)
            stats[m]["labels"].append(labels)
    rows = []
    for m, s in stats.items():
        rows.append({"method": m, "rho": rho, "object_patch_recall": s["kept_obj"] / max(total_obj, 1),
                     "kept_precision": s["kept_obj"] / max(s["kept"], 1),
                     "roc_auc": _auc(np.concatenate(s["scores"]), np.concatenate(s["labels"])) if s["scores"] else float("nan"),
                     "recall_ceiling": ceiling / max(total_obj, 1), "images": len(sal)})
    return pd.DataFrame(rows)


def class_table(drop_dir: Path, classes_parquet: Path, drop_id: str) -> dict:
    """Micro precision and recall of extracted classes against the true object classes."""
    truth = load_truth(drop_dir, drop_id)
    got = pq.read_table(classes_parquet, columns=["sample_id", "classes"]).to_pandas()
    tp = fp = fn = 0
    for row in got.itertuples():
        if row.sample_id not in truth.index:
            continue
        true, pred = set(truth.loc[row.sample_id, "classes"]), set(row.classes)
        tp, fp, fn = tp + len(pred & true), fp + len(pred - true), fn + len(true - pred)
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "true_positives": tp,
            "false_positives": fp, "missed": fn, "images": len(got)}


def caption_table(drop_dir: Path, captions_parquet: Path, drop_id: str, vocab=None) -> dict:
    """Share of captions that mention every true object (class), before and after enrichment,
    and share of enriched captions that mention a class not in the image."""
    vocab = world_object_vocabulary(vocab)
    truth = load_truth(drop_dir, drop_id)
    caps = pq.read_table(captions_parquet, columns=["sample_id", "raw_caption", "enriched_caption"]).to_pandas()
    caps = caps[caps.sample_id.isin(truth.index)]
    full_before = full_after = hallucinated_after = hallucinated_before = 0
    for row in caps.itertuples():
        true = set(truth.loc[row.sample_id, "classes"])
        before, after = vocab.mentioned(row.raw_caption), vocab.mentioned(row.enriched_caption)
        full_before += true <= before
        full_after += true <= after
        hallucinated_before += bool(before - true)
        hallucinated_after += bool(after - true)
    n = max(len(caps), 1)
    return {"captions": len(caps), "all_objects_mentioned_before": full_before / n,
            "all_objects_mentioned_after": full_after / n, "foreign_object_before": hallucinated_before / n,
            "foreign_object_after": hallucinated_after / n}


def pooled_class_baseline(drop_dir: Path, saliency_parquet: Path, drop_id: str, class_emb, names: list[str],
                          tau: float, k: int = 3, scale: float = 100.0) -> dict:
    """The one-embedding alternative to region crops: zero-shot softmax of the stored pooled image
    embedding, same k and τ, scored against truth like `class_table`."""
    import torch

    from ..governance.classes import decide_classes, zero_shot_probs

    truth = load_truth(drop_dir, drop_id)
    table = pq.read_table(saliency_parquet, columns=["sample_id", "embedding"]).to_pandas()
    table = table[table.sample_id.isin(truth.index)]
    emb = torch.tensor(np.stack(table.embedding.to_numpy()))
    probs = zero_shot_probs(emb, class_emb, scale).numpy()
    tp = fp = fn = 0
    for sid, p in zip(table.sample_id, probs):
        pred = {c for c, _ in decide_classes(p, names, k, tau)}
        true = set(truth.loc[sid, "classes"])
        tp, fp, fn = tp + len(pred & true), fp + len(pred - true), fn + len(true - pred)
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "images": len(table)}


def world_object_vocabulary(vocab=None):
    """`vocab`, or the world's shapes with their synonyms and colours as the caption refiner names them."""
    from ..governance.caption_refiner import ObjectVocabulary
    from .vocabulary import load_vocabulary

    if vocab is not None:
        return vocab
    v = load_vocabulary()
    return ObjectVocabulary(v.shapes, v.synonyms, v.colour_names)


def _read_captions(captions_parquet: Path, truth: pd.DataFrame) -> pd.DataFrame:
    caps = pq.read_table(captions_parquet, columns=["sample_id", "raw_caption", "enriched_caption",
                                                     "classes_used"]).to_pandas()
    return caps[caps.sample_id.isin(truth.index)]


def enrichment_table(drop_dir: Path, captions_parquet: Path, drop_id: str, vocab=None) -> pd.DataFrame:
    """Per true or added class, and a `total` row, what enrichment did against the truth:
    `added_true` / `added_false`: captions it added the class to whose image holds / lacks it;
    `missed`: captions whose image holds it and whose enriched caption still does not name it;
    `lacking` = added_true + missed: captions whose rectified caption did not name it.
    Rates: `precision` = added_true / added, `filled` = added_true / lacking, `false_rate` =
    added_false / captions whose image lacks it (the class's share of foreign objects)."""
    vocab = world_object_vocabulary(vocab)
    truth = load_truth(drop_dir, drop_id)
    caps = _read_captions(captions_parquet, truth)
    keys = ("in_images", "added_true", "added_false", "missed")
    counts: dict[str, dict] = {}
    for row in caps.itertuples():
        true, added = set(truth.loc[row.sample_id, "classes"]), set(row.classes_used)
        missed = true - vocab.mentioned(row.enriched_caption)
        for key, names in zip(keys, (true, added & true, added - true, missed)):
            for c in names:
                counts.setdefault(c, dict.fromkeys(keys, 0))[key] += 1
    rows = [{"class": c, **v} for c, v in sorted(counts.items())]
    rows.append({"class": "total", **{k: sum(r[k] for r in rows) for k in keys}})
    out = pd.DataFrame(rows, columns=["class", *keys])
    out.insert(2, "lacking", out.added_true + out.missed)
    out["precision"] = out.added_true / (out.added_true + out.added_false).where(lambda s: s > 0)
    out["filled"] = out.added_true / out.lacking.where(lambda s: s > 0)
    # the total row's denominator is every (caption, class not in its image) pair
    without = (len(caps) - out.in_images).where(out["class"] != "total", len(caps) * (len(out) - 1) - out.in_images)
    out["false_rate"] = out.added_false / without.where(lambda s: s > 0)
    return out


_WORD = re.compile(r"[A-Za-z0-9]+")
_PUNCT_RUN = re.compile(r"[!?.,;:](?:\s*[!?.,;:])+")
# Damage to the caption text, scored on the rectified caption; `duplicate` and `broken:*` are
# image damage, not caption damage.
_NOT_CAPTION = ("duplicate", "broken:")


def _contains_words(text: str, other: str) -> bool:
    """Every word of `other`, as often and cased as there, is in `text`."""
    return not Counter(_WORD.findall(other)) - Counter(_WORD.findall(text))


def _repaired(kind: str, rect: str, enriched: str, t, true: set[str], vocab) -> bool | None:
    """Whether rectification (and, for lost objects, enrichment) undid one damage; None when the
    damage left nothing to repair. `t` is the sample's truth row with the caption stages."""
    content, before_bp = t["caption_content"], t["caption_before_boilerplate"]
    if kind.startswith("noise:"):
        # every word of the caption before the noise, spelled and cased as there, one final stop
        return _contains_words(rect, content) and rect.endswith(".") and not _PUNCT_RUN.search(rect)
    if kind == "boilerplate":
        if t["caption"] == before_bp:
            return None  # both of its draws (prefix, suffix) came out empty
        # none of its words left, and no word that was intact before it removed with it
        # (a word the noise broke is the noise's to repair)
        low = lambda text: Counter(w.lower() for w in _WORD.findall(text))  # noqa: E731
        added = set(low(t["caption"])) - set(low(before_bp))
        intact = low(content) & low(before_bp)
        return not added & set(low(rect)) and not intact - low(rect)
    named = vocab.mentioned(enriched)
    if kind == "omitted_object":
        lost = true - vocab.mentioned(content)  # None: another object of the same class still named it
        return (lost <= named) if lost else None
    if kind == "misaligned":
        return named == true
    if kind == "empty_caption":
        return true <= named
    return None


_KIND_ORDER = (*(f"noise:{k}" for k in NOISE_KINDS), "boilerplate", "omitted_object", "misaligned", "empty_caption")


def rectification_table(drop_dir: Path, captions_parquet: Path, drop_id: str, vocab=None) -> dict | None:
    """Per caption damage the world applied: captions that carry it and the share repaired (see
    `_repaired`); and clean captions (no damage) whose rectified text differs from the web
    caption at all: damage done by rectification itself. The rectified text is the enriched
    caption without its enrichment phrase (`strip_enrichment`). None for a drop written before
    the truth recorded caption stages."""
    from ..governance.caption_refiner import strip_enrichment

    vocab = world_object_vocabulary(vocab)
    truth = load_truth(drop_dir, drop_id)
    if "caption_content" not in truth.columns:
        return None
    caps = _read_captions(captions_parquet, truth)
    done: dict[str, list[bool]] = {}
    clean = changed = 0
    examples: list[tuple[str, str]] = []
    for row in caps.itertuples():
        t = truth.loc[row.sample_id]
        rect = strip_enrichment(row.enriched_caption, list(row.classes_used))
        kinds = [k for k in t["corruptions"] if not k.startswith(_NOT_CAPTION)]
        if "empty_caption" in kinds:
            kinds = ["empty_caption"]  # it replaced the text: the earlier damage is gone with it
        if not kinds:
            clean += 1
            if rect != row.raw_caption:
                changed += 1
                examples.append((row.raw_caption, rect))
        for k in kinds:
            r = _repaired(k, rect, row.enriched_caption, t, set(t["classes"]), vocab)
            if r is not None:
                done.setdefault(k, []).append(bool(r))
    order = sorted(done, key=lambda k: (_KIND_ORDER.index(k) if k in _KIND_ORDER else len(_KIND_ORDER), k))
    kinds_df = pd.DataFrame([{"damage": k, "captions": len(done[k]), "repaired": sum(done[k]),
                              "share": sum(done[k]) / len(done[k])} for k in order],
                            columns=["damage", "captions", "repaired", "share"])
    return {"kinds": kinds_df, "clean": clean, "clean_changed": changed,
            "clean_changed_share": changed / clean if clean else float("nan"), "examples": examples[:3]}
