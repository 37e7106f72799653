"""The cross-drop training assets end to end, at a tiny budget, with a tiny governor."""
import json
import shutil

import pandas as pd
import pytest
import torch

from juicer_pipeline.definitions import COMPARE_JOB_NAME, GOVERNOR_JOB_NAME, RECIPES_JOB_NAME, build_definitions
from juicer_pipeline.models.world_clip import tiny_arch
from juicer_pipeline.settings import ClassSettings, GovernorSettings, JuicerSettings, TrainingSettings
from juicer_pipeline.storage import Catalog
from juicer_pipeline.storage.results import DENSE_HEADLINE
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import run_drop, tiny_governor_world, write_folder_drop

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
RECIPES = ("raw", "flip", "sieve_then_juice")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dagster import instance_for_test

    root = tmp_path_factory.mktemp("train") / "data"
    tiny_governor_world(root, 120)
    generate_drop(root / "drops" / "d1", DropConfig(n_samples=160, seed=1))
    # a drop that carries an evaluation image again: it must never reach a training set
    eval_image = sorted((root / "world" / "evalsets" / "retrieval" / "images").iterdir())[0]
    write_folder_drop(root / "drops" / "leak", {"x.png": eval_image.read_bytes()},
                      [{"image": "x.png", "caption": "a red star", "sample_id": "x"}])
    # a student on a coarser grid (4x4 patches of 16 px) than the governor's (8x8): kept sets are
    # resampled from the stored saliency maps
    student = root / "student.json"
    student.write_text(json.dumps(tiny_arch(image_size=64, patch_size=16, vision_layers=1, conv_stem=True).to_dict()))
    settings = JuicerSettings(
        governor=GovernorSettings(source=f"file:{root / 'tiny.safetensors'}", batch_size=64),
        classes=ClassSettings(calibration_images=20),
        training=TrainingSettings(seeds=[0, 1], budget_full_steps=4, batch_size=32, student=str(student),
                                  eval_points=1, wallclock_s=1.0, hard_negatives=True))
    defs = build_definitions(settings, root)
    with instance_for_test() as inst:
        assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=inst, run_config=QUIET).success
        for drop in ("d1", "leak"):
            assert run_drop(root, inst, drop, settings, assets=None).success
        train_runs = {}
        for recipe in RECIPES:
            run = defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(
                instance=inst, partition_key=recipe, run_config=QUIET)
            assert run.success
            train_runs[recipe] = run.run_id
        result = defs.resolve_job_def(COMPARE_JOB_NAME).execute_in_process(instance=inst, run_config=QUIET)
    result.train_runs = train_runs  # the Dagster run that trained each recipe, for lineage tests
    yield root, result
    shutil.rmtree(root, ignore_errors=True)


def test_evaluation_image_dropped_again_is_held_out(trained):
    root, _ = trained
    cat = Catalog(root / "catalog.duckdb")
    members = cat.query("SELECT sample_id FROM training_set_members")
    assert "leak/x" not in set(members.sample_id)
    excluded = pd.read_parquet(root / "warehouse" / "training_set_excluded")
    assert set(excluded[excluded.sample_id == "leak/x"].reason) == {"held_out"}


def test_equal_token_budget_and_catalog_records(trained):
    root, _ = trained
    cat = Catalog(root / "catalog.duckdb")
    ck = cat.query("SELECT recipe, seed, tokens_seen, samples_seen, record FROM checkpoints WHERE budget = 'tokens' "
                   "ORDER BY recipe, seed")
    assert len(ck) == len(RECIPES) * 2
    assert ck.tokens_seen.max() - ck.tokens_seen.min() <= 32 * 17  # within one batch of full patches + CLS
    # the student's 16 patches: pruned recipes fed ⌈0.5 x 16⌉ = 8 + CLS tokens, whatever the governor's grid
    phases = {r.recipe: json.loads(r.record)["phases"] for r in ck.itertuples()}
    assert phases["sieve_then_juice"][0]["tokens_per_image"] == 9 and phases["raw"][0]["tokens_per_image"] == 17
    samples = ck.groupby("recipe").samples_seen.first()
    assert samples["flip"] > samples["raw"] and samples["sieve_then_juice"] > samples["raw"]
    scores = cat.query("SELECT recipe, metric, count(*) AS n FROM benchmark_scores GROUP BY ALL")
    assert set(scores.recipe) == set(RECIPES) and (scores.n == 4).all()  # 2 seeds x 2 budgets
    assert {"i2t_r@1", "t2i_r@10", "top1", "top5"} <= set(scores.metric)
    assert set(DENSE_HEADLINE) <= set(scores.metric)  # the dense scores: rows of the same table
    dense = cat.query("SELECT metric, value FROM benchmark_scores WHERE metric LIKE 'dense_%'")
    assert dense.value.between(0, 1).all() and "dense_seconds" not in set(dense.metric)
    sets = cat.query("SELECT recipe, n_members FROM training_sets").set_index("recipe").n_members
    assert sets["sieve_then_juice"] < sets["raw"]
    kept = cat.query("SELECT DISTINCT kept_patches FROM training_set_members WHERE recipe = 'sieve_then_juice'")
    assert all(len(k.split(",")) == 32 for k in kept.kept_patches)  # as stored, on the governor's 8x8 grid


