"""A drop's patch_saliency split into row-range shards: one step per shard, each retried on its own,
merged into the very table one step writes."""
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dagster import RetryPolicy
from pydantic import ValidationError

import juicer_pipeline.assets.patch_saliency as vision_assets
from juicer_pipeline.governance.saliency import VisionPass
from juicer_pipeline.governance.vision import (SALIENCY_SCHEMA, count_valid_images, iter_valid_images, range_digests,
                                               saliency_record_batch, score_batch, shard_ranges)
from juicer_pipeline.models.loader import cached_foundation_model, save_world_clip
from juicer_pipeline.models.world_clip import build_clip, tiny_arch
from juicer_pipeline.settings import GovernorSettings, JuicerSettings, SettingsError, load_settings
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import code_versions, png_bytes, run_drop

BATCH = 16


def _tiny_governor(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    arch = tiny_arch(image_size=64, conv_stem=True)
    save_world_clip(build_clip(arch), arch, path, {"note": "random init, for tests"})
    return f"file:{path}"


@pytest.fixture
def source(data_dir) -> str:
    return _tiny_governor(data_dir / "tiny_governor.safetensors", seed=0)


@pytest.fixture
def drop(data_dir) -> str:
    generate_drop(data_dir / "drops" / "s", DropConfig(n_samples=60, broken_rate=0.05, seed=5))
    return "s"


def _settings(source: str, shards: int) -> JuicerSettings:
    return JuicerSettings(governor=GovernorSettings(source=source, batch_size=BATCH, shards=shards))


def _saliency(data_dir: Path, drop: str) -> pa.Table:
    return pq.read_table(data_dir / "warehouse" / "patch_saliency" / f"{drop}.parquet")


def _single_pass(data_dir: Path, drop: str, source: str) -> pa.Table:
    """What one step computes: every valid image of the drop, batch after batch, in one loop."""
    fm = cached_foundation_model(source, "cpu")
    vision = VisionPass(fm.model)
    try:
        batches = [saliency_record_batch(ids, fm.grid, score_batch(fm, vision, images))
                   for ids, images in iter_valid_images(data_dir / "warehouse" / "raw_samples" / f"{drop}.parquet",
                                                        BATCH)]
    finally:
        vision.close()
    return pa.Table.from_batches(batches, SALIENCY_SCHEMA)


def _meta(result) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("patch_saliency")[0].metadata.items()}


def _step_events(result) -> Counter:
    return Counter((e.step_key, e.event_type_value) for e in result.all_events if e.step_key)


def _ranges(data_dir: Path, drop: str, shards: int) -> list[tuple[int, int]]:
    n = count_valid_images(str(data_dir / "warehouse" / "raw_samples" / f"{drop}.parquet"))
    return shard_ranges(n, BATCH, shards)


@pytest.fixture
def scoring_log(monkeypatch):
    """Which shard every governor batch call belongs to, and a fault to inject into one shard:
    `fail[(start, stop)] = k` makes the shard's next k attempts fail on their first batch."""
    log, fail, current = Counter(), {}, {}
    real_iter, real_score = vision_assets.iter_valid_images, vision_assets.score_batch

    def iter_images(path, batch_size, start=0, stop=None):
        current["range"] = (start, stop)
        yield from real_iter(path, batch_size, start, stop)

    def score(fm, vision, images, precision="fp32"):
        rng = current["range"]
        log[rng] += 1
        if fail.get(rng, 0) > 0:
            fail[rng] -= 1
            raise RuntimeError(f"injected fault in shard {rng}")
        return real_score(fm, vision, images, precision)

    monkeypatch.setattr(vision_assets, "iter_valid_images", iter_images)
    monkeypatch.setattr(vision_assets, "score_batch", score)
    return log, fail


