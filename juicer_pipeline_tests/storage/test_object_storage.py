"""The warehouse on object storage: a moto S3 server on loopback stands in for S3. A drop is juiced
end to end and one recipe trained and scored with every table, governor record and checkpoint on
it, and lineage is queried over it; nothing lands in the local warehouse folder."""
import json

import pytest
import s3fs
from dagster import AssetCheckSeverity, instance_for_test

from juicer_pipeline.assets.resources import StorageResource
from juicer_pipeline.definitions import GOVERNOR_JOB_NAME, RECIPES_JOB_NAME, build_definitions
from juicer_pipeline.settings import JuicerSettings
from juicer_pipeline.storage.lineage import trace_back
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import MotoS3Server, run_drop, tiny_governor_world

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
STAGES = ("raw_samples", "patch_saliency", "pruned_images", "extracted_classes", "sieve_scores", "enriched_captions")


@pytest.fixture
def s3():
    server = MotoS3Server()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(900)
def test_a_drop_juiced_trained_and_traced_with_the_warehouse_on_s3(data_dir, s3):
    fs = s3fs.S3FileSystem(**s3.storage_options())
    fs.mkdir("juicer")
    tiny_governor_world(data_dir, 60)
    generate_drop(data_dir / "drops" / "s3drop", DropConfig(n_samples=80, broken_rate=0.05, seed=9))
    settings = JuicerSettings.model_validate({
        "governor": {"source": f"file:{data_dir / 'tiny.safetensors'}", "batch_size": 64},
        "classes": {"calibration_images": 20},
        "training": {"seeds": [0], "budget_full_steps": 3, "batch_size": 16, "eval_points": 1},
        "warehouse": {"url": "s3://juicer/warehouse", "storage_options": s3.storage_options()}})
    defs = build_definitions(settings, data_dir)
    with instance_for_test() as inst:
        assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=inst, run_config=QUIET).success
        result = run_drop(data_dir, inst, "s3drop", settings, assets=None)
        assert result.success
        checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        # a random governor knows no domain: similarity_not_worse may only warn
        failed = [(c.check_name, c.metadata) for c in checks if not c.passed and c.severity == AssetCheckSeverity.ERROR]
        assert len(checks) >= 8 and not failed, failed
        assert defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(
            instance=inst, partition_key="raw", run_config=QUIET).success

    assert not (data_dir / "warehouse").exists()  # every table went to object storage
    for stage in STAGES:
        assert fs.exists(f"juicer/warehouse/{stage}/s3drop.parquet"), stage
    assert fs.exists("juicer/warehouse/governor/governor.json")
    assert fs.exists("juicer/warehouse/clip_checkpoint/raw/seed0.safetensors")

    storage = StorageResource.from_settings(data_dir, settings)
    # the catalog's views read the Parquet on S3: one lineage query joins both
    per_stage = storage.catalog.query("""
        SELECT l.asset, count(*) AS n FROM lineage_current l
        JOIN raw_samples r ON r.drop_id = l.partition_key AND r.status = 'valid'
        WHERE l.partition_key = 's3drop' GROUP BY ALL ORDER BY 1""")
    n_valid = int(storage.catalog.query("SELECT count(*) AS n FROM samples WHERE status = 'valid'").n[0])
    assert dict(zip(per_stage.asset, per_stage.n)) == {s: n_valid for s in STAGES}
    ckpt = storage.catalog.query("SELECT checkpoint_id, path FROM checkpoints").iloc[0]
    assert ckpt.path == "s3://juicer/warehouse/clip_checkpoint/raw/seed0.safetensors"
    trace = trace_back(storage.catalog, ckpt.checkpoint_id)
    assert set(trace["members"].drop_id) == {"s3drop"} and 0 < len(trace["members"]) <= n_valid
    assert {"raw_samples/s3drop", "enriched_captions/s3drop", "governor"} <= set(trace["lineage"].artifact)
    assert len(trace["scores"]) > 0
    print(json.dumps({"objects": len(fs.find("juicer/warehouse")), "valid_samples": n_valid,
                      "scores": len(trace["scores"])}))


def test_a_warehouse_url_without_its_filesystem_package_is_a_settings_error(tmp_path):
    from juicer_pipeline.settings import SettingsError, load_settings

    path = tmp_path / "juicer.toml"
    path.write_text('[warehouse]\nurl = "gs://bucket/juicer"\n')
    with pytest.raises(SettingsError, match="no filesystem for 'gs'"):
        load_settings(path)
