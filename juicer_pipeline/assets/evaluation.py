"""Held-out evaluation: the eval sets, every checkpoint's scores, and the recipes side by side."""
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from dagster import (AllPartitionMapping, AssetDep, AssetExecutionContext, MaterializeResult, MetadataValue,
                     asset)
from open_clip.tokenizer import SimpleTokenizer

from ..automation.conditions import FOLLOW_UPSTREAM, SHARED
from ..governance.drop_sources import open_drop
from ..governance.images import ImageLimits
from ..governance.ingest import RAW_SAMPLES_SCHEMA, RAW_SAMPLES_WRITER_OPTIONS, IngestStats, ingest_batches
from ..models.loader import load_world_clip
from ..settings import JuicerSettings, code_version
from ..storage import LineageRow, write_lineage
from ..storage.results import (BUDGETS, DENSE_HEADLINE, HEADLINE, comparison_rows, comparison_table, dense_rows,
                               learning_curves, recipe_checkpoints, replace_scores)
from ..training import evaluate_dense, evaluate_student, held_out_eval_set, student_config
from ..world.dense_sets import dense_sets
from ..world.vocabulary import load_vocabulary
from .resources import StorageResource
from .asset_lineage import asset_version
from .training import recipe_partitions
from .ui import curves_chart, metadata_table, png_markdown
from .vocabulary import class_vocabulary

EVAL_KINDS = ("retrieval", "classification")
EVAL_SET_NAME = "world-heldout"  # the eval_set column of benchmark_scores
DENSE_SEED = 0  # the world's dense sets (world/dense_sets.py): their own seed spaces, this seed


@lru_cache(maxsize=1)
def world_dense_sets():
    """The dense evaluation's held-out sets, drawn like the default world's drops: generated in
    memory once per process (a few seconds), the same every time."""
    return dense_sets(seed=DENSE_SEED)


def eval_folders(wh, tr) -> dict:
    """kind -> the folder its held-out set is ingested from."""
    own = {"retrieval": tr.retrieval_set, "classification": tr.classification_set}
    return {k: Path(own[k]) if own[k] else wh.world_dir / "evalsets" / k for k in EVAL_KINDS}


