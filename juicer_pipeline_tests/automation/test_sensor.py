from juicer_pipeline.definitions import build_definitions
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import DropSensorTicks, png_bytes, write_folder_drop


def test_new_drop_gives_one_partition_and_one_run_then_nothing(data_dir, instance):
    generate_drop(data_dir / "drops" / "d1", DropConfig(n_samples=5))
    sensor = DropSensorTicks(data_dir, instance)
    result = sensor.tick()
    assert [r.partition_key for r in result.run_requests] == ["d1"]
    assert result.run_requests[0].run_key == "drop:d1"
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "drops" and list(add.partition_keys) == ["d1"]
    again = sensor.tick()
    assert not again.run_requests and not again.dynamic_partitions_requests and not again.asset_events
    assert again.skip_message and "no new or changed drop" in again.skip_message


def test_incomplete_hidden_and_oddly_named_folders_are_not_drops(data_dir, instance):
    (data_dir / "drops" / "half").mkdir()  # no marker, manifest or shards yet
    (data_dir / "drops" / "half" / "a.png").write_bytes(png_bytes())
    (data_dir / "drops" / ".writing.partial").mkdir()
    write_folder_drop(data_dir / "drops" / "bad name!", {"a.png": png_bytes()}, [{"image": "a.png", "caption": "x"}])
    write_folder_drop(data_dir / "drops" / "good", {"a.png": png_bytes()}, [{"image": "a.png", "caption": "x"}])
    sensor = DropSensorTicks(data_dir, instance)
    result = sensor.tick()
    assert [r.partition_key for r in result.run_requests] == ["good"]
    (data_dir / "drops" / "half" / "_READY").write_text("")
    result = sensor.tick()
    assert [r.partition_key for r in result.run_requests] == ["half"]


def test_retrain_schedule_requests_stale_recipes_only_and_automation_runs(data_dir, instance):
    from datetime import datetime, timezone

    from dagster import DefaultSensorStatus, build_schedule_context

    from juicer_pipeline.governance.recipes import RECIPE_NAMES

    defs = build_definitions(data_dir=data_dir)
    schedule = defs.resolve_schedule_def("retrain_recipes")
    assert schedule.cron_schedule == "0 2 * * *"
    ctx = build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                 scheduled_execution_time=datetime(2026, 11, 29, 2, tzinfo=timezone.utc))
    requests = schedule.evaluate_tick(ctx).run_requests
    assert [r.partition_key for r in requests] == RECIPE_NAMES
    assert all(r.stale_assets_only and r.run_key.endswith("2026-11-29") for r in requests)
    automation = defs.resolve_sensor_def("automation")
    assert automation.default_status == DefaultSensorStatus.RUNNING