def test_training_data_carries_a_swap_negative_for_every_caption_that_names_a_class(trained):
    from juicer_pipeline.assets.training import train_data
    from juicer_pipeline.training import student_config
    from juicer_pipeline.storage import Warehouse
    from juicer_pipeline.world.vocabulary import load_vocabulary

    root, _ = trained
    wh = Warehouse(root)
    members = wh.read_table("training_set", "raw").to_pandas()
    settings = JuicerSettings(training=TrainingSettings(student=str(root / "student.json"), hard_negatives=True))
    names = list(load_vocabulary().shapes)
    data = train_data(wh, members, "all", student_config(settings), settings.saliency, negatives_from=names)
    names_a_class = torch.tensor([any(n in c.lower() for n in names) for c in members.train_caption])  # plurals too
    differ = (data.negatives != data.tokens).any(dim=1)
    # a row has a negative exactly when its caption names a class within the tokenizer's context
    assert data.has_negative.tolist() == (names_a_class & differ).tolist()
    assert data.has_negative.sum() > 0.8 * len(members) and data.negatives.shape == data.tokens.shape


def test_equal_wallclock_runs_are_recorded_beside_the_token_runs(trained):
    root, _ = trained
    ck = Catalog(root / "catalog.duckdb").query("SELECT recipe, budget, wall_seconds, tokens_seen FROM checkpoints")
    assert sorted(ck.groupby("budget").size().items()) == [("tokens", 6), ("wallclock", 6)]
    clock = ck[ck.budget == "wallclock"]
    assert (clock.wall_seconds >= 1.0).all()  # every recipe trained for the same measured second


def test_comparison_tables_and_learning_curves(trained):
    root, result = trained
    meta = result.asset_materializations_for_node("recipe_comparison")[0].metadata
    for budget in ("tokens", "wallclock"):
        table = meta[f"equal_{budget}"].value  # a Dagster table: rendered inline and sortable in the UI
        assert [r.data["recipe"] for r in table.records] == list(RECIPES)
        assert {"t2i_r@1", "top1", "tokens", "wall s", "precision"} <= {c.name for c in table.schema.columns}
        assert "±" in table.records[0].data["top1"]
        assert {r.data["precision"] for r in table.records} == {"fp32"}  # the settings' default, as trained
        dense = meta[f"dense_{budget}"].value  # the dense scores: an inline table of their own
        assert [r.data["recipe"] for r in dense.records] == list(RECIPES)
        assert {m.removeprefix("dense_") for m in DENSE_HEADLINE} <= {c.name for c in dense.schema.columns}
        assert "±" in dense.records[0].data["seg_blocks_miou"]
        assert "learning_curves_" + budget in meta
        assert (root / "warehouse" / "recipe_comparison" / f"learning_curves_{budget}.png").stat().st_size > 500


