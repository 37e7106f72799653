"""Truth metrics: how well the pipeline's decisions match a world drop's ground truth.

Read only by metrics, tests and `juicer truth` — never by the pipeline's data path. A patch is
an *object patch* when at least `min_cover` of its pixels belong to a true object.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..governance.saliency import METHODS as SALIENCY_METHODS  # the stored saliency columns
from .writers import TRUTH_FILE


def object_patches(row, grid: tuple[int, int], min_cover: float = 0.1) -> np.ndarray:
    """Boolean [grid_h * grid_w]: which patches hold a true object."""
    h, w = int(row["height"]), int(row["width"])
    mask = np.unpackbits(np.frombuffer(row["object_mask"], np.uint8))[: h * w].reshape(h, w)
    gh, gw = grid
    cover = mask[: h - h % gh, : w - w % gw].reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3))
    return (cover >= min_cover).reshape(-1)


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
                   min_cover: float = 0.1) -> pd.DataFrame:
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
    from ..governance.caption_refiner import ObjectVocabulary
    from .vocabulary import load_vocabulary

    if vocab is None:
        v = load_vocabulary()
        vocab = ObjectVocabulary(v.shapes, v.synonyms, v.colour_names)
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