def test_three_shards_give_the_single_step_table(data_dir, instance, drop, source, scoring_log):
    log, _ = scoring_log
    one = run_drop(data_dir, instance, drop, _settings(source, 1), assets=("raw_samples", "patch_saliency"))
    single = _saliency(data_dir, drop)
    assert single.equals(_single_pass(data_dir, drop, source))  # shards = 1 is today's one loop
    assert _meta(one)["shards"] == 1
    log.clear()

    three = run_drop(data_dir, instance, drop, _settings(source, 3), assets=("patch_saliency",))
    sharded = _saliency(data_dir, drop)
    ranges = _ranges(data_dir, drop, 3)
    assert len(ranges) == 3 and len(single) == ranges[-1][1] > 0
    assert sharded.equals(single)  # same rows, same order, same values
    assert sharded.column("sample_id").to_pylist() == single.column("sample_id").to_pylist()
    meta = _meta(three)
    assert meta["shards"] == 3 and meta["shards_reused"] == 0
    assert meta["images"] == meta["full_image_forward_passes"] == len(single)
    # one step per shard, each scoring only its own rows
    steps = {k for k, t in _step_events(three) if t == "STEP_SUCCESS" and ".score_saliency_shard[" in k}
    assert steps == {f"patch_saliency.score_saliency_shard[rows_{a}_{b}]" for a, b in ranges}
    assert dict(log) == {(a, b): -(-(b - a) // BATCH) for a, b in ranges}
    assert not (data_dir / "shards" / "patch_saliency" / drop).exists()  # merged shards are removed


def test_a_failing_shard_is_retried_alone(data_dir, instance, drop, source, scoring_log):
    log, fail = scoring_log
    run_drop(data_dir, instance, drop, _settings(source, 1), assets=("raw_samples",))
    reference = _single_pass(data_dir, drop, source)
    ranges = _ranges(data_dir, drop, 3)
    flaky = ranges[1]
    fail[flaky] = 1
    result = run_drop(data_dir, instance, drop, _settings(source, 3), assets=("patch_saliency",))
    assert result.success
    events = _step_events(result)
    step = "patch_saliency.score_saliency_shard[rows_{}_{}]".format
    for rng in ranges:
        assert events[(step(*rng), "STEP_START")] == 1
        assert events[(step(*rng), "STEP_SUCCESS")] == 1
        assert events[(step(*rng), "STEP_UP_FOR_RETRY")] == events[(step(*rng), "STEP_RESTARTED")] == (
            1 if rng == flaky else 0)
    assert events[("patch_saliency.plan_saliency_shards", "STEP_START")] == 1
    assert events[("patch_saliency.merge_saliency_shards", "STEP_START")] == 1
    # the other shards scored their batches once; the flaky one failed once and then scored its own
    batches = {rng: -(-(rng[1] - rng[0]) // BATCH) for rng in ranges}
    assert dict(log) == {rng: n + (1 if rng == flaky else 0) for rng, n in batches.items()}
    assert _saliency(data_dir, drop).equals(reference)


def test_a_rerun_redoes_only_missing_shards_and_never_merges_stale_ones(data_dir, instance, drop, source,
                                                                         scoring_log, monkeypatch):
    log, fail = scoring_log
    monkeypatch.setattr(vision_assets, "SHARD_RETRY", RetryPolicy(max_retries=2))  # no waiting between attempts
    run_drop(data_dir, instance, drop, _settings(source, 1), assets=("raw_samples",))
    ranges = _ranges(data_dir, drop, 3)
    broken = ranges[2]
    fail[broken] = 1 + vision_assets.SHARD_RETRY.max_retries  # fails every attempt: the run fails
    failed = run_drop(data_dir, instance, drop, _settings(source, 3), assets=("patch_saliency",),
                      raise_on_error=False)
    assert not failed.success
    assert not (data_dir / "warehouse" / "patch_saliency" / f"{drop}.parquet").exists()
    assert len(list((data_dir / "shards" / "patch_saliency" / drop).glob("*.parquet"))) == 2

    log.clear()
    again = run_drop(data_dir, instance, drop, _settings(source, 3), assets=("patch_saliency",))
    assert set(log) == {broken}  # the finished shards are kept, only the missing one is scored
    assert _meta(again)["shards_reused"] == 2
    assert _saliency(data_dir, drop).equals(_single_pass(data_dir, drop, source))
    assert not (data_dir / "shards" / "patch_saliency" / drop).exists()

    # shards of another governor are stale: a new governor rescores every range
    fail[broken] = 1 + vision_assets.SHARD_RETRY.max_retries
    run_drop(data_dir, instance, drop, _settings(source, 3), assets=("patch_saliency",), raise_on_error=False)
    other = _tiny_governor(data_dir / "other_governor.safetensors", seed=1)
    log.clear()
    fresh = run_drop(data_dir, instance, drop, _settings(other, 3), assets=("patch_saliency",))
    assert set(log) == set(ranges) and _meta(fresh)["shards_reused"] == 0
    assert _saliency(data_dir, drop).equals(_single_pass(data_dir, drop, other))


def test_shards_below_one_are_rejected_and_shards_change_no_version(tmp_path, data_dir, source):
    with pytest.raises(ValidationError, match="shards"):
        GovernorSettings(shards=0)
    bad = tmp_path / "bad.toml"
    bad.write_text("[governor]\nshards = 0\n")
    with pytest.raises(SettingsError, match=r"(?s)governor\.shards.*greater than or equal to 1"):
        load_settings(bad)
    bad.write_text('[governor]\nshards = "many"\n')
    with pytest.raises(SettingsError, match="shards"):
        load_settings(bad)
    good = tmp_path / "good.toml"
    good.write_text("[governor]\nshards = 4\n")
    assert load_settings(good).governor.shards == 4
    # how the work is split is not hashed: no stage turns unsynced when it changes
    from juicer_pipeline.definitions import build_definitions

    assert code_versions(build_definitions(_settings(source, 1), data_dir)) == code_versions(
        build_definitions(_settings(source, 4), data_dir))
    assert GovernorSettings(shards=1).config_hash() == GovernorSettings(shards=4).config_hash()



def test_the_sharded_asset_is_the_same_asset_to_everything_around_it(data_dir, source):
    """Key, partitions, code version, automation, kinds, upstream and downstream assets and checks
    are those of the single-step asset: the drop job, automation and the UI see no difference."""
    from dagster import AssetKey

    from juicer_pipeline.assets.partitions import drops_partitions
    from juicer_pipeline.automation.conditions import PER_DROP
    from juicer_pipeline.definitions import DROP_JOB_NAME, build_definitions
    from juicer_pipeline.models.loader import model_fingerprint

    defs = build_definitions(_settings(source, 3), data_dir)
    key = AssetKey("patch_saliency")
    ad = defs.get_assets_def(key)
    spec = ad.specs_by_key[key]
    assert ad.keys == {key} and ad.partitions_def is drops_partitions
    assert spec.code_version == f"patch_saliency-2+{model_fingerprint(source)[:12]}"
    assert spec.automation_condition is PER_DROP and spec.kinds == {"pytorch", "parquet"} and spec.group_name == "vision"
    assert {d.asset_key for d in spec.deps} == {AssetKey("raw_samples"), AssetKey("governor")}
    graph = defs.get_repository_def().asset_graph
    assert graph.get(key).child_keys == {AssetKey(a) for a in ("pruned_images", "extracted_classes", "sieve_scores",
                                                                 "enriched_captions")}
    assert {c.name for c in graph.asset_check_keys if c.asset_key == key} == {"one_row_per_valid_image",
                                                                                "finite_values"}
    assert "patch_saliency" in defs.resolve_job_def(DROP_JOB_NAME).graph.node_dict


def test_a_missing_model_fails_at_once_without_retries(data_dir, instance, drop):
    settings = _settings(f"file:{data_dir / 'nothing.safetensors'}", 2)
    result = run_drop(data_dir, instance, drop, settings, assets=("raw_samples", "patch_saliency"),
                      raise_on_error=False)
    assert not result.success
    events = _step_events(result)
    assert not any(t == "STEP_UP_FOR_RETRY" for _, t in events)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "governor weights not found" in failure.step_failure_data.error.to_string()

def test_shard_ranges_are_whole_batches_covering_every_row():
    assert shard_ranges(0, 16, 3) == [(0, 0)]
    assert shard_ranges(57, 16, 1) == [(0, 57)]
    assert shard_ranges(57, 16, 3) == [(0, 32), (32, 48), (48, 57)]
    assert shard_ranges(57, 16, 10) == [(0, 16), (16, 32), (32, 48), (48, 57)]  # at most one per batch
    for n in range(0, 70):
        for k in (1, 2, 3, 5):
            ranges = shard_ranges(n, 8, k)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(a % 8 == 0 for a, _ in ranges)
    with pytest.raises(ValueError):
        shard_ranges(10, 16, 0)


def test_row_ranges_read_only_their_rows(tmp_path):
    """Ranges of valid rows across small row groups and quarantined rows: their concatenation is the
    whole pass, batches included, and each range's digest depends on its own rows only."""
    rows = [{"sample_id": f"x{i}", "status": "quarantined" if i % 4 == 1 else "valid",
             "content_hash": f"h{i}", "image": None if i % 4 == 1 else png_bytes((8, 8), (i, 0, 0))}
            for i in range(30)]
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    whole = [ids for ids, _ in iter_valid_images(str(path), 4)]
    valid = [r["sample_id"] for r in rows if r["status"] == "valid"]
    assert count_valid_images(str(path)) == len(valid) == 22
    ranges = shard_ranges(len(valid), 4, 3)
    parts = [ids for a, b in ranges for ids, _ in iter_valid_images(str(path), 4, a, b)]
    assert parts == whole and sum(whole, []) == valid
    assert [ids for ids, _ in iter_valid_images(str(path), 4, 9, 13)] == [valid[9:13]]
    digests = range_digests(str(path), ranges)
    assert len(set(digests)) == len(ranges)
    rows[-2]["content_hash"] = "changed"  # the last valid row
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    changed = range_digests(str(path), ranges)
    assert changed[:-1] == digests[:-1] and changed[-1] != digests[-1]


def drop_job():
    """The drop job as the code location builds it (settings from the data root's juicer.toml): what
    each step process of the multiprocess executor rebuilds."""
    from juicer_pipeline.definitions import DROP_JOB_NAME, build_definitions

    return build_definitions().resolve_job_def(DROP_JOB_NAME)


def test_shards_run_as_separate_processes_under_the_multiprocess_executor(data_dir, instance, drop, source):
    from dagster import AssetKey, build_reconstructable_job, execute_job

    (data_dir / "juicer.toml").write_text(f'[governor]\nsource = "{source}"\nbatch_size = {BATCH}\nshards = 3\n')
    assert run_drop(data_dir, instance, drop).success  # raw_samples, in this process
    job = build_reconstructable_job("juicer_pipeline_tests.assets.test_sharded_vision", "drop_job")
    # step processes forked from a forkserver that imported this module (and so torch, Dagster and
    # the pipeline) once, instead of spawned processes that import them one by one
    with execute_job(job, instance, tags={"dagster/partition": drop}, asset_selection=[AssetKey("patch_saliency")],
                     run_config={"execution": {"config": {"multiprocess": {
                         "max_concurrent": 3, "start_method": {"forkserver": {"preload_modules": [__name__]}}}}},
                         "loggers": {"console": {"config": {"log_level": "WARNING"}}}}) as result:
        assert result.success
        pids = {e.step_key: e.pid for e in result.all_events if e.event_type_value == "STEP_START"}
        meta = _meta(result)
    shard_pids = {pid for key, pid in pids.items() if ".score_saliency_shard[" in key}
    assert len(shard_pids) == 3  # one worker process per shard
    assert meta["shards"] == 3
    assert _saliency(data_dir, drop).equals(_single_pass(data_dir, drop, source))
