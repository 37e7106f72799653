"""Tracing a score or checkpoint back to its samples, and a sample forward to every artifact.

Both directions are plain SQL over the catalog (shown in docs/catalog.md); these functions run them.
"""
from __future__ import annotations

import json

import pandas as pd

from .catalog import Catalog

# Lineage is append-only; a checkpoint reads it as of when it was made. Its training set's inputs
# (captions, pruning, governor...) are read as of the training set's own row, since later
# re-materialisations did not feed this checkpoint.
LINEAGE_AS_OF_SQL = """
SELECT * FROM lineage WHERE seq <= $seq
QUALIFY row_number() OVER (PARTITION BY artifact ORDER BY seq DESC) = 1
"""

TARGET_SQL = """
SELECT checkpoint_id, recipe, seed, budget, coalesce(lineage_seq, (SELECT max(seq) FROM lineage)) AS lineage_seq
FROM checkpoints
WHERE checkpoint_id LIKE $id || '%'
   OR checkpoint_id IN (SELECT checkpoint_id FROM benchmark_scores WHERE score_id = $id)
"""

BACKWARD_SQL = f"""
WITH l AS ({LINEAGE_AS_OF_SQL})
SELECT t.checkpoint_id, t.recipe, t.seed, t.config_hash AS training_config_hash, t.tokens_seen,
       t.training_set_id, ts.drops, ts.n_members,
       m.sample_id, s.drop_id, s.content_hash, m.caption_version, m.caption, m.kept_patches,
       l.governor_id, l.code_version AS caption_code_version, l.run_id AS caption_run_id
FROM checkpoints t
JOIN training_sets ts USING (training_set_id)
JOIN training_set_members m USING (training_set_id)
JOIN samples s USING (sample_id)
LEFT JOIN l ON l.artifact = 'enriched_captions/' || s.drop_id
WHERE t.checkpoint_id = $id
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


def checkpoint_run_name(seed: int, budget: str) -> str:
    """The name of one trained run within a recipe's checkpoints: `seed0` for the equal-token
    budget, `seed0-wallclock` for the equal-wall-clock one (the checkpoint file and lineage row)."""
    return f"seed{seed}" + ("" if budget == "tokens" else f"-{budget}")


def checkpoint_artifact(recipe: str, seed: int, budget: str) -> str:
    """The lineage artifact of a checkpoint (`clip_checkpoint/<recipe>/<run name>`)."""
    return f"clip_checkpoint/{recipe}/{checkpoint_run_name(seed, budget)}"


def latest_seq(catalog: Catalog, artifact: str) -> int | None:
    """The seq of the artifact's newest lineage row (None when it has none)."""
    seq = catalog.query("SELECT max(seq) AS seq FROM lineage WHERE artifact = ?", [artifact]).seq.iloc[0]
    return None if pd.isna(seq) else int(seq)


def trace_back(catalog: Catalog, ident: str) -> dict:
    with catalog.connect(read_only=True) as con:
        target = _target(con, ident)
        ckpt, seq = target.checkpoint_id, int(target.lineage_seq)
        ts_seq = _seq_as_of(con, f"training_set/{target.recipe}", seq)
        rows = con.execute(BACKWARD_SQL, {"id": ckpt, "seq": ts_seq}).df()
        if rows.empty:
            raise KeyError(f"checkpoint {ckpt[:12]}'s training set is no longer in the catalog")
        drops = json.loads(rows.drops.iloc[0])
        artifacts = [f"{a}/{d}" for d in drops for a in ("raw_samples", "patch_saliency", "pruned_images",
                                                          "extracted_classes", "sieve_scores", "enriched_captions")]
        artifacts += ["governor", "eval_sets", f"training_set/{target.recipe}"]
        own = [checkpoint_artifact(target.recipe, int(target.seed), target.budget)]
        lineage = pd.concat([_lineage_as_of(con, artifacts, ts_seq), _lineage_as_of(con, own, seq)])
        scores = con.execute("SELECT metric, value FROM benchmark_scores WHERE checkpoint_id = ? ORDER BY metric",
                             [ckpt]).df()
    return {"checkpoint_id": ckpt, "recipe": target.recipe, "seed": int(target.seed), "budget": target.budget,
            "training_set_id": rows.training_set_id.iloc[0], "drops": drops, "members": rows,
            "lineage": lineage.sort_values("artifact", ignore_index=True), "scores": scores}