def test_lineage_both_directions(trained):
    from juicer_pipeline.storage.lineage import trace_back, trace_forward

    root, _ = trained
    cat = Catalog(root / "catalog.duckdb")
    score_id = cat.query("SELECT score_id FROM benchmark_scores WHERE recipe = 'sieve_then_juice' LIMIT 1").score_id[0]
    back = trace_back(cat, score_id)
    assert back["recipe"] == "sieve_then_juice" and back["drops"] == ["d1", "leak"]
    members = back["members"]
    import pandas as pd

    # each member carries what enrichment really did to its caption (enriched / cleaned / original)
    juiced = pd.concat([pd.read_parquet(root / "warehouse" / "enriched_captions" / f"{d}.parquet") for d in back["drops"]])
    version = dict(zip(juiced.sample_id, juiced.caption_version))
    assert members.caption_version.tolist() == [version[s] for s in members.sample_id]
    assert members.governor_id.notna().all()
    assert {"governor", "training_set/sieve_then_juice", "pruned_images/d1"} <= set(back["lineage"].artifact)
    assert back["lineage"].run_id.notna().all()
    member = members.sample_id.iloc[0]
    forward = trace_forward(cat, member)
    assert "sieve_then_juice" in set(forward["artifacts"].recipe)
    assert forward["artifacts"].scores.gt(0).all()
    held = trace_forward(cat, "leak/x")
    assert held["artifacts"].empty and set(held["excluded"].reason) == {"held_out"}
    with pytest.raises(KeyError):
        trace_back(cat, "no-such-checkpoint")


def test_checkpoints_are_traced_through_lineage_as_of_their_recording(trained):
    from juicer_pipeline.storage.lineage import trace_back

    root, _ = trained
    cat = Catalog(root / "catalog.duckdb")
    ckpts = cat.query("SELECT checkpoint_id, lineage_seq FROM checkpoints WHERE budget = 'tokens'")
    assert ckpts.lineage_seq.notna().all()  # where in the append-only lineage each was recorded
    back = trace_back(cat, ckpts.checkpoint_id[0])
    assert back["lineage"].seq.max() <= ckpts.lineage_seq[0]
    assert {"governor", "enriched_captions/d1", "clip_checkpoint/" + back["recipe"] + f"/seed{back['seed']}"} <= set(
        back["lineage"].artifact)
    # re-juicing the drop later appends rows; the trace of this checkpoint does not change
    cat.write(lambda con: con.execute("INSERT INTO lineage (artifact, asset, partition_key, inputs, run_id, "
                                      "code_version, config_hash, governor_id, created_at) VALUES ('enriched_captions/d1', "
                                      "'enriched_captions', 'd1', '[]', 'later-run', 'v', 'h', 'other', now())"))
    again = trace_back(cat, ckpts.checkpoint_id[0])
    assert again["lineage"].equals(back["lineage"]) and "later-run" not in set(again["members"].caption_run_id)
    assert cat.query("SELECT run_id FROM lineage_current WHERE artifact = 'enriched_captions/d1'").run_id[0] == "later-run"


def test_every_checkpoint_traces_to_its_own_run(trained):
    """Token-budget and wall-clock checkpoints of every seed: each trace names its own lineage row
    (`seed<n>` or `seed<n>-wallclock`), written by the run that trained it, as of its recording."""
    from juicer_pipeline.storage.lineage import checkpoint_artifact, trace_back

    root, result = trained
    cat = Catalog(root / "catalog.duckdb")
    ckpts = cat.query("SELECT checkpoint_id, recipe, seed, budget, lineage_seq FROM checkpoints ORDER BY recipe, seed")
    assert set(ckpts.budget) == {"tokens", "wallclock"}
    for c in ckpts.itertuples():
        own = checkpoint_artifact(c.recipe, c.seed, c.budget)
        assert own.endswith(f"/seed{c.seed}" + ("-wallclock" if c.budget == "wallclock" else ""))
        lineage = trace_back(cat, c.checkpoint_id)["lineage"]
        mine = lineage[lineage.artifact.str.startswith("clip_checkpoint/")]
        assert list(mine.artifact) == [own], (c, mine)
        assert mine.seq.iloc[0] == c.lineage_seq and mine.run_id.iloc[0] == result.train_runs[c.recipe]


def test_static_report(trained):
    from juicer_pipeline.report import write_report
    from juicer_pipeline.storage import Warehouse

    root, _ = trained
    page = write_report(Warehouse(root)).read_text()
    assert "Recipe comparison" in page and "data:image/png;base64" in page
    for recipe in RECIPES:
        assert f"<td>{recipe}</td>" in page
