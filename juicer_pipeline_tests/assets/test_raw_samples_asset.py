"""raw_samples through Dagster: catalog rows, lineage, idempotent re-materialisation, errors."""
import pandas as pd
import pytest

from juicer_pipeline.settings import IngestSettings, JuicerSettings
from juicer_pipeline.storage import Catalog, Warehouse

from ..helpers import png_bytes, run_drop, write_folder_drop


def _catalog(data_dir) -> Catalog:
    return Catalog(Warehouse(data_dir).catalog_path)


def test_world_drop_is_ingested_with_catalog_rows_and_lineage(data_dir, instance, world_drop):
    result = run_drop(data_dir, instance, "w1")
    assert result.success
    meta = result.asset_materializations_for_node("raw_samples")[0].metadata
    truth = pd.read_parquet(world_drop / "_truth.parquet")
    assert meta["samples"].value == len(truth) == 120
    broken = truth.corruptions.map(lambda c: any(x.startswith("broken:") for x in c)).sum()
    dups = truth.corruptions.map(lambda c: "duplicate" in c).sum()
    assert meta["quarantined"].value >= broken  # every broken file is caught
    assert "thumbnails" in meta and meta["thumbnails"].value.startswith("![")
    cat = _catalog(data_dir)
    samples = cat.query("SELECT * FROM samples")
    assert len(samples) == 120 and samples.sample_id.is_unique
    quarantined = samples[samples.status == "quarantined"]
    assert quarantined.quarantine_reason.notna().all()
    # duplicates of a valid image are caught as duplicate_content (unless the copy itself is broken)
    assert (quarantined.quarantine_reason == "duplicate_content").sum() <= dups
    lineage = cat.query("SELECT * FROM lineage_current WHERE artifact = 'raw_samples/w1'")
    assert len(lineage) == 1 and lineage.run_id[0] == result.run_id
    assert lineage.code_version[0].startswith("ingest-3+")
    view = cat.query("SELECT count(*) AS n, count(image) AS with_image FROM raw_samples")
    assert view.n[0] == 120 and view.with_image[0] == meta["valid"].value
    # min/max statistics for the columns readers filter on, none for image bytes and thumbprints
    # (the writer would hold two of each per row group until it closes)
    stats = Warehouse(data_dir).parquet_file("raw_samples", "w1").metadata.row_group(0)
    with_stats = {stats.column(i).path_in_schema for i in range(stats.num_columns) if stats.column(i).is_stats_set}
    assert {"sample_id", "content_hash", "status"} <= with_stats and not {"image", "thumbprint"} & with_stats


def test_rematerialising_replaces_exactly_that_partition(data_dir, instance, world_drop):
    write_folder_drop(data_dir / "drops" / "other", {"a.png": png_bytes()}, [{"image": "a.png", "caption": "x"}])
    run_drop(data_dir, instance, "w1")
    run_drop(data_dir, instance, "other")
    first = _catalog(data_dir).query("SELECT * FROM samples ORDER BY sample_id")
    second_run = run_drop(data_dir, instance, "w1")
    again = _catalog(data_dir).query("SELECT * FROM samples ORDER BY sample_id")
    assert len(again) == len(first) == 121
    pd.testing.assert_frame_equal(first, again)
    drops = _catalog(data_dir).query("SELECT drop_id, run_id FROM drops ORDER BY 1")
    assert list(drops.drop_id) == ["other", "w1"]
    assert drops.set_index("drop_id").run_id["w1"] == second_run.run_id
    # lineage keeps one row per materialisation; the current view shows the latest
    history = _catalog(data_dir).query("SELECT run_id FROM lineage WHERE artifact = 'raw_samples/w1' ORDER BY seq")
    assert len(history) == 2 and history.run_id.iloc[-1] == second_run.run_id
    current = _catalog(data_dir).query("SELECT run_id FROM lineage_current WHERE artifact = 'raw_samples/w1'")
    assert list(current.run_id) == [second_run.run_id]
    # no temporary files are left behind by the atomic writes
    assert not list((data_dir / "warehouse").rglob("*.tmp"))


def test_broken_manifest_fails_the_run_with_a_clear_message(data_dir, instance):
    write_folder_drop(data_dir / "drops" / "bad", {"a.png": png_bytes()}, [{"image": "a.png", "text": "x"}], "jsonl")
    result = run_drop(data_dir, instance, "bad", raise_on_error=False)
    assert not result.success
    message = _failure_message(result)
    assert "captions.jsonl" in message and "'caption'" in message
    assert not (data_dir / "warehouse" / "raw_samples" / "bad.parquet").exists()


def _failure_message(result) -> str:
    error = [e for e in result.all_events if e.is_step_failure][0].step_failure_data.error
    return error.cause.message if error.cause else error.message


@pytest.mark.parametrize("key", ["..", "../outside", "a/b", "-x", "x\x00y", "é"])
def test_a_hand_typed_partition_key_that_is_no_drop_name_fails_cleanly(data_dir, instance, key):
    """The UI lets anyone add a `drops` partition with any key; ingestion refuses it by name and
    writes nothing, inside the warehouse or out of it."""
    (data_dir / "drops" / "outside").mkdir(parents=True, exist_ok=True)
    result = run_drop(data_dir, instance, key, raise_on_error=False)
    assert not result.success and "is not a drop name" in _failure_message(result)
    assert not list(data_dir.rglob("*.parquet"))


def test_ingest_settings_change_the_code_version(data_dir, instance, world_drop):
    from juicer_pipeline.definitions import build_definitions

    default = build_definitions(data_dir=data_dir)
    strict = build_definitions(JuicerSettings(ingest=IngestSettings(min_side=100)), data_dir=data_dir)
    key = default.resolve_assets_def("raw_samples").key
    v1 = default.resolve_assets_def("raw_samples").code_versions_by_key[key]
    v2 = strict.resolve_assets_def("raw_samples").code_versions_by_key[key]
    assert v1 != v2
    result = run_drop(data_dir, instance, "w1", settings=JuicerSettings(ingest=IngestSettings(min_side=100)))
    assert result.asset_materializations_for_node("raw_samples")[0].metadata["valid"].value == 0
    reasons = _catalog(data_dir).query("SELECT DISTINCT quarantine_reason FROM samples")
    assert "too_small" in set(reasons.quarantine_reason)


def test_definitions_load(data_dir):
    from juicer_pipeline.definitions import build_definitions

    defs = build_definitions(data_dir=data_dir)
    defs.validate_loadable(defs)
    assert defs.resolve_sensor_def("drop_sensor")