def build_eval_sets_asset(settings: JuicerSettings):
    tr = settings.training

    @asset(group_name="evaluation", kinds={"parquet"}, automation_condition=SHARED,
           code_version=code_version("eval_sets-3", tr.retrieval_set or "world", tr.classification_set or "world"),
           description="The held-out evaluation sets (retrieval pairs; labelled images for zero-shot "
                       "classification), ingested like drops: the world's, or the folders named by "
                       "training.retrieval_set / classification_set. Their images never enter a training set.")
    def eval_sets(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        wh = storage.warehouse
        counts, folders = {}, eval_folders(wh, tr)
        for kind, folder in folders.items():
            stats = IngestStats()
            with wh.stream_table("eval_sets", kind, RAW_SAMPLES_SCHEMA, **RAW_SAMPLES_WRITER_OPTIONS) as writer:
                for batch in ingest_batches(open_drop(folder), f"eval-{kind}", ImageLimits(), 4000, stats,
                                            workers=settings.ingest.workers):
                    writer.write_batch(batch)
            counts[kind] = stats.n_valid
            context.log.info(f"eval set {kind} ({folder}): {stats.n_valid} valid of {stats.n_samples}")
        storage.catalog.write(lambda con: write_lineage(con, LineageRow(
            "eval_sets", None, [f"folder:{f}" for f in folders.values()], context.run.run_id,
            asset_version(context), "none")))
        return MaterializeResult(metadata={**{f"{k}_images": v for k, v in counts.items()},
                                           **{f"{k}_folder": MetadataValue.path(str(f)) for k, f in folders.items()}})

    return eval_sets


def build_evaluation_assets(settings: JuicerSettings, clip_checkpoint, eval_sets) -> list:
    """benchmark_scores per recipe and the cross-recipe recipe_comparison."""
    benchmark_scores = _benchmark_scores_asset(settings, clip_checkpoint, eval_sets)
    return [benchmark_scores, _recipe_comparison_asset(settings, benchmark_scores)]


def _benchmark_scores_asset(settings: JuicerSettings, clip_checkpoint, eval_sets):
    cfg = student_config(settings)

    @asset(partitions_def=recipe_partitions, deps=[clip_checkpoint, eval_sets], group_name="training",
           code_version="benchmark_scores-3", kinds={"duckdb"},
           description="Image↔text retrieval R@1/5/10 and zero-shot top-1/top-5 of each checkpoint on the "
                       "held-out sets, and its dense scores (frozen tower, full images) on the world's held-out "
                       "dense sets: segmentation probes, MaskCLIP zero-shot segmentation and pointing, "
                       "counting, attribute binding.")
    def benchmark_scores(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        recipe, wh = context.partition_key, storage.warehouse
        ckpts = recipe_checkpoints(storage.catalog, recipe)
        if ckpts.empty:
            raise FileNotFoundError(f"no checkpoint of recipe {recipe}: materialise clip_checkpoint[{recipe}] first")
        tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
        vocab = class_vocabulary(settings.classes)
        ev = held_out_eval_set(wh, tokenizer, cfg.arch.image_size, vocab)
        rows, shown, dense_shown, dense_seconds = [], [], [], []
        for c in ckpts.itertuples():
            model = _load_checkpoint(wh, c, recipe, cfg.device)
            scores = evaluate_student(model, tokenizer, ev, cfg.device)
            # the dense sets are the world's, so their prompts name its colours; the templates are the vocabulary's
            dense = evaluate_dense(model, tokenizer, world_dense_sets(), cfg.device,
                                   attributes=load_vocabulary().colour_names, templates=vocab.templates)
            dense_seconds.append(dense.pop("dense_seconds"))
            scores.update(dense)
            rows += [{"score_id": f"{c.checkpoint_id}:{m}", "checkpoint_id": c.checkpoint_id, "recipe": recipe,
                      "seed": c.seed, "metric": m, "value": v} for m, v in scores.items()]
            run = {"seed": int(c.seed), "budget": c.budget}
            shown.append({**run, **{m: round(float(scores[m]), 4) for m in HEADLINE if m in scores}})
            dense_shown.append({**run, **{m.removeprefix("dense_"): round(scores[m], 4) for m in DENSE_HEADLINE}})
        context.log.info(f"dense evaluation: {sum(dense_seconds) / len(dense_seconds):.1f} s per checkpoint")
        lineage = LineageRow("benchmark_scores", recipe, [f"checkpoint:{c}" for c in ckpts.checkpoint_id]
                             + ["eval_sets", f"world:dense_sets/seed{DENSE_SEED}"], context.run.run_id,
                             asset_version(context), settings.training.config_hash())
        # small: lives in the catalog table of the same name, not in Parquet
        storage.catalog.write(lambda con: replace_scores(con, recipe, pd.DataFrame(rows), EVAL_SET_NAME, lineage))
        return MaterializeResult(metadata={"recipe": recipe, "checkpoints": len(ckpts),
                                           "scores": metadata_table(shown), "dense_scores": metadata_table(dense_shown),
                                           "dense_seconds_per_checkpoint": round(float(np.mean(dense_seconds)), 2)})

    return benchmark_scores


def _load_checkpoint(wh, c, recipe: str, device: str):
    """A recorded checkpoint's model, refused when its file changed since it was recorded."""
    with wh.local_copy(c.path) as local:
        fm = load_world_clip(local, device)
    if fm.model_id != c.checkpoint_id:
        raise ValueError(f"checkpoint file {c.path} changed since it was recorded ({fm.model_id[:12]} != "
                         f"{c.checkpoint_id[:12]}): re-materialise clip_checkpoint[{recipe}]")
    return fm.model


def _recipe_comparison_asset(settings: JuicerSettings, benchmark_scores):
    @asset(deps=[AssetDep(benchmark_scores, partition_mapping=AllPartitionMapping())], group_name="training",
           code_version="recipe_comparison-3", kinds={"duckdb"}, automation_condition=FOLLOW_UPSTREAM,
           description="All recipes side by side, one table per fair comparison (equal vision tokens; equal "
                       "wall-clock time): mean ± spread over seeds, tokens and samples seen, step time, a "
                       "table of the dense scores, and the learning curves.")
    def recipe_comparison(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        metadata, shown = {}, []
        for budget in BUDGETS:
            table = comparison_table(storage.catalog, budget)
            if not table.empty:
                metadata.update(_write_comparison(storage, budget, table))
                shown += list(table.recipe)
        if not metadata:
            raise FileNotFoundError("no current benchmark scores: materialise benchmark_scores for some recipes "
                                    "(after their clip_checkpoint) first")
        storage.catalog.write(lambda con: write_lineage(con, LineageRow(
            "recipe_comparison", None, [f"benchmark_scores/{r}" for r in dict.fromkeys(shown)],
            context.run.run_id, asset_version(context), settings.training.config_hash())))
        storage.catalog.refresh_views(storage.warehouse)
        return MaterializeResult(metadata=metadata)

    return recipe_comparison


def _write_comparison(storage: StorageResource, budget: str, table: pd.DataFrame) -> dict:
    """Store one budget's comparison table and learning-curve chart; return their metadata."""
    wh = storage.warehouse
    wh.write_table("recipe_comparison", budget, pa.Table.from_pandas(table, preserve_index=False))
    chart = curves_chart(learning_curves(storage.catalog, budget), title=f"t2i R@1 over the budget (equal {budget}, "
                         "mean over seeds)", x_label="M tokens" if budget == "tokens" else "s")
    with wh.writing(wh.object_path("recipe_comparison", f"learning_curves_{budget}.png")) as tmp:
        chart.save(tmp, "PNG")
    dense = dense_rows(table)
    return {f"equal_{budget}": metadata_table(comparison_rows(table)),
            **({f"dense_{budget}": metadata_table(dense)} if dense else {}),
            f"learning_curves_{budget}": MetadataValue.md(png_markdown(chart, f"learning curves {budget}"))}
