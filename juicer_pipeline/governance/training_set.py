"""Assembling a recipe's training set from every juiced drop, and why each sample is out."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .near_duplicates import near_duplicates
from .recipes import Recipe


def assemble_training_set(recipe: Recipe, samples: pd.DataFrame, eval_hashes: set[str],
                          sieve_fraction: float, eval_prints: list[bytes] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(members, excluded) for one recipe.

    `samples`: one row per ingested sample of every drop, with columns sample_id, drop_id,
    content_hash, status, caption, enriched_caption, enriched_version (what enrichment did:
    original | cleaned | enriched), kept (list or None), sieve_score, and optionally thumbprint.
    Members carry the caption and kept-patch set the recipe trains on; excluded rows say why a
    sample is out: quarantined, held_out (its image is an evaluation image: the same bytes, or a
    near-duplicate of one of `eval_prints`, e.g. re-encoded or resized), duplicate (same bytes as
    an earlier valid sample), missing_juice (a stage output is missing) or sieved_out.
    """
    df = samples.sort_values(["drop_id", "sample_id"]).reset_index(drop=True)
    reason = pd.Series(None, index=df.index, dtype=object)
    reason[df.status != "valid"] = "quarantined"
    reason[reason.isna() & df.content_hash.isin(eval_hashes)] = "held_out"
    if eval_prints and "thumbprint" in df:
        prints = [bytes(p) if isinstance(p, (bytes, bytearray, memoryview)) else None for p in df.thumbprint]
        reason[reason.isna() & near_duplicates(prints, eval_prints)] = "held_out"
    valid = reason.isna()  # a quarantined copy never makes a later valid copy a duplicate
    reason[valid & df.content_hash.where(valid).duplicated()] = "duplicate"
    needs = ["sieve_score"] if recipe.sieve else []
    needs += ["kept"] if recipe.patches == "saliency" else []
    needs += ["enriched_caption"] if recipe.caption == "enriched" else []
    for col in needs:
        reason[reason.isna() & df[col].isna()] = "missing_juice"
    if recipe.sieve:
        pool = reason.isna()
        n_keep = int(np.ceil(sieve_fraction * pool.sum()))
        ranked = df[pool].sort_values(["sieve_score", "sample_id"], ascending=[False, True])
        reason[ranked.index[n_keep:]] = "sieved_out"
    members = df[reason.isna()].copy()
    members["caption_version"] = members.enriched_version if recipe.caption == "enriched" else "original"
    members["train_caption"] = members.enriched_caption if recipe.caption == "enriched" else members.caption
    if recipe.patches != "saliency":
        members["kept"] = None
    members["patches"] = recipe.patches
    excluded = df[reason.notna()][["sample_id", "drop_id"]].assign(reason=reason[reason.notna()].values)
    cols = ["sample_id", "drop_id", "content_hash", "train_caption", "caption_version", "patches", "kept"]
    return members[cols].reset_index(drop=True), excluded.reset_index(drop=True)
