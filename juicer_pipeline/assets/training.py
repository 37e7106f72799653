"""Across drops: a training set per recipe, and the student checkpoints trained on it."""
import hashlib
import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from dagster import (AllPartitionMapping, AssetDep, AssetExecutionContext, MaterializeResult, MetadataValue,
                     StaticPartitionsDefinition, asset)
from open_clip.tokenizer import SimpleTokenizer

from ..governance.hard_negatives import swap_negative_tokens
from ..governance.images import load_rgb, to_uint8_chw
from ..governance.pruning import kept_on_grid
from ..governance.recipes import RECIPE_NAMES, RECIPES
from ..governance.training_set import assemble_training_set
from ..models.loader import save_world_clip
from ..settings import JuicerSettings, SaliencySettings, code_version
from ..storage import LineageRow, replace_checkpoints, replace_training_set, write_lineage
from ..storage.lineage import checkpoint_run_name
from ..storage.training_inputs import PER_DROP_INPUTS, deleted_drops, held_out_images, juiced_samples
from ..training import StudentConfig, TrainData, evaluate_student, held_out_eval_set, student_config, train_student
from ..training.distributed import train_student_processes
from .asset_lineage import asset_version
from .resources import StorageResource
from .ui import line_chart, markdown_table, metadata_table, png_markdown
from .vocabulary import class_vocabulary, vocabulary_fingerprint

recipe_partitions = StaticPartitionsDefinition(RECIPE_NAMES)

__all__ = ["PER_DROP_INPUTS", "build_training_assets", "juiced_drops", "recipe_partitions"]


def build_training_assets(settings: JuicerSettings, eval_sets) -> list:
    """training_set and clip_checkpoint per recipe, downstream of the per-drop assets and `eval_sets`."""
    training_set = _training_set_asset(settings, eval_sets)
    return [training_set, _clip_checkpoint_asset(settings, training_set, eval_sets)]


def juiced_drops(storage: StorageResource) -> tuple[list[str], list[str]]:
    """(drops with every per-drop input of a training set materialised, those of them left out
    because the drop sensor found their folder deleted)."""
    names = [set(storage.warehouse.partitions(a)) for a in PER_DROP_INPUTS]
    juiced = set.intersection(*names) if names else set()
    deleted = deleted_drops(storage.catalog)
    return sorted(juiced - deleted), sorted(juiced & deleted)


def _training_set_id(recipe: str, members: pd.DataFrame) -> str:
    h = hashlib.sha256(f"{recipe}\n".encode())
    for sid, cap, kept in zip(members.sample_id, members.train_caption, members.kept):
        h.update(f"{sid}\t{cap}\t{'' if kept is None else ','.join(map(str, kept))}\n".encode())
    return h.hexdigest()


