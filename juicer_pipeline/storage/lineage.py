"""Tracing a score or checkpoint back to its samples, and a sample forward to every artifact.

Both directions are plain SQL over the catalog (shown in the README); these functions run them.
"""
from __future__ import annotations

import json

from .catalog import Catalog

BACKWARD_SQL = """
WITH target AS (
    SELECT c.* FROM checkpoints c
    WHERE c.checkpoint_id LIKE $id || '%'
       OR c.checkpoint_id IN (SELECT checkpoint_id FROM benchmark_scores WHERE score_id = $id)
)
SELECT t.checkpoint_id, t.recipe, t.seed, t.config_hash AS training_config_hash, t.tokens_seen,
       t.training_set_id, ts.drops, ts.n_members,
       m.sample_id, s.drop_id, s.content_hash, m.caption_version, m.caption, m.kept_patches,
       l.governor_id, l.code_version AS caption_code_version, l.run_id AS caption_run_id
FROM target t
JOIN training_sets ts USING (training_set_id)
JOIN training_set_members m USING (training_set_id)
JOIN samples s USING (sample_id)
LEFT JOIN lineage l ON l.artifact = 'enriched_captions/' || s.drop_id
ORDER BY m.sample_id
"""

FORWARD_SQL = """
SELECT s.sample_id, s.drop_id, s.status, s.quarantine_reason,
       m.recipe, m.training_set_id, m.caption_version, m.kept_patches,
       c.checkpoint_id, c.seed, count(b.score_id) AS scores
FROM samples s
LEFT JOIN training_set_members m USING (sample_id)
LEFT JOIN checkpoints c ON c.training_set_id = m.training_set_id
LEFT JOIN benchmark_scores b ON b.checkpoint_id = c.checkpoint_id
WHERE s.sample_id = $id
GROUP BY ALL
ORDER BY m.recipe, c.seed
"""


def trace_back(catalog: Catalog, ident: str) -> dict:
    with catalog.connect(read_only=True) as con:
        rows = con.execute(BACKWARD_SQL, {"id": ident}).df()
        if rows.empty:
            raise KeyError(f"no checkpoint or score matches {ident!r} (use a checkpoint id, a prefix of one, "
                           f"or a score id '<checkpoint>:<metric>')")
        checkpoint = rows.checkpoint_id.iloc[0]
        drops = json.loads(rows.drops.iloc[0])
        artifacts = [f"{a}/{d}" for d in drops for a in ("raw_samples", "patch_saliency", "pruned_images",
                                                          "extracted_classes", "sieve_scores", "enriched_captions")]
        artifacts += ["governor", "eval_sets", f"training_set/{rows.recipe.iloc[0]}",
                      f"clip_checkpoint/{rows.recipe.iloc[0]}/seed{rows.seed.iloc[0]}"]
        lineage = con.execute("SELECT artifact, code_version, config_hash, governor_id, run_id FROM lineage "
                              "WHERE artifact IN (SELECT unnest($a)) ORDER BY artifact", {"a": artifacts}).df()
        scores = con.execute("SELECT metric, value FROM benchmark_scores WHERE checkpoint_id = ? ORDER BY metric",
                             [checkpoint]).df()
    return {"checkpoint_id": checkpoint, "recipe": rows.recipe.iloc[0], "seed": int(rows.seed.iloc[0]),
            "training_set_id": rows.training_set_id.iloc[0], "drops": drops, "members": rows,
            "lineage": lineage, "scores": scores}


def trace_forward(catalog: Catalog, sample_id: str) -> dict:
    with catalog.connect(read_only=True) as con:
        rows = con.execute(FORWARD_SQL, {"id": sample_id}).df()
        if rows.empty:
            raise KeyError(f"no sample {sample_id!r} in the catalog")
        excluded = con.execute("SELECT recipe, reason FROM training_set_excluded WHERE sample_id = ? ORDER BY recipe",
                               [sample_id]).df() if _has_view(con, "training_set_excluded") else None
    return {"sample": rows.iloc[0][["sample_id", "drop_id", "status", "quarantine_reason"]].to_dict(),
            "artifacts": rows.dropna(subset=["recipe"]), "excluded": excluded}


def _has_view(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [name]).fetchone()[0])
