"""Lineage history in the catalog: append-only rows, the current view, the schema upgrade, tracing
an old checkpoint to what it was trained on, and the comparison skipping stale scores."""
import json

import pandas as pd
import pytest

from juicer_pipeline.storage import (Catalog, LineageRow, replace_checkpoints, replace_drop, replace_training_set,
                                     write_lineage)
from juicer_pipeline.storage.schema import MIGRATIONS
from juicer_pipeline.storage.lineage import trace_back

PER_DROP = ("raw_samples", "patch_saliency", "pruned_images", "extracted_classes", "sieve_scores", "enriched_captions")


def _lineage(asset, partition, run, governor=None, version="v1"):
    return LineageRow(asset, partition, [], run, version, "cfg", governor)


def test_lineage_is_append_only_with_a_current_view(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    cat.migrate()
    cat.write(lambda con: write_lineage(con, _lineage("raw_samples", "d1", "run-1")))
    cat.write(lambda con: write_lineage(con, _lineage("raw_samples", "d1", "run-2", version="v2")))
    cat.write(lambda con: write_lineage(con, _lineage("governor", None, "run-3")))
    history = cat.query("SELECT run_id FROM lineage WHERE artifact = 'raw_samples/d1' ORDER BY seq")
    assert list(history.run_id) == ["run-1", "run-2"]  # never overwritten
    current = cat.query("SELECT artifact, run_id, code_version FROM lineage_current ORDER BY artifact")
    assert current.to_dict("records") == [{"artifact": "governor", "run_id": "run-3", "code_version": "v1"},
                                          {"artifact": "raw_samples/d1", "run_id": "run-2", "code_version": "v2"}]


def test_an_existing_catalog_upgrades_in_place(tmp_path):
    path = tmp_path / "c.duckdb"
    cat = Catalog(path)
    with cat.transaction() as con:  # a catalog as the previous release left it (schema version 3)
        con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
        for version, sql in MIGRATIONS[:3]:
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
        con.execute("INSERT INTO lineage VALUES ('governor', 'governor', NULL, '[]', 'old-run', 'g-1', 'h', 'gov-a', now())")
        con.execute("INSERT INTO checkpoints VALUES ('ck', 'raw', 0, 'ts', 'p', 'h', 1, 1, 1.0, 0.5, '{}', now())")
    assert cat.migrate() == max(v for v, _ in MIGRATIONS) and cat.migrate() == max(v for v, _ in MIGRATIONS)
    kept = cat.query("SELECT seq, run_id, governor_id FROM lineage")
    assert kept.to_dict("records") == [{"seq": 1, "run_id": "old-run", "governor_id": "gov-a"}]
    assert cat.query("SELECT lineage_seq FROM checkpoints").lineage_seq[0] == 1
    assert cat.write(lambda con: write_lineage(con, _lineage("governor", None, "new-run"))) == 2
    assert cat.query("SELECT run_id FROM lineage_current").run_id[0] == "new-run"


def _juice_drop(con, drop: str, run: str, governor: str) -> None:
    for asset in PER_DROP:
        write_lineage(con, _lineage(asset, drop, run, governor if asset == "enriched_captions" else None))


def _train(con, recipe: str, ts_id: str, ckpt_id: str, run: str, caption: str) -> None:
    ts = {"training_set_id": ts_id, "recipe": recipe, "n_members": 1, "excluded": "{}", "drops": '["d1"]',
          "config_hash": "h"}
    members = pd.DataFrame({"training_set_id": [ts_id], "recipe": [recipe], "sample_id": ["d1/a"],
                            "caption_version": ["enriched"], "caption": [caption], "kept_patches": ["all"]})
    replace_training_set(con, ts, members)
    write_lineage(con, _lineage("training_set", recipe, run))
    ckpt = {"checkpoint_id": ckpt_id, "recipe": recipe, "seed": 0, "training_set_id": ts_id, "path": "p",
            "config_hash": "h", "tokens_seen": 1, "samples_seen": 1, "wall_seconds": 1.0, "final_loss": 0.1,
            "record": json.dumps({"phases": [{"step_seconds": 0.1}]})}
    replace_checkpoints(con, recipe, [(ckpt, _lineage("clip_checkpoint", f"{recipe}/seed0", run))])


@pytest.fixture
def history(tmp_path):
    """An old checkpoint of `raw` (governor A, run-1); later the drop is re-juiced with governor B
    and `raw`'s training set rebuilt (run-2), but `raw` is not retrained; `flip` is trained after."""
    cat = Catalog(tmp_path / "c.duckdb")
    cat.migrate()
    samples = tmp_path / "samples.parquet"
    pd.DataFrame({"sample_id": ["d1/a"], "drop_id": ["d1"], "local_id": ["a"], "content_hash": ["h"], "path": ["a.png"],
                  "width": [8], "height": [8], "n_bytes": [1], "raw_caption": ["x"], "status": ["valid"],
                  "quarantine_reason": [None]}).to_parquet(samples)
    drop = {"drop_id": "d1", "path": "d1", "format": "folder", "sources": [], "n_samples": 1, "n_valid": 1,
            "n_quarantined": 0, "bytes": 1}

    def juice_and_train_raw(con):
        replace_drop(con, drop, samples)
        write_lineage(con, _lineage("governor", None, "run-1", "gov-A"))
        _juice_drop(con, "d1", "run-1", "gov-A")
        _train(con, "raw", "ts-old", "ck-old", "run-1", "old caption")

    def rejuice(con):
        write_lineage(con, _lineage("governor", None, "run-2", "gov-B"))
        _juice_drop(con, "d1", "run-2", "gov-B")
        replace_training_set(con, {"training_set_id": "ts-new", "recipe": "raw", "n_members": 1, "excluded": "{}",
                                   "drops": '["d1"]', "config_hash": "h"},
                             pd.DataFrame({"training_set_id": ["ts-new"], "recipe": ["raw"], "sample_id": ["d1/a"],
                                           "caption_version": ["enriched"], "caption": ["new caption"],
                                           "kept_patches": ["all"]}))
        write_lineage(con, _lineage("training_set", "raw", "run-2"))
        _train(con, "flip", "ts-flip", "ck-flip", "run-3", "flip caption")

    cat.write(juice_and_train_raw)
    cat.write(rejuice)
    return cat


def test_old_checkpoint_traces_to_the_versions_it_was_trained_on(history):
    back = trace_back(history, "ck-old")
    assert back["training_set_id"] == "ts-old" and list(back["members"].caption) == ["old caption"]
    assert set(back["members"].governor_id) == {"gov-A"}
    lineage = back["lineage"].set_index("artifact")
    assert lineage.loc["governor", "governor_id"] == "gov-A"
    assert set(lineage.run_id) == {"run-1"}, lineage  # every artifact as it was when ck-old was trained
    assert {"enriched_captions/d1", "training_set/raw", "clip_checkpoint/raw/seed0"} <= set(lineage.index)


def test_new_checkpoint_traces_to_the_current_versions(history):
    back = trace_back(history, "ck-flip")
    assert set(back["members"].governor_id) == {"gov-B"}
    lineage = back["lineage"].set_index("artifact")
    assert lineage.loc["governor", "governor_id"] == "gov-B" and lineage.loc["clip_checkpoint/flip/seed0", "run_id"] == "run-3"


def test_a_rebuilt_training_set_drops_the_old_one_once_no_checkpoint_uses_it(history):
    assert set(history.query("SELECT training_set_id FROM training_sets").training_set_id) == {"ts-old", "ts-new",
                                                                                               "ts-flip"}
    history.write(lambda con: _train(con, "raw", "ts-new", "ck-new", "run-4", "new caption"))
    assert "ts-old" not in set(history.query("SELECT training_set_id FROM training_sets").training_set_id)
    assert set(history.query("SELECT DISTINCT training_set_id FROM training_set_members WHERE recipe = 'raw'")
               .training_set_id) == {"ts-new"}


def test_comparison_table_skips_stale_scores(tmp_path):
    from juicer_pipeline.assets.resources import StorageResource
    from juicer_pipeline.storage.results import comparison_table

    storage = StorageResource(data_dir=str(tmp_path))
    cat = storage.catalog
    cat.migrate()

    def score(con, recipe, ckpt, value):
        con.execute("INSERT INTO benchmark_scores VALUES (?, ?, ?, 0, 'top1', ?, 'world-heldout', now())",
                    [f"{ckpt}:top1", ckpt, recipe, value])

    def scored(con):
        for recipe in ("raw", "flip"):
            _train(con, recipe, f"ts-{recipe}", f"ck-{recipe}", "run-1", "c")
            score(con, recipe, f"ck-{recipe}", 0.5)

    cat.write(scored)
    # flip is retrained; its scores still belong to the checkpoint it replaced
    cat.write(lambda con: _train(con, "flip", "ts-flip2", "ck-flip2", "run-2", "c"))
    table = comparison_table(cat)
    assert list(table.recipe) == ["raw"] and table.top1_mean[0] == 0.5
    cat.write(lambda con: score(con, "flip", "ck-flip2", 0.9))
    table = comparison_table(cat).set_index("recipe")
    assert table.loc["flip", "top1_mean"] == 0.9 and table.loc["flip", "seeds"] == 1


def test_dense_rows_show_the_dense_scores_and_a_dash_where_a_recipe_has_none(tmp_path):
    from juicer_pipeline.assets.resources import StorageResource
    from juicer_pipeline.storage.results import DENSE_HEADLINE, comparison_table, dense_rows

    storage = StorageResource(data_dir=str(tmp_path))
    cat = storage.catalog
    cat.migrate()

    def scored(recipe, metrics):
        def write(con):
            _train(con, recipe, f"ts-{recipe}", f"ck-{recipe}", "run-1", "c")
            for m in metrics:
                con.execute("INSERT INTO benchmark_scores VALUES (?, ?, ?, 0, ?, 0.25, 'world-heldout', now())",
                            [f"ck-{recipe}:{m}", f"ck-{recipe}", recipe, m])
        return write

    cat.write(scored("raw", ["top1"]))  # scored before the dense evaluation existed
    assert dense_rows(comparison_table(cat)) == []  # then there is no dense table at all
    cat.write(scored("flip", ["top1", *DENSE_HEADLINE]))
    rows = {r["recipe"]: r for r in dense_rows(comparison_table(cat))}
    assert rows["flip"]["seg_blocks_miou"] == "25.0 ± 0.0" and rows["flip"]["binding_group"] == "25.0 ± 0.0"
    assert rows["raw"]["seg_blocks_miou"] == "-"
