"""Drops as versioned inputs: the drop sensor observes each drop's content version (drop_files), so
a changed drop makes exactly its raw_samples partition unsynced and is re-juiced, an unchanged one
costs nothing, and a deleted one is reported and marked in the catalog."""
import os
import shutil
import time

import pytest
from dagster import AssetKey
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from juicer_pipeline.governance.drop_fingerprint import fingerprint_drop
from juicer_pipeline.storage import Catalog, Warehouse
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import DropSensorTicks, png_bytes, run_drop


def _stale(sensor: DropSensorTicks, drop: str) -> StaleStatus:
    """What the UI shows for raw_samples[drop] ('Unsynced' when STALE)."""
    graph = sensor.defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=sensor.instance, asset_graph=graph)
    return CachingStaleStatusResolver(sensor.instance, graph, view).get_status(AssetKey("raw_samples"), drop)


def _ingest_requested(data_dir, sensor: DropSensorTicks) -> list[str]:
    """One tick, and run what it requested (ingestion only, as the drop job's first step)."""
    result = sensor.tick()
    drops = [r.partition_key for r in result.run_requests]
    for drop in drops:
        assert run_drop(data_dir, sensor.instance, drop).success
    return drops


def _drop_row(data_dir, drop: str) -> dict:
    rows = Catalog(Warehouse(data_dir).catalog_path).query(
        "SELECT n_samples, version, status FROM drops WHERE drop_id = ?", [drop])
    return rows.iloc[0].to_dict()


@pytest.fixture
def two_drops(data_dir, instance):
    """'shards' (WebDataset, two shards) and 'folder' (images + manifest), both ingested."""
    generate_drop(data_dir / "drops" / "shards", DropConfig(n_samples=12, format="wds", shard_size=6, seed=1))
    generate_drop(data_dir / "drops" / "folder", DropConfig(n_samples=8, manifest_format="csv", seed=2))
    sensor = DropSensorTicks(data_dir, instance)
    assert sorted(_ingest_requested(data_dir, sensor)) == ["folder", "shards"]
    assert _stale(sensor, "shards") == _stale(sensor, "folder") == StaleStatus.FRESH
    return sensor


def test_an_unchanged_drop_gives_no_run_and_no_observation(data_dir, two_drops):
    two_drops.instance.add_dynamic_partitions("drops", ["../typed-in-the-ui"])  # no folder to look at: skipped
    for _ in range(2):
        result = two_drops.tick()
        assert not result.run_requests and not result.asset_events
    assert _stale(two_drops, "shards") == StaleStatus.FRESH
    # reading the drop (ingesting it again) changes nothing either
    assert run_drop(data_dir, two_drops.instance, "folder").success
    assert not two_drops.tick().run_requests


def test_a_replaced_shard_makes_exactly_its_drop_stale_and_rejuiced(data_dir, two_drops):
    shard = sorted((data_dir / "drops" / "shards").glob("*.tar"))[1]
    other = generate_drop(data_dir / "elsewhere", DropConfig(n_samples=6, format="wds", shard_size=6, seed=9)).path
    shutil.copyfile(sorted(other.glob("*.tar"))[0], shard)
    result = two_drops.tick()
    assert [r.partition_key for r in result.run_requests] == ["shards"]
    assert [(e.asset_key.path[-1], e.partition) for e in result.asset_events] == [("drop_files", "shards")]
    assert _stale(two_drops, "shards") == StaleStatus.STALE and _stale(two_drops, "folder") == StaleStatus.FRESH
    assert run_drop(data_dir, two_drops.instance, "shards").success
    assert _stale(two_drops, "shards") == StaleStatus.FRESH
    assert _drop_row(data_dir, "shards")["version"] == fingerprint_drop(data_dir / "drops" / "shards").version
    assert not two_drops.tick().run_requests


def test_an_appended_image_and_manifest_row_rejuice_the_drop(data_dir, two_drops):
    folder = data_dir / "drops" / "folder"
    (folder / "images" / "extra.png").write_bytes(png_bytes(colour=(9, 99, 199)))
    with open(folder / "captions.csv", "a") as manifest:
        manifest.write("images/extra.png,a late blue square\n")
    assert _ingest_requested(data_dir, two_drops) == ["folder"]
    assert _drop_row(data_dir, "folder")["n_samples"] == 9
    assert not two_drops.tick().run_requests


def test_an_image_rewritten_in_place_is_a_change(data_dir, two_drops):
    image = sorted((data_dir / "drops" / "folder" / "images").iterdir())[0]
    image.write_bytes(png_bytes(colour=(1, 2, 3)))
    later = time.time() + 5  # a different modification time, whatever the file system's clock grain
    os.utime(image, (later, later))
    assert _ingest_requested(data_dir, two_drops) == ["folder"]


