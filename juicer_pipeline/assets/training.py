"""Across drops: held-out eval sets, training sets per recipe, student checkpoints, scores, comparison."""
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from dagster import (AllPartitionMapping, AssetDep, AssetExecutionContext, MaterializeResult, MetadataValue,
                     StaticPartitionsDefinition, asset)
from open_clip.tokenizer import SimpleTokenizer

from ..governance.clip_training import (StudentConfig, TrainData, evaluate_student, student_config,
                                        train_student)
from ..governance.distributed_training import train_student_processes
from ..governance.drop_sources import open_drop
from ..governance.eval_data import load_eval_set
from ..governance.images import ImageLimits, load_rgb, to_uint8_chw
from ..governance.pruning import kept_on_grid
from ..governance.ingest import RAW_SAMPLES_SCHEMA, RAW_SAMPLES_WRITER_OPTIONS, IngestStats, ingest_batches
from ..governance.recipes import RECIPE_NAMES, RECIPES
from ..governance.training_set import assemble_training_set
from ..models.loader import load_world_clip, save_world_clip
from ..automation.conditions import FOLLOW_UPSTREAM, SHARED
from ..settings import JuicerSettings, SaliencySettings, code_version
from ..storage import LineageRow, replace_checkpoints, replace_training_set, write_lineage
from ..storage.lineage import checkpoint_run_name
from ..governance.hard_negatives import swap_negative_tokens
from ..governance.vocabulary import ClassVocabulary
from .resources import StorageResource
from .vocabulary import class_vocabulary, vocabulary_fingerprint
from .ui import curves_chart, line_chart, markdown_table, metadata_table, png_markdown

recipe_partitions = StaticPartitionsDefinition(RECIPE_NAMES)
EVAL_KINDS = ("retrieval", "classification")
PER_DROP_INPUTS = ("raw_samples", "pruned_images", "enriched_captions", "sieve_scores")
HEADLINE = ["i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10", "top1", "top5"]


def _arch_hash(cfg: StudentConfig) -> str:
    """The student architecture's own hash: a student JSON file edited in place changes it."""
    return hashlib.sha256(json.dumps(cfg.arch.to_dict(), sort_keys=True).encode()).hexdigest()


def eval_folders(wh, tr) -> dict:
    """kind -> the folder its held-out set is ingested from."""
    own = {"retrieval": tr.retrieval_set, "classification": tr.classification_set}
    return {k: Path(own[k]) if own[k] else wh.world_dir / "evalsets" / k for k in EVAL_KINDS}


def juiced_drops(storage: StorageResource) -> tuple[list[str], list[str]]:
    """(drops with every per-drop input of a training set materialised, those of them left out
    because the drop sensor found their folder deleted)."""
    wh = storage.warehouse
    names = [set(wh.partitions(a)) for a in PER_DROP_INPUTS]
    juiced = set.intersection(*names) if names else set()
    deleted = set(storage.catalog.query("SELECT drop_id FROM drops WHERE status = 'deleted'").drop_id)
    return sorted(juiced - deleted), sorted(juiced & deleted)


def _samples_frame(storage: StorageResource, drops: list[str]) -> pd.DataFrame:
    """Every ingested sample of the drops, joined with its juice (DuckDB over the Parquet files)."""
    wh = storage.warehouse
    files = {a: [wh.partition_path(a, d) for d in drops] for a in PER_DROP_INPUTS}
    with wh.duckdb() as con:
        return con.execute("""
            SELECT r.sample_id, r.drop_id, r.content_hash, r.status, r.caption, r.thumbprint,
                   c.enriched_caption, c.caption_version AS enriched_version, p.kept, s.sieve_score
            FROM read_parquet(?, union_by_name = true) r
            LEFT JOIN read_parquet(?) p USING (sample_id)
            LEFT JOIN read_parquet(?) c USING (sample_id)
            LEFT JOIN read_parquet(?) s USING (sample_id)""",
            [files["raw_samples"], files["pruned_images"], files["enriched_captions"], files["sieve_scores"]]).df()