def _target(con, ident: str):
    found = con.execute(TARGET_SQL, {"id": ident}).df()
    if found.empty:
        raise KeyError(f"no checkpoint or score matches {ident!r} (use a checkpoint id, a prefix of one, "
                       f"or a score id '<checkpoint>:<metric>')")
    if len(found) > 1:
        raise KeyError(f"{ident!r} matches {len(found)} checkpoints: give more of the id")
    return found.iloc[0]


def _seq_as_of(con, artifact: str, seq: int) -> int:
    """The seq of `artifact`'s row current at `seq` (`seq` itself if it has none)."""
    row = con.execute("SELECT max(seq) FROM lineage WHERE artifact = ? AND seq <= ?", [artifact, seq]).fetchone()
    return int(row[0]) if row[0] is not None else seq


def _lineage_as_of(con, artifacts: list[str], seq: int) -> pd.DataFrame:
    return con.execute(f"SELECT artifact, code_version, config_hash, governor_id, run_id, seq "
                       f"FROM ({LINEAGE_AS_OF_SQL}) WHERE artifact IN (SELECT unnest($a))",
                       {"a": artifacts, "seq": seq}).df()


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


EXPORT_MEMBERS_VIEW = "juiced_dataset_members"  # written by the juiced_dataset asset and `juicer export`


def trace_export(catalog: Catalog, ident: str) -> dict:
    """An export (its id, or a prefix of one) traced to its training set, samples and inputs as of
    when it was written; or an exported uid traced back to its sample (and every export holding it)."""
    with catalog.connect(read_only=True) as con:
        if not _has_view(con, EXPORT_MEMBERS_VIEW):
            raise KeyError("no export is recorded in the catalog yet (materialise juiced_dataset or run juicer export)")
        holding = con.execute(f"SELECT export_id, recipe, shard, key, out, sample_id FROM {EXPORT_MEMBERS_VIEW} "
                              f"WHERE uid = ? ORDER BY recipe, export_id", [ident.lower()]).df()
        if len(holding):
            sample = con.execute("SELECT sample_id, drop_id, content_hash, status FROM samples WHERE sample_id = ?",
                                 [holding.sample_id.iloc[0]]).df()
            return {"uid": ident.lower(), "sample": sample.iloc[0].to_dict() if len(sample) else
                    {"sample_id": holding.sample_id.iloc[0]}, "exports": holding.drop(columns="sample_id")}
        return _trace_export_id(con, ident)


def _trace_export_id(con, ident: str) -> dict:
    found = con.execute(f"SELECT DISTINCT export_id, recipe, out FROM {EXPORT_MEMBERS_VIEW} "
                        f"WHERE export_id LIKE ? || '%'", [ident.lower()]).df()
    if found.empty:
        raise KeyError(f"no export or exported uid matches {ident!r} (an export id, a prefix of one, or a uid)")
    if found.export_id.nunique() > 1:
        raise KeyError(f"{ident!r} matches {found.export_id.nunique()} exports: give more of the id")
    export = found.iloc[0]
    row = con.execute("SELECT seq, inputs, run_id, code_version, config_hash, governor_id, created_at FROM lineage "
                      "WHERE artifact = ? AND inputs LIKE ? ORDER BY seq DESC LIMIT 1",
                      [f"juiced_dataset/{export.recipe}", f"%export_id:{export.export_id}%"]).df()
    if row.empty:
        raise KeyError(f"export {export.export_id[:12]} has members but no lineage row")
    inputs = json.loads(row.inputs.iloc[0])
    members = con.execute(f"SELECT m.uid, m.sample_id, s.drop_id, s.content_hash, m.shard "
                          f"FROM {EXPORT_MEMBERS_VIEW} m LEFT JOIN samples s USING (sample_id) "
                          f"WHERE m.export_id = ? ORDER BY m.shard, m.sample_id", [export.export_id]).df()
    drops = sorted(set(members.drop_id.dropna()))
    artifacts = [f"{a}/{d}" for d in drops for a in ("raw_samples", "patch_saliency", "pruned_images",
                                                      "extracted_classes", "sieve_scores", "enriched_captions")]
    artifacts += ["governor", "eval_sets", f"training_set/{export.recipe}", f"juiced_dataset/{export.recipe}"]
    seq = int(row.seq.iloc[0])
    return {"export_id": export.export_id, "recipe": export.recipe, "out": export.out,
            "training_set_id": next((i.split(":", 1)[1] for i in inputs if i.startswith("training_set_id:")), None),
            "drops": drops, "members": members, "lineage": _lineage_as_of(con, artifacts, seq)
            .sort_values("artifact", ignore_index=True), "seq": seq}