def _training_set_asset(settings: JuicerSettings, eval_sets):
    tr = settings.training

    @asset(partitions_def=recipe_partitions, group_name="training", kinds={"parquet", "duckdb"},
           deps=[*(AssetDep(a, partition_mapping=AllPartitionMapping()) for a in PER_DROP_INPUTS), eval_sets],
           code_version=code_version("training_set-3", tr.sieve_fraction),
           description="A recipe's training set from every juiced drop: sample ids, caption versions and kept-patch "
                       "sets, without quarantined samples, cross-drop duplicates or evaluation images.")
    def training_set(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        recipe = RECIPES[context.partition_key]
        drops, deleted = juiced_drops(storage)
        if deleted:
            context.log.warning(f"left out drop(s) whose folder was deleted: {', '.join(deleted)}")
        if not drops:
            raise FileNotFoundError("no juiced drop yet: materialise the per-drop assets (job juice_drop) first")
        members, excluded = _assemble(context, storage, recipe, drops, tr.sieve_fraction)
        ts_id = _training_set_id(recipe.name, members)
        _write_training_set(storage.warehouse, recipe.name, ts_id, members, excluded)
        old = storage.catalog.write(lambda con: _record_training_set(
            con, context, recipe.name, ts_id, members, drops, excluded, tr.config_hash()))
        if old:
            context.log.info(f"replaced training set(s) {', '.join(o[:12] for o in old)} of {recipe.name}")
        why = Counter(excluded.reason)
        return MaterializeResult(metadata={
            "training_set_id": ts_id, "recipe": recipe.name, "description": recipe.description,
            "members": len(members), "drops": ", ".join(drops),
            "excluded_by_reason": MetadataValue.md(markdown_table([{"reason": k, "count": v}
                                                                   for k, v in why.most_common()]))})

    return training_set


def _assemble(context, storage: StorageResource, recipe, drops: list[str], sieve_fraction: float):
    """(members, excluded) of the recipe over the drops, held-out images left out by hash and thumbprint."""
    evals = held_out_images(storage.warehouse)
    eval_prints = [bytes(p) for p in evals.thumbprint if isinstance(p, (bytes, bytearray))]
    if len(eval_prints) < len(evals):
        context.log.warning(f"{len(evals) - len(eval_prints)} evaluation images have no thumbprint (ingested "
                            f"before near-duplicate guarding): re-materialise eval_sets")
    return assemble_training_set(recipe, juiced_samples(storage.warehouse, drops), set(evals.content_hash),
                                 sieve_fraction, eval_prints)


def _write_training_set(wh, recipe: str, ts_id: str, members: pd.DataFrame, excluded: pd.DataFrame) -> None:
    wh.write_table("training_set", recipe, pa.Table.from_pandas(members.assign(training_set_id=ts_id),
                                                                preserve_index=False))
    wh.write_table("training_set_excluded", recipe,
                   pa.Table.from_pandas(excluded.assign(recipe=recipe), preserve_index=False))


def _record_training_set(con, context, recipe: str, ts_id: str, members: pd.DataFrame, drops: list[str],
                         excluded: pd.DataFrame, config_hash: str) -> list[str]:
    """The catalog's training set rows and lineage, in one transaction; returns the ids superseded."""
    kept_text = [("all" if p == "all" else "random") if k is None else ",".join(map(str, k))
                 for p, k in zip(members.patches, members.kept)]
    rows = pd.DataFrame({"training_set_id": ts_id, "recipe": recipe, "sample_id": members.sample_id,
                         "caption_version": members.caption_version, "caption": members.train_caption,
                         "kept_patches": kept_text})
    ts = {"training_set_id": ts_id, "recipe": recipe, "n_members": len(members),
          "excluded": json.dumps(dict(Counter(excluded.reason))), "drops": json.dumps(drops),
          "config_hash": config_hash}
    write_lineage(con, LineageRow("training_set", recipe, [f"{a}/{d}" for d in drops for a in PER_DROP_INPUTS]
                                  + ["eval_sets"], context.run.run_id, asset_version(context), config_hash))
    return replace_training_set(con, ts, rows)


def _arch_hash(cfg: StudentConfig) -> str:
    """The student architecture's own hash: a student JSON file edited in place changes it."""
    return hashlib.sha256(json.dumps(cfg.arch.to_dict(), sort_keys=True).encode()).hexdigest()


def _clip_checkpoint_asset(settings: JuicerSettings, training_set, eval_sets):
    tr = settings.training
    cfg = student_config(settings)
    budgets = [cfg] + ([student_config(settings, wallclock=True)] if tr.wallclock_s else [])
    negatives_version = [settings.classes, vocabulary_fingerprint(settings.classes)] if tr.hard_negatives else []

    @asset(partitions_def=recipe_partitions, deps=[training_set, eval_sets], group_name="training",
           code_version=code_version("clip_checkpoint-2", tr, settings.saliency, _arch_hash(cfg), *negatives_version),
           kinds={"pytorch"},
           description="Student CLIPs (one per seed) trained with the contrastive loss at an equal budget of "
                       "vision tokens, and with `training.wallclock_s` also at an equal wall-clock budget; "
                       "pruned recipes feed the vision tower only the kept patch tokens.")
    def clip_checkpoint(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
        recipe = RECIPES[context.partition_key]
        wh = storage.warehouse
        members = wh.read_table("training_set", recipe.name).to_pandas()
        vocab = class_vocabulary(settings.classes)
        data = train_data(wh, members, recipe.patches, cfg, settings.saliency,
                          negatives_from=list(vocab.names) if tr.hard_negatives else None)
        tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
        ev = held_out_eval_set(wh, tokenizer, cfg.arch.image_size, vocab)
        ts_id = members.training_set_id.iloc[0]
        rows = [_train_one(context, wh, recipe.name, ts_id, data, run_cfg, seed, tokenizer, ev, tr)
                for seed in tr.seeds for run_cfg in budgets]
        storage.catalog.write(lambda con: replace_checkpoints(con, recipe.name, [
            _checkpoint_record(r, recipe.name, ts_id, context, tr.config_hash()) for r in rows]))
        first = rows[0]
        return MaterializeResult(metadata={
            "recipe": recipe.name, "training_set_id": ts_id, "runs_trained": len(rows),
            "tokens_seen": first["tokens_seen"], "samples_seen": first["samples_seen"],
            "runs": metadata_table([_run_summary(r) for r in rows]),
            "loss_curve": MetadataValue.md(png_markdown(line_chart(
                first["loss_curve"], title=f"{recipe.name} loss, {first['name']}")))})

    return clip_checkpoint


def _train_one(context, wh, recipe: str, ts_id: str, data: TrainData, run_cfg: StudentConfig, seed: int,
               tokenizer, ev, tr) -> dict:
    """Train one seed at one budget (in this process, or data-parallel under torchrun) and store it."""
    name = checkpoint_run_name(seed, run_cfg.budget)
    context.log.info(f"{recipe}: training {name} ({run_cfg.budget} budget) on {len(data.images)} samples")
    if tr.processes > 1:  # torch DDP under torchrun; the same global batch, loss and budget
        model, record = train_student_processes(data, run_cfg, seed, tr.processes, eval_set=ev,
                                                progress=context.log.info, timeout_s=tr.collective_timeout_s,
                                                scratch=wh.root / "scratch")
    else:
        model, record = train_student(data, run_cfg, seed, progress=context.log.info,
                                      evaluate=lambda m: evaluate_student(m, tokenizer, ev, run_cfg.device))
    path = wh.object_path("clip_checkpoint", f"{recipe}/{name}.safetensors")
    with wh.writing(path) as tmp:
        ckpt_id = save_world_clip(model, run_cfg.arch, tmp, {"recipe": recipe, "seed": seed,
                                                              "training_set_id": ts_id, **record})
    return {"checkpoint_id": ckpt_id, "name": name, "path": str(path), **record}


def _checkpoint_record(r: dict, recipe: str, ts_id: str, context, config_hash: str) -> tuple[dict, LineageRow]:
    """A trained run as its checkpoints row and lineage row."""
    row = {"checkpoint_id": r["checkpoint_id"], "recipe": recipe, "seed": r["seed"], "training_set_id": ts_id,
           "path": r["path"], "config_hash": config_hash,
           **{k: r[k] for k in ("tokens_seen", "samples_seen", "wall_seconds", "final_loss")},
           "record": json.dumps({**{k: r[k] for k in ("phases", "learning_curve", "steps", "train_samples")},
                                 "precision": r["config"]["precision"]}),
           "budget": r["budget"]}
    return row, LineageRow("clip_checkpoint", f"{recipe}/{r['name']}",
                           [f"training_set/{recipe}", f"training_set_id:{ts_id}"],
                           context.run.run_id, asset_version(context), config_hash)


def _run_summary(r: dict) -> dict:
    return {"run": r["name"], "budget": r["budget"], "checkpoint": r["checkpoint_id"][:12],
            "tokens_seen": r["tokens_seen"], "samples_seen": r["samples_seen"], "steps": r["steps"],
            "wall_s": round(r["wall_seconds"], 1),
            "step_s": " / ".join(f"{p['step_seconds']:.3f}" for p in r["phases"]),
            "final_loss": round(r["final_loss"], 3)}


def train_data(wh, members: pd.DataFrame, patches: str, cfg: StudentConfig, saliency: SaliencySettings,
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