def test_a_deleted_drop_is_reported_and_marked_never_rejuiced(data_dir, two_drops):
    kept = data_dir / "kept-copy"
    shutil.copytree(data_dir / "drops" / "shards", kept)
    shutil.rmtree(data_dir / "drops" / "shards")
    result = two_drops.tick()
    assert not result.run_requests  # nothing to ingest: the folder is gone
    (event,) = result.asset_events
    assert event.partition == "shards" and event.metadata["status"].value == "deleted"
    assert _drop_row(data_dir, "shards")["status"] == "deleted"
    assert _stale(two_drops, "shards") == StaleStatus.STALE and _stale(two_drops, "folder") == StaleStatus.FRESH
    assert not two_drops.tick().asset_events  # reported once
    shutil.copytree(kept, data_dir / "drops" / "shards")  # the same files come back: ingested again
    assert _ingest_requested(data_dir, two_drops) == ["shards"]
    assert _drop_row(data_dir, "shards")["status"] == "present"


def test_a_sensor_without_its_cursor_observes_again_but_rejuices_nothing(data_dir, two_drops):
    fresh = DropSensorTicks(data_dir, two_drops.instance)  # a reset sensor: no memory of earlier looks
    result = fresh.tick()
    assert not result.run_requests and {e.partition for e in result.asset_events} == {"shards", "folder"}


def test_fingerprint_ignores_markers_and_hidden_files_and_sees_content(tmp_path):
    drop = generate_drop(tmp_path / "d", DropConfig(n_samples=4, seed=5)).path
    before = fingerprint_drop(drop)
    (drop / "_READY").write_text("")
    (drop / ".upload.tmp").write_bytes(b"partial")
    assert fingerprint_drop(drop) == before
    manifest = next(drop.glob("captions.*"))
    stat = manifest.stat()
    data = bytearray(manifest.read_bytes())
    data[-1] ^= 1  # same size, same modification time, other bytes: the manifest is hashed whole
    manifest.write_bytes(bytes(data))
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint_drop(drop).version != before.version
    with pytest.raises(FileNotFoundError):
        fingerprint_drop(tmp_path / "gone")


def test_new_training_sets_leave_out_a_deleted_drop(data_dir):
    from juicer_pipeline.assets.resources import StorageResource
    from juicer_pipeline.assets.training import PER_DROP_INPUTS, juiced_drops
    from juicer_pipeline.governance.ingest import RAW_SAMPLES_SCHEMA
    from juicer_pipeline.storage import apply_ops, drop_status_op
    from juicer_pipeline.storage.records import replace_drop

    storage = StorageResource(data_dir=str(data_dir))
    wh = storage.warehouse
    empty = RAW_SAMPLES_SCHEMA.empty_table()  # juiced_drops looks at which partitions exist, not at rows
    for drop in ("a", "b"):
        for asset in PER_DROP_INPUTS:
            wh.write_table(asset, drop, empty)
    catalog = storage.catalog
    catalog.migrate()
    row = {"path": "p", "format": "folder", "sources": [], "n_samples": 0, "n_valid": 0, "n_quarantined": 0, "bytes": 0}
    for drop in ("a", "b"):
        catalog.write(lambda con, d=drop: replace_drop(con, {"drop_id": d, **row}, wh.partition_path("raw_samples", d)))
    assert juiced_drops(storage) == (["a", "b"], [])
    catalog.write(lambda con: apply_ops(con, [drop_status_op("b", "deleted")]))
    assert juiced_drops(storage) == (["a"], ["b"])


def test_observing_drop_files_by_hand_records_the_versions_the_sensor_sees(data_dir, two_drops):
    """'Observe' in the UI runs drop_files' own observe function: the same version per drop, so the
    drops stay fresh; a drop changed since gets its new version there too."""
    from dagster._core.definitions.observe import observe

    from juicer_pipeline.assets.ingest import drop_files
    from juicer_pipeline.assets.resources import StorageResource

    def observed() -> dict:
        result = observe([drop_files], instance=two_drops.instance,
                         resources={"storage": StorageResource(data_dir=str(data_dir))})
        assert result.success
        return {e.partition: e.tags["dagster/data_version"] for e in result.asset_observations_for_node("drop_files")}

    folder = data_dir / "drops" / "folder"
    assert observed() == {"shards": fingerprint_drop(data_dir / "drops" / "shards").version,
                          "folder": fingerprint_drop(folder).version}
    assert _stale(two_drops, "folder") == StaleStatus.FRESH
    (folder / "images" / "extra.png").write_bytes(png_bytes(colour=(7, 7, 7)))
    assert observed()["folder"] == fingerprint_drop(folder).version
    assert _stale(two_drops, "folder") == StaleStatus.STALE and _stale(two_drops, "shards") == StaleStatus.FRESH
