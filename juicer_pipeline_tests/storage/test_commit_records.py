"""Commit records: with `[catalog] writes = "commit_records"` per-drop steps never open the catalog;
the committer folds their records into exactly the rows a direct run writes, once, in order."""
import shutil
import tomllib
from pathlib import Path

import pytest
from dagster import DagsterInstance, build_sensor_context

from juicer_pipeline.assets.resources import StorageResource
from juicer_pipeline.definitions import build_definitions
from juicer_pipeline.execution import build_executor, check_executor_config
from juicer_pipeline.settings import ExecutionSettings, JuicerSettings, SettingsError, load_settings
from juicer_pipeline.storage import Catalog, CommitLog
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import REPO, comparable_catalog_rows, run_drop, run_governor

# both runs calibrate τ on 100 world images (test_class_extraction.py covers calibration itself)
DIRECT = JuicerSettings.model_validate({"classes": {"calibration_images": 100}})
COMMIT_RECORDS = JuicerSettings.model_validate({"catalog": {"writes": "commit_records"},
                                                "classes": {"calibration_images": 100}})


def _juice(data_dir: Path, settings: JuicerSettings) -> None:
    generate_drop(data_dir / "drops" / "cr", DropConfig(n_samples=40, broken_rate=0.1, seed=5))
    with DagsterInstance.ephemeral() as inst:
        assert run_governor(data_dir, inst, settings).success
        result = run_drop(data_dir, inst, "cr", settings, assets=None)
        assert result.success
        checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert checks and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks if not c.passed]


@pytest.mark.timeout(600)
def test_folded_commit_records_equal_a_direct_run_and_fold_once(tmp_path, monkeypatch):
    direct, queued = tmp_path / "direct", tmp_path / "queued"
    for root in (direct, queued):
        (root / "drops").mkdir(parents=True)
    monkeypatch.delenv("JUICER_CONFIG", raising=False)
    _juice(direct, DIRECT)
    _juice(queued, COMMIT_RECORDS)  # the raw_samples check passes against the record, before any fold

    storage = StorageResource(data_dir=str(queued), writes="commit_records")
    log = CommitLog(queued / "commits")
    records = log.pending()
    assert len(records) == 6  # raw_samples, four vision stages, enriched_captions: one record each
    with Catalog(queued / "catalog.duckdb").connect(read_only=True) as con:  # only the governor wrote
        assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 0

    report = storage.fold_commits()
    assert (report.folded, report.already, report.pending) == (6, 0, 0)
    assert comparable_catalog_rows(queued) == comparable_catalog_rows(direct)

    # a committer killed after its transaction but before moving the record: the re-fold skips it
    shutil.copy(log.folded_dir / records[0].name, log.pending_dir / records[0].name)
    again = storage.fold_commits()
    assert (again.folded, again.already, again.pending) == (0, 1, 0)
    assert comparable_catalog_rows(queued) == comparable_catalog_rows(direct)
    n_lineage = Catalog(queued / "catalog.duckdb").query("SELECT count(*) AS n FROM lineage WHERE partition_key = 'cr'")
    assert int(n_lineage.n[0]) == 6


def test_the_committer_sensor_folds_and_is_off_for_direct_writes(data_dir, instance):
    storage = StorageResource(data_dir=str(data_dir), writes="commit_records")
    storage.commit_log.submit([{"op": "lineage", "row": {
        "asset": "pruned_images", "partition_key": "d1", "inputs": ["patch_saliency/d1"], "run_id": "r1",
        "code_version": "v1", "config_hash": "c1", "governor_id": None}}])
    for writes, running in (("direct", False), ("commit_records", True)):
        defs = build_definitions(data_dir=data_dir, settings=JuicerSettings.model_validate(
            {"catalog": {"writes": writes}}))
        sensor = defs.resolve_sensor_def("catalog_committer")
        assert (sensor.default_status.value == "RUNNING") == running
    ctx = build_sensor_context(instance=instance, definitions=defs, resources={"storage": storage})
    result = sensor.evaluate_tick(ctx)
    assert "folded 1 commit record(s)" in result.skip_message
    rows = storage.catalog.query("SELECT artifact, run_id FROM lineage")
    assert rows.to_dict("records") == [{"artifact": "pruned_images/d1", "run_id": "r1"}]


def test_an_unknown_operation_is_refused_and_stays_pending(data_dir):
    storage = StorageResource(data_dir=str(data_dir), writes="commit_records")
    storage.commit_log.submit([{"op": "drop_table", "table": "samples"}])
    with pytest.raises(ValueError, match="unknown catalog operation 'drop_table'"):
        storage.fold_commits()
    assert len(storage.commit_log.pending()) == 1


def test_executor_comes_from_settings_and_its_config_is_checked_at_load():
    assert build_executor(ExecutionSettings()) is None  # Dagster's default stays
    celery = build_executor(ExecutionSettings(executor="celery", config={"broker": "redis://127.0.0.1:6379/0"}))
    assert celery.name == "celery"
    with pytest.raises(SettingsError, match='unexpected config entry "brokr"'):
        build_executor(ExecutionSettings(executor="celery", config={"brokr": "redis://127.0.0.1:6379/0"}))


def test_the_rendered_k8s_settings_fit_the_k8s_job_executor_schema():
    """deploy/k8s/juicer.toml is the documented switch: validated here against dagster-k8s's own
    executor schema, with no cluster needed."""
    from dagster_k8s import k8s_job_executor

    settings = load_settings(REPO / "deploy" / "k8s" / "juicer.toml")
    assert settings.execution.executor == "k8s" and settings.catalog.writes == "commit_records"
    resolved = check_executor_config(k8s_job_executor, settings.execution.config)
    assert resolved["job_namespace"] == "juicer" and resolved["max_concurrent"] >= 1
    assert resolved["step_k8s_config"]["container_config"]["resources"]["limits"]["cpu"]
    defs = build_definitions(settings=settings, data_dir=REPO / "data")
    assert defs.resolve_job_def("juice_drop").executor_def.name == "k8s"
    raw = tomllib.loads((REPO / "deploy" / "k8s" / "juicer.toml").read_text())
    raw["execution"]["config"]["max_concurent"] = 4
    with pytest.raises(SettingsError, match="max_concurent"):
        build_executor(ExecutionSettings.model_validate(raw["execution"]))
