from dagster import build_sensor_context

from juicer_pipeline.assets.resources import StorageResource
from juicer_pipeline.definitions import build_definitions
from juicer_pipeline.world import DropConfig, generate_drop

from .helpers import png_bytes, write_folder_drop


def _evaluate(data_dir, instance):
    defs = build_definitions(data_dir=data_dir)
    ctx = build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs,
                               resources={"storage": StorageResource(data_dir=str(data_dir))})
    return defs.resolve_sensor_def("drop_sensor").evaluate_tick(ctx)


def test_new_drop_gives_one_partition_and_one_run_then_nothing(data_dir, instance):
    generate_drop(data_dir / "drops" / "d1", DropConfig(n_samples=5))
    result = _evaluate(data_dir, instance)
    assert [r.partition_key for r in result.run_requests] == ["d1"]
    assert result.run_requests[0].run_key == "drop:d1"
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "drops" and list(add.partition_keys) == ["d1"]
    instance.add_dynamic_partitions("drops", list(add.partition_keys))  # what the daemon does with the request
    again = _evaluate(data_dir, instance)
    assert not again.run_requests and not again.dynamic_partitions_requests
    assert again.skip_message and "no new complete drop" in again.skip_message


def test_incomplete_hidden_and_oddly_named_folders_are_not_drops(data_dir, instance):
    (data_dir / "drops" / "half").mkdir()  # no marker, manifest or shards yet
    (data_dir / "drops" / "half" / "a.png").write_bytes(png_bytes())
    (data_dir / "drops" / ".writing.partial").mkdir()
    write_folder_drop(data_dir / "drops" / "bad name!", {"a.png": png_bytes()}, [{"image": "a.png", "caption": "x"}])
    write_folder_drop(data_dir / "drops" / "good", {"a.png": png_bytes()}, [{"image": "a.png", "caption": "x"}])
    result = _evaluate(data_dir, instance)
    assert [r.partition_key for r in result.run_requests] == ["good"]
    (data_dir / "drops" / "half" / "_READY").write_text("")
    instance.add_dynamic_partitions("drops", ["good"])
    result = _evaluate(data_dir, instance)
    assert [r.partition_key for r in result.run_requests] == ["half"]
