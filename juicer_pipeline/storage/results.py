"""Benchmark scores and the recipe comparison: the catalog SQL that assets, the CLI, the HTML
report and the benchmarks read and write."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd

from ..governance.recipes import RECIPE_NAMES
from .catalog import Catalog
from .records import LineageRow, write_lineage

HEADLINE = ["i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10", "top1", "top5"]
# The dense evaluation's scores (training/dense_evaluation.py, DENSE_METRICS): rows of the same
# benchmark_scores table, shown as a table of their own. Named here too, so that storage imports no
# model code; a test keeps the two lists equal.
DENSE_HEADLINE = ["dense_seg_last_miou", "dense_seg_last_miou_shapes", "dense_seg_blocks_miou",
                  "dense_seg_blocks_miou_shapes", "dense_zs_seg_miou", "dense_zs_seg_miou_shapes", "dense_pointing",
                  "dense_count", "dense_count_area_control", "dense_binding_text", "dense_binding_image",
                  "dense_binding_group"]
BUDGETS = ("tokens", "wallclock")

# The current checkpoint of each recipe, seed and budget; scores of any other checkpoint are stale
# (the checkpoint was retrained after it was scored) and never enter the comparison.
CURRENT_CHECKPOINTS_SQL = """
SELECT * FROM checkpoints
QUALIFY row_number() OVER (PARTITION BY recipe, seed, budget ORDER BY lineage_seq DESC NULLS LAST, created_at DESC) = 1
"""


def current_checkpoints(catalog: Catalog, budget: str = "tokens") -> pd.DataFrame:
    """recipe, seed and path of the current checkpoint of every recipe and seed at `budget`."""
    return catalog.query(f"SELECT recipe, seed, path, checkpoint_id FROM ({CURRENT_CHECKPOINTS_SQL}) "
                         f"WHERE budget = ? ORDER BY recipe, seed", [budget])


def recipe_checkpoints(catalog: Catalog, recipe: str) -> pd.DataFrame:
    """The recipe's recorded checkpoints, token budget first, then by seed."""
    return catalog.query("SELECT checkpoint_id, seed, budget, path FROM checkpoints WHERE recipe = ? "
                         "ORDER BY budget DESC, seed", [recipe])


def replace_scores(con: duckdb.DuckDBPyConnection, recipe: str, scores: pd.DataFrame, eval_set: str,
                   lineage: LineageRow) -> None:
    """Make `scores` (score_id, checkpoint_id, recipe, seed, metric, value) the recipe's benchmark
    scores, with their lineage row, inside the caller's transaction."""
    con.execute("DELETE FROM benchmark_scores WHERE recipe = ?", [recipe])
    con.register("scores_df", scores.assign(eval_set=eval_set))
    con.execute("INSERT INTO benchmark_scores SELECT score_id, checkpoint_id, recipe, seed, metric, value, "
                "eval_set, now() FROM scores_df")
    con.unregister("scores_df")
    write_lineage(con, lineage)


def comparison_table(catalog: Catalog, budget: str = "tokens") -> pd.DataFrame:
    """One row per recipe at one budget: mean and sample std over seeds of every headline metric,
    and the tokens, samples and seconds each run really used. Empty when nothing was scored."""
    current = f"SELECT * FROM ({CURRENT_CHECKPOINTS_SQL}) WHERE budget = $budget"
    scores = catalog.query(f"SELECT b.recipe, b.seed, b.metric, b.value FROM benchmark_scores b "
                           f"JOIN ({current}) c USING (checkpoint_id, recipe, seed)", {"budget": budget})
    ckpts = catalog.query(f"SELECT c.recipe, c.seed, tokens_seen, samples_seen, wall_seconds, record "
                          f"FROM ({current}) c SEMI JOIN benchmark_scores b USING (checkpoint_id)", {"budget": budget})
    if scores.empty:
        return pd.DataFrame()
    ckpts["step_seconds"] = ckpts.record.map(lambda r: json.loads(r)["phases"][0]["step_seconds"])
    # the precision the run trained in (with "native", the one timed faster); rows recorded before it was kept: fp32
    ckpts["precision"] = ckpts.record.map(lambda r: json.loads(r).get("precision", "fp32"))
    recipes = [r for r in RECIPE_NAMES if r in set(scores.recipe)]
    return pd.DataFrame([_comparison_row(r, budget, scores[scores.recipe == r], ckpts[ckpts.recipe == r])
                         for r in recipes])


def _comparison_row(recipe: str, budget: str, s: pd.DataFrame, c: pd.DataFrame) -> dict:
    """Scores a checkpoint lacks (dense scores from before the dense evaluation) are NaN."""
    row = {"recipe": recipe, "budget": budget, "seeds": s.seed.nunique(), "tokens_seen": int(c.tokens_seen.mean()),
           "samples_seen": int(c.samples_seen.mean()), "step_seconds": float(c.step_seconds.mean()),
           "wall_seconds": float(c.wall_seconds.mean()), "precision": "/".join(sorted(set(c.precision)))}
    for m in HEADLINE + DENSE_HEADLINE:
        v = s[s.metric == m].value
        row[f"{m}_mean"] = float(v.mean()) if len(v) else float("nan")
        row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return row


def comparison_rows(table: pd.DataFrame) -> list[dict]:
    """The comparison as display rows: scores in percent as 'mean ± std' over seeds."""
    rows = []
    for r in table.to_dict("records"):
        row = {"recipe": r["recipe"], "seeds": int(r["seeds"]), "tokens": int(r["tokens_seen"]),
               "samples": int(r["samples_seen"]), "step s": f"{r['step_seconds']:.3f}", "wall s": f"{r['wall_seconds']:.0f}",
               "precision": r["precision"]}
        row.update({m: f"{100 * r[f'{m}_mean']:.1f} ± {100 * r[f'{m}_std']:.1f}" for m in HEADLINE})
        rows.append(row)
    return rows


def dense_rows(table: pd.DataFrame) -> list[dict]:
    """The dense scores as display rows, in percent as 'mean ± std' over seeds ('-' where a
    recipe's checkpoints have none); empty when no recipe has any."""
    have = [f"{m}_mean" in table and table[f"{m}_mean"].notna().any() for m in DENSE_HEADLINE]
    if table.empty or not any(have):
        return []
    return [{"recipe": r["recipe"], "seeds": int(r["seeds"]),
             **{m.removeprefix("dense_"): "-" if np.isnan(r[f"{m}_mean"]) else
                f"{100 * r[f'{m}_mean']:.1f} ± {100 * r[f'{m}_std']:.1f}" for m in DENSE_HEADLINE}}
            for r in table.to_dict("records")]


def learning_curves(catalog: Catalog, budget: str = "tokens", metric: str = "t2i_r@1") -> dict:
    """recipe -> [(tokens in millions, or training seconds; metric averaged over seeds)]."""
    ckpts = catalog.query(f"SELECT recipe, record FROM ({CURRENT_CHECKPOINTS_SQL}) WHERE budget = ? "
                          f"ORDER BY recipe, seed", [budget])
    curves: dict[str, dict[int, list]] = {}
    for row in ckpts.itertuples():
        for i, p in enumerate(json.loads(row.record)["learning_curve"]):
            x = p["tokens_seen"] / 1e6 if budget == "tokens" else p.get("train_seconds", 0.0)
            curves.setdefault(row.recipe, {}).setdefault(i, []).append((x, p[metric]))
    return {r: [(float(np.mean([x for x, _ in pts])), float(np.mean([y for _, y in pts]))) for pts in by_point.values()]
            for r, by_point in curves.items()}