def _training_set_id(recipe: str, members: pd.DataFrame) -> str:
    h = hashlib.sha256(f"{recipe}\n".encode())
    for sid, cap, kept in zip(members.sample_id, members.train_caption, members.kept):
        h.update(f"{sid}\t{cap}\t{'' if kept is None else ','.join(map(str, kept))}\n".encode())
    return h.hexdigest()


def build_training_assets(settings: JuicerSettings) -> list:
    tr = settings.training
    cfg = student_config(settings)
    budgets = [cfg] + ([student_config(settings, wallclock=True)] if tr.wallclock_s else [])

    eval_version = code_version("eval_sets-3", tr.retrieval_set or "world", tr.classification_set or "world")

    @asset(group_name="evaluation", code_version=eval_version, kinds={"parquet"}, automation_condition=SHARED,
           description="The held-out evaluation sets (retrieval pairs; labelled images for zero-shot "
                       "classification), ingested like drops: the world's, or the folders named by "
                       "training.retrieval_set / classification_set. Their images never enter a training set.")
    def eval_sets(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        wh = storage.warehouse
        counts, folders = {}, eval_folders(wh, tr)
        for kind, folder in folders.items():
            source = open_drop(folder)
            stats = IngestStats()
            with wh.stream_table("eval_sets", kind, RAW_SAMPLES_SCHEMA, **RAW_SAMPLES_WRITER_OPTIONS) as writer:
                for batch in ingest_batches(source, f"eval-{kind}", ImageLimits(), 4000, stats,
                                            workers=settings.ingest.workers):
                    writer.write_batch(batch)
            counts[kind] = stats.n_valid
            context.log.info(f"eval set {kind} ({folder}): {stats.n_valid} valid of {stats.n_samples}")
        storage.catalog.write(lambda con: write_lineage(con, LineageRow(
            "eval_sets", None, [f"folder:{f}" for f in folders.values()], context.run.run_id, eval_version, "none")))
        return MaterializeResult(metadata={**{f"{k}_images": v for k, v in counts.items()},
                                           **{f"{k}_folder": MetadataValue.path(str(f)) for k, f in folders.items()}})

    @asset(partitions_def=recipe_partitions, group_name="training", kinds={"parquet", "duckdb"},
           deps=[*(AssetDep(a, partition_mapping=AllPartitionMapping()) for a in PER_DROP_INPUTS), eval_sets],
           code_version=code_version("training_set-3", tr.sieve_fraction),
           description="A recipe's training set from every juiced drop: sample ids, caption versions and kept-patch "
                       "sets, without quarantined samples, cross-drop duplicates or evaluation images.")
    def training_set(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        recipe = RECIPES[context.partition_key]
        wh = storage.warehouse
        drops, deleted = juiced_drops(storage)
        if deleted:
            context.log.warning(f"left out drop(s) whose folder was deleted: {', '.join(deleted)}")
        if not drops:
            raise FileNotFoundError("no juiced drop yet: materialise the per-drop assets (job juice_drop) first")
        with wh.duckdb() as con:
            evals = con.execute("SELECT content_hash, thumbprint FROM read_parquet(?, union_by_name = true) "
                                "WHERE content_hash IS NOT NULL", [f"{wh.asset_dir('eval_sets')}/*.parquet"]).df()
        eval_prints = [p for p in evals.thumbprint if isinstance(p, (bytes, bytearray))]
        if len(eval_prints) < len(evals):
            context.log.warning(f"{len(evals) - len(eval_prints)} evaluation images have no thumbprint (ingested "
                                f"before near-duplicate guarding): re-materialise eval_sets")
        members, excluded = assemble_training_set(recipe, _samples_frame(storage, drops), set(evals.content_hash),
                                                  tr.sieve_fraction, [bytes(p) for p in eval_prints])
        ts_id = _training_set_id(recipe.name, members)
        table = pa.Table.from_pandas(members.assign(training_set_id=ts_id), preserve_index=False)
        wh.write_table("training_set", recipe.name, table)
        wh.write_table("training_set_excluded", recipe.name,
                       pa.Table.from_pandas(excluded.assign(recipe=recipe.name), preserve_index=False))
        why = Counter(excluded.reason)
        kept_text = [("all" if p == "all" else "random") if k is None else ",".join(map(str, k))
                     for p, k in zip(members.patches, members.kept)]
        rows = pd.DataFrame({"training_set_id": ts_id, "recipe": recipe.name, "sample_id": members.sample_id,
                             "caption_version": members.caption_version, "caption": members.train_caption,
                             "kept_patches": kept_text})
        version = context.assets_def.code_versions_by_key[context.asset_key]
        ts = {"training_set_id": ts_id, "recipe": recipe.name, "n_members": len(members),
              "excluded": json.dumps(dict(why)), "drops": json.dumps(drops), "config_hash": tr.config_hash()}
        def record(con):
            write_lineage(con, LineageRow("training_set", recipe.name,
                                          [f"{a}/{d}" for d in drops for a in PER_DROP_INPUTS] + ["eval_sets"],
                                          context.run.run_id, version, tr.config_hash()))
            return replace_training_set(con, ts, rows)

        old = storage.catalog.write(record)  # the whole transaction is retried on a lock conflict
        if old:
            context.log.info(f"replaced training set(s) {', '.join(o[:12] for o in old)} of {recipe.name}")
        return MaterializeResult(metadata={
            "training_set_id": ts_id, "recipe": recipe.name, "description": recipe.description,
            "members": len(members), "drops": ", ".join(drops),
            "excluded_by_reason": MetadataValue.md(markdown_table([{"reason": k, "count": v} for k, v in why.most_common()]))})

    @asset(partitions_def=recipe_partitions, deps=[training_set, eval_sets], group_name="training",
           code_version=code_version("clip_checkpoint-2", tr, settings.saliency, _arch_hash(cfg),
                                     *([settings.classes, vocabulary_fingerprint(settings.classes)]
                                       if tr.hard_negatives else [])),
           kinds={"pytorch"},
           description="Student CLIPs (one per seed) trained with the contrastive loss at an equal budget of "
                       "vision tokens, and with `training.wallclock_s` also at an equal wall-clock budget; "
                       "pruned recipes feed the vision tower only the kept patch tokens.")
    def clip_checkpoint(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        recipe = RECIPES[context.partition_key]
        wh = storage.warehouse
        members = wh.read_table("training_set", recipe.name).to_pandas()
        vocab = class_vocabulary(settings.classes)
        data = _train_data(wh, members, recipe.patches, cfg, settings.saliency,
                           negatives_from=list(vocab.names) if tr.hard_negatives else None)
        tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
        ev = _eval_set(wh, tokenizer, cfg, vocab)
        ts_id = members.training_set_id.iloc[0]
        version = context.assets_def.code_versions_by_key[context.asset_key]
        rows, curves = [], {}
        for seed in tr.seeds:
            for run_cfg in budgets:
                name = checkpoint_run_name(seed, run_cfg.budget)
                context.log.info(f"{recipe.name}: training {name} ({run_cfg.budget} budget) on {len(members)} samples")
                if tr.processes > 1:  # torch DDP under torchrun; the same global batch, loss and budget
                    model, record = train_student_processes(data, run_cfg, seed, tr.processes, eval_set=ev,
                                                            progress=context.log.info,
                                                            timeout_s=tr.collective_timeout_s,
                                                            scratch=wh.root / "scratch")
                else:
                    model, record = train_student(data, run_cfg, seed, progress=context.log.info,
                                                  evaluate=lambda m: evaluate_student(m, tokenizer, ev, cfg.device))
                path = wh.object_path("clip_checkpoint", f"{recipe.name}/{name}.safetensors")
                with wh.writing(path) as tmp:
                    ckpt_id = save_world_clip(model, cfg.arch, tmp, {"recipe": recipe.name, "seed": seed,
                                                                      "training_set_id": ts_id, **record})
                curves[name] = record["loss_curve"]
                rows.append({"checkpoint_id": ckpt_id, "name": name, "path": str(path), **record})
        recorded = [({"checkpoint_id": r["checkpoint_id"], "recipe": recipe.name, "seed": r["seed"],
                      "training_set_id": ts_id, "path": r["path"], "config_hash": tr.config_hash(),
                      **{k: r[k] for k in ("tokens_seen", "samples_seen", "wall_seconds", "final_loss")},
                      "record": json.dumps({**{k: r[k] for k in ("phases", "learning_curve", "steps", "train_samples")},
                                            "precision": r["config"]["precision"]}),
                      "budget": r["budget"]},
                     LineageRow("clip_checkpoint", f"{recipe.name}/{r['name']}",
                                [f"training_set/{recipe.name}", f"training_set_id:{ts_id}"],
                                context.run.run_id, version, tr.config_hash())) for r in rows]
        storage.catalog.write(lambda con: replace_checkpoints(con, recipe.name, recorded))
        summary = [{"run": r["name"], "budget": r["budget"], "checkpoint": r["checkpoint_id"][:12],
                    "tokens_seen": r["tokens_seen"], "samples_seen": r["samples_seen"], "steps": r["steps"],
                    "wall_s": round(r["wall_seconds"], 1),
                    "step_s": " / ".join(f"{p['step_seconds']:.3f}" for p in r["phases"]),
                    "final_loss": round(r["final_loss"], 3)} for r in rows]
        first = rows[0]["name"]
        return MaterializeResult(metadata={
            "recipe": recipe.name, "training_set_id": ts_id, "runs_trained": len(rows),
            "tokens_seen": rows[0]["tokens_seen"], "samples_seen": rows[0]["samples_seen"],
            "runs": metadata_table(summary),
            "loss_curve": MetadataValue.md(png_markdown(line_chart(curves[first], title=f"{recipe.name} loss, {first}")))})

    @asset(partitions_def=recipe_partitions, deps=[clip_checkpoint, eval_sets], group_name="training",
           code_version="benchmark_scores-2", kinds={"duckdb"},
           description="Image↔text retrieval R@1/5/10 and zero-shot top-1/top-5 of each checkpoint on the "
                       "held-out sets.")
    def benchmark_scores(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        recipe = context.partition_key
        wh = storage.warehouse
        ckpts = storage.catalog.query("SELECT checkpoint_id, seed, budget, path FROM checkpoints WHERE recipe = ? "
                                      "ORDER BY budget DESC, seed", [recipe])
        if ckpts.empty:
            raise FileNotFoundError(f"no checkpoint of recipe {recipe}: materialise clip_checkpoint[{recipe}] first")
        tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
        ev = _eval_set(wh, tokenizer, cfg, class_vocabulary(settings.classes))
        rows, shown = [], []
        for c in ckpts.itertuples():
            with wh.local_copy(c.path) as local:
                fm = load_world_clip(local, cfg.device)
            if fm.model_id != c.checkpoint_id:
                raise ValueError(f"checkpoint file {c.path} changed since it was recorded ({fm.model_id[:12]} != "
                                 f"{c.checkpoint_id[:12]}): re-materialise clip_checkpoint[{recipe}]")
            scores = evaluate_student(fm.model, tokenizer, ev, cfg.device)
            rows += [{"score_id": f"{c.checkpoint_id}:{m}", "checkpoint_id": c.checkpoint_id, "recipe": recipe,
                      "seed": c.seed, "metric": m, "value": v} for m, v in scores.items()]
            shown.append({"seed": int(c.seed), "budget": c.budget,
                          **{m: round(float(scores[m]), 4) for m in HEADLINE if m in scores}})
        df = pd.DataFrame(rows)  # small: lives in the catalog table of the same name, not in Parquet
        def record(con):
            con.execute("DELETE FROM benchmark_scores WHERE recipe = ?", [recipe])
            con.register("scores_df", df.assign(eval_set="world-heldout"))
            con.execute("INSERT INTO benchmark_scores SELECT score_id, checkpoint_id, recipe, seed, metric, value, "
                        "eval_set, now() FROM scores_df")
            con.unregister("scores_df")
            write_lineage(con, LineageRow("benchmark_scores", recipe,
                                          [f"checkpoint:{c}" for c in ckpts.checkpoint_id] + ["eval_sets"],
                                          context.run.run_id, "benchmark_scores-2", tr.config_hash()))

        storage.catalog.write(record)
        return MaterializeResult(metadata={"recipe": recipe, "checkpoints": len(ckpts),
                                           "scores": metadata_table(shown)})

    @asset(deps=[AssetDep(benchmark_scores, partition_mapping=AllPartitionMapping())], group_name="training",
           code_version="recipe_comparison-2", kinds={"duckdb"}, automation_condition=FOLLOW_UPSTREAM,
           description="All recipes side by side, one table per fair comparison (equal vision tokens; equal "
                       "wall-clock time): mean ± spread over seeds, tokens and samples seen, step time, and "
                       "the learning curves.")
    def recipe_comparison(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        wh = storage.warehouse
        metadata, shown = {}, []
        for budget in BUDGETS:
            table = comparison_table(storage, budget)
            if table.empty:
                continue
            wh.write_table("recipe_comparison", budget, pa.Table.from_pandas(table, preserve_index=False))
            metadata[f"equal_{budget}"] = metadata_table(comparison_rows(table))
            chart = curves_chart(learning_curves(storage, budget), title=f"t2i R@1 over the budget (equal {budget}, "
                                 "mean over seeds)", x_label="M tokens" if budget == "tokens" else "s")
            with wh.writing(wh.object_path("recipe_comparison", f"learning_curves_{budget}.png")) as tmp:
                chart.save(tmp, "PNG")
            metadata[f"learning_curves_{budget}"] = MetadataValue.md(png_markdown(chart, f"learning curves {budget}"))
            shown += list(table.recipe)
        if not metadata:
            raise FileNotFoundError("no current benchmark scores: materialise benchmark_scores for some recipes "
                                    "(after their clip_checkpoint) first")
        storage.catalog.write(lambda con: write_lineage(con, LineageRow(
            "recipe_comparison", None, [f"benchmark_scores/{r}" for r in dict.fromkeys(shown)],
            context.run.run_id, "recipe_comparison-2", tr.config_hash())))
        storage.catalog.refresh_views(wh)
        return MaterializeResult(metadata=metadata)

    return [eval_sets, training_set, clip_checkpoint, benchmark_scores, recipe_comparison]


def _train_data(wh, members: pd.DataFrame, patches: str, cfg: StudentConfig, saliency: SaliencySettings,
                negatives_from: list[str] | None = None) -> TrainData:
    """Images of the members (decoded once, uint8) in member order, tokenised captions, kept sets,
    and with `negatives_from` (class names) each caption's vocabulary-swap hard negative.

    Kept sets are stored on the governor's patch grid. When the student's grid differs (e.g. a
    14×14 ViT-B/16 governor and an 8×8 student), the stored saliency map is resampled to the
    student's grid and its top ⌈ρN⌉ patches are kept instead."""
    position = {sid: i for i, sid in enumerate(members.sample_id)}
    size = cfg.arch.image_size
    images = torch.zeros((len(members), 3, size, size), dtype=torch.uint8)
    for drop in sorted(set(members.drop_id)):
        wanted = list(members.sample_id[members.drop_id == drop])
        raw = wh.read_table("raw_samples", drop, columns=["sample_id", "image"], filters=[("sample_id", "in", wanted)])
        for sid, data in zip(raw.column("sample_id").to_pylist(), raw.column("image").to_pylist()):
            images[position[sid]] = to_uint8_chw(load_rgb(data), size)
    tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
    tokens = tokenizer(list(members.train_caption))
    kept = None
    if patches == "saliency":
        kept = torch.tensor(np.stack([np.asarray(k, dtype=np.int16) for k in _kept_on_student_grid(
            wh, members, (cfg.arch.grid, cfg.arch.grid), saliency)]))
    data = TrainData(images, tokens, kept, patches)
    if negatives_from:
        data.negatives, data.has_negative = swap_negative_tokens(list(members.train_caption), negatives_from,
                                                                 tokenizer)
    return data


def _kept_on_student_grid(wh, members: pd.DataFrame, grid: tuple[int, int], saliency: SaliencySettings) -> list:
    kept = list(members.kept)
    for drop in sorted(set(members.drop_id)):
        wanted = list(members.sample_id[members.drop_id == drop])
        table = wh.read_table("patch_saliency", drop, columns=["sample_id", "grid_h", "grid_w", saliency.method],
                              filters=[("sample_id", "in", wanted)])
        if not len(table):
            continue
        stored = (int(table.column("grid_h")[0].as_py()), int(table.column("grid_w")[0].as_py()))
        if stored == grid:
            continue  # the stored kept sets are on the student's grid already (their K is checked at training)
        maps = np.stack([np.asarray(v, dtype=np.float32) for v in table.column(saliency.method).to_pylist()])
        where = {sid: i for i, sid in enumerate(members.sample_id)}
        for sid, k in zip(table.column("sample_id").to_pylist(), kept_on_grid(maps, stored, grid, saliency.rho)):
            kept[where[sid]] = k
    return kept


def _eval_set(wh, tokenizer, cfg: StudentConfig, vocab: ClassVocabulary):
    ev = load_eval_set(wh.read_table("eval_sets", "retrieval", ["caption", "image", "status"]),
                       wh.read_table("eval_sets", "classification", ["label", "image", "status"]),
                       tokenizer, cfg.arch.image_size, vocab.names, vocab.attributes)
    ev.class_templates = vocab.templates
    return ev


BUDGETS = ("tokens", "wallclock")

# The current checkpoint of each recipe, seed and budget; scores of any other checkpoint are stale
# (the checkpoint was retrained after it was scored) and never enter the comparison.
CURRENT_CHECKPOINTS_SQL = """
SELECT * FROM checkpoints
QUALIFY row_number() OVER (PARTITION BY recipe, seed, budget ORDER BY lineage_seq DESC NULLS LAST, created_at DESC) = 1
"""


def comparison_table(storage: StorageResource, budget: str = "tokens") -> pd.DataFrame:
    """One row per recipe at one budget: mean and sample std over seeds of every headline metric,
    and the tokens, samples and seconds each run really used. Empty when nothing was scored."""
    current = f"SELECT * FROM ({CURRENT_CHECKPOINTS_SQL}) WHERE budget = '{budget}'"
    scores = storage.catalog.query(f"SELECT b.recipe, b.seed, b.metric, b.value FROM benchmark_scores b "
                                   f"JOIN ({current}) c USING (checkpoint_id, recipe, seed)")
    ckpts = storage.catalog.query(f"SELECT c.recipe, c.seed, tokens_seen, samples_seen, wall_seconds, record "
                                  f"FROM ({current}) c SEMI JOIN benchmark_scores b USING (checkpoint_id)")
    if scores.empty:
        return pd.DataFrame()
    ckpts["step_seconds"] = ckpts.record.map(lambda r: json.loads(r)["phases"][0]["step_seconds"])
    # the precision the run trained in (with "native", the one timed faster); rows recorded before it was kept: fp32
    ckpts["precision"] = ckpts.record.map(lambda r: json.loads(r).get("precision", "fp32"))
    rows = []
    for recipe in [r for r in RECIPE_NAMES if r in set(scores.recipe)]:
        s = scores[scores.recipe == recipe]
        c = ckpts[ckpts.recipe == recipe]
        row = {"recipe": recipe, "budget": budget, "seeds": s.seed.nunique(), "tokens_seen": int(c.tokens_seen.mean()),
               "samples_seen": int(c.samples_seen.mean()), "step_seconds": float(c.step_seconds.mean()),
               "wall_seconds": float(c.wall_seconds.mean()), "precision": "/".join(sorted(set(c.precision)))}
        for m in HEADLINE:
            v = s[s.metric == m].value
            row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


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


def format_comparison(table: pd.DataFrame) -> str:
    return markdown_table(comparison_rows(table), max_chars=20)


def learning_curves(storage: StorageResource, budget: str = "tokens", metric: str = "t2i_r@1") -> dict:
    """recipe -> [(tokens in millions, or training seconds; metric averaged over seeds)]."""
    ckpts = storage.catalog.query(f"SELECT recipe, record FROM ({CURRENT_CHECKPOINTS_SQL}) WHERE budget = ? "
                                  f"ORDER BY recipe, seed", [budget])
    curves: dict[str, dict[int, list]] = {}
    for row in ckpts.itertuples():
        for i, p in enumerate(json.loads(row.record)["learning_curve"]):
            x = p["tokens_seen"] / 1e6 if budget == "tokens" else p.get("train_seconds", 0.0)
            curves.setdefault(row.recipe, {}).setdefault(i, []).append((x, p[metric]))
    return {r: [(float(np.mean([x for x, _ in pts])), float(np.mean([y for _, y in pts]))) for pts in by_point.values()]
            for r, by_point in curves.items()}
