"""Asset checks on raw_samples, patch_saliency and extracted_classes: they pass on a juiced drop, and
each fails, naming the sample, once its stored Parquet is corrupted.

One tiny drop (40 samples, some quarantined) is juiced once for the module; each corruption is
undone after its test, and only the checks run on the corrupted file (never the asset, which
would rewrite it)."""
from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dagster import AssetCheckSeverity, AssetSelection, Definitions, define_asset_job, instance_for_test

from juicer_pipeline.definitions import build_definitions
from juicer_pipeline.governance.saliency import METHODS
from juicer_pipeline.models.loader import save_world_clip
from juicer_pipeline.models.world_clip import build_clip, tiny_arch
from juicer_pipeline.settings import ClassSettings, GovernorSettings, IngestSettings, JuicerSettings
from juicer_pipeline.world import DropConfig, generate_drop
from juicer_pipeline.world.vocabulary import load_vocabulary

from ..helpers import code_versions, run_drop, run_governor

DROP = "v1"
NEW_CHECKS = {"rows_in_rows_out", "quarantine_share", "one_row_per_valid_image", "finite_values",
              "classes_in_vocabulary", "probs_at_least_tau"}


@pytest.fixture(scope="module")
def juiced(tmp_path_factory):
    """(data dir, instance, settings, full-run result) for one juiced 40-sample drop."""
    data_dir = tmp_path_factory.mktemp("stage_checks") / "data"
    (data_dir / "drops").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp, instance_for_test() as instance:
        mp.setenv("JUICER_DATA_DIR", str(data_dir))
        mp.delenv("JUICER_CONFIG", raising=False)
        # the tiny random-init governor of test_vision_assets.py (no download)
        torch.manual_seed(0)
        arch = tiny_arch(image_size=64, conv_stem=True)
        path = data_dir / "tiny_governor.safetensors"
        save_world_clip(build_clip(arch), arch, path, {"note": "random init, for tests"})
        settings = JuicerSettings(governor=GovernorSettings(source=f"file:{path}", batch_size=64),
                                  classes=ClassSettings(calibration_images=100))
        generate_drop(data_dir / "drops" / DROP, DropConfig(n_samples=40, broken_rate=0.1, seed=7))
        assert run_governor(data_dir, instance, settings).success
        result = run_drop(data_dir, instance, DROP, settings, assets=None)
        yield data_dir, instance, settings, result


def _run_checks(data_dir, instance, settings, *names: str) -> dict:
    """Run only the named checks on the stored partition; {check name: evaluation}."""
    defs = build_definitions(settings, data_dir)
    keys = [k for c in defs.asset_checks for k in c.check_keys if k.name in names]
    assert len(keys) == len(names)
    job = define_asset_job("only_checks", selection=AssetSelection.checks(*keys))
    only = Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=[job], resources=defs.resources)
    result = only.resolve_job_def("only_checks").execute_in_process(
        # a job of checks alone selects no asset to infer the partitions from: the partition goes as a tag
        tags={"dagster/partition": DROP}, instance=instance,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    assert result.success
    assert not result.asset_materializations_for_node("raw_samples")  # the checked file is not rewritten
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


@contextmanager
def _corrupted(data_dir, asset: str, change):
    """Replace the stored partition by change(DataFrame) for the duration of the block."""
    path = data_dir / "warehouse" / asset / f"{DROP}.parquet"
    backup = path.with_suffix(".orig")
    shutil.copy2(path, backup)
    try:
        table = pq.read_table(path)
        df = change(table.to_pandas())
        pq.write_table(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False), path)
        yield
    finally:
        shutil.move(backup, path)


def _meta(evaluation, key: str) -> str:
    return str(evaluation.metadata[key].value)


def _valid_ids(data_dir) -> list[str]:
    raw = pq.read_table(data_dir / "warehouse" / "raw_samples" / f"{DROP}.parquet",
                        columns=["sample_id", "status"]).to_pandas()
    return list(raw.sample_id[raw.status == "valid"])


def test_new_checks_pass_on_a_juiced_drop(juiced):
    data_dir, instance, settings, result = juiced
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert NEW_CHECKS <= set(checks)
    failed = {n: {k: v.value for k, v in checks[n].metadata.items()} for n in NEW_CHECKS if not checks[n].passed}
    assert not failed
    raw = checks["rows_in_rows_out"].metadata
    assert raw["rows_in"].value == raw["rows_out"].value == 40
    assert raw["quarantined"].value > 0  # the drop has broken samples: they count as rows out too
    assert checks["one_row_per_valid_image"].metadata["rows"].value == len(_valid_ids(data_dir))
    # a randomly initialised governor knows no domain: its similarity check can only warn
    similarity = checks["similarity_not_worse"]
    assert similarity.metadata["governor_knows_domain"].value is False
    assert 0.3 < similarity.metadata["matched_caption_percentile"].value < 0.75
    assert similarity.severity == AssetCheckSeverity.WARN
    # the same checks, run alone on the stored files, agree
    again = _run_checks(data_dir, instance, settings, *sorted(NEW_CHECKS))
    assert all(again[n].passed for n in NEW_CHECKS)


def test_rows_in_rows_out_names_lost_duplicated_and_unexplained_rows(juiced):
    data_dir, instance, settings, _ = juiced
    state = {}

    def change(df):
        quarantined = df.index[df.status == "quarantined"]
        state["lost"], state["twice"] = df.sample_id[3], df.sample_id[5]
        state["no_reason"] = df.sample_id[quarantined[0]]
        df.loc[quarantined[0], "quarantine_reason"] = None
        return pd.concat([df.drop(index=3), df.loc[[5]]])

    with _corrupted(data_dir, "raw_samples", change):
        check = _run_checks(data_dir, instance, settings, "rows_in_rows_out")["rows_in_rows_out"]
    assert not check.passed
    assert state["lost"] in _meta(check, "missing_from_parquet")
    assert state["twice"] in _meta(check, "duplicated")
    assert state["no_reason"] in _meta(check, "no_status_or_reason")
    for sid in state.values():
        assert sid in _meta(check, "offending_samples")
    assert check.metadata["rows_in"].value == 40


def test_rows_in_rows_out_fails_when_counts_differ_from_the_ingestion(juiced):
    data_dir, instance, settings, _ = juiced
    victim = _valid_ids(data_dir)[0]

    def change(df):  # a valid row turned quarantined: same ids, but not what ingestion counted
        df.loc[df.sample_id == victim, ["status", "quarantine_reason"]] = ["quarantined", "corrupt_image"]
        return df

    with _corrupted(data_dir, "raw_samples", change):
        check = _run_checks(data_dir, instance, settings, "rows_in_rows_out")["rows_in_rows_out"]
    assert not check.passed
    assert check.metadata["quarantined"].value == check.metadata["quarantined_counted"].value + 1


def test_quarantine_share_alarm_names_the_quarantined_samples(juiced):
    data_dir, instance, settings, _ = juiced
    valid = _valid_ids(data_dir)
    flipped = valid[: len(valid) * 3 // 4]

    def change(df):
        df.loc[df.sample_id.isin(flipped), ["status", "quarantine_reason"]] = ["quarantined", "corrupt_image"]
        return df

    with _corrupted(data_dir, "raw_samples", change):
        check = _run_checks(data_dir, instance, settings, "quarantine_share")["quarantine_share"]
    assert not check.passed
    assert check.metadata["quarantined_share"].value >= 0.5 == check.metadata["quarantine_alarm"].value
    assert sorted(flipped)[0] in _meta(check, "offending_samples")
    assert "corrupt_image" in _meta(check, "by_reason")


def test_quarantine_alarm_is_a_setting_that_changes_no_asset(juiced):
    data_dir, instance, settings, _ = juiced
    strict = settings.model_copy(update={"ingest": IngestSettings(quarantine_alarm=0.01)})
    check = _run_checks(data_dir, instance, strict, "quarantine_share")["quarantine_share"]
    raw = pq.read_table(data_dir / "warehouse" / "raw_samples" / f"{DROP}.parquet",
                        columns=["sample_id", "status"]).to_pandas()
    assert not check.passed and check.metadata["quarantine_alarm"].value == 0.01
    assert sorted(raw.sample_id[raw.status == "quarantined"])[0] in _meta(check, "offending_samples")
    # an alarm level decides a check only: no stage turns unsynced when it changes
    assert code_versions(build_definitions(strict, data_dir)) == code_versions(build_definitions(settings, data_dir))


def test_one_row_per_valid_image_names_missing_duplicated_and_extra_rows(juiced):
    data_dir, instance, settings, _ = juiced
    raw = pq.read_table(data_dir / "warehouse" / "raw_samples" / f"{DROP}.parquet",
                        columns=["sample_id", "status"]).to_pandas()
    quarantined = sorted(raw.sample_id[raw.status == "quarantined"])[0]
    state = {}

    def change(df):
        state["missing"], state["twice"] = df.sample_id[2], df.sample_id[4]
        extra = df.loc[[6]].assign(sample_id=quarantined)  # a row for an image that is not valid
        return pd.concat([df.drop(index=2), df.loc[[4]], extra])

    with _corrupted(data_dir, "patch_saliency", change):
        check = _run_checks(data_dir, instance, settings, "one_row_per_valid_image")["one_row_per_valid_image"]
    assert not check.passed
    assert state["missing"] in _meta(check, "missing")
    assert state["twice"] in _meta(check, "duplicated")
    assert quarantined in _meta(check, "not_valid_or_unknown")
    for sid in (*state.values(), quarantined):
        assert sid in _meta(check, "offending_samples")


def test_one_row_per_valid_image_passes_when_rows_are_in_another_order(juiced):
    """The streamed in-order comparison is a fast path: rows in another order go to the set queries."""
    data_dir, instance, settings, _ = juiced
    with _corrupted(data_dir, "patch_saliency", lambda df: df.iloc[::-1]):
        check = _run_checks(data_dir, instance, settings, "one_row_per_valid_image")["one_row_per_valid_image"]
    assert check.passed
    assert check.metadata["rows"].value == check.metadata["valid_images"].value == len(_valid_ids(data_dir))
    assert _meta(check, "offending_samples") == ""


def test_finite_values_names_samples_with_nan_inf_or_empty_vectors(juiced):
    data_dir, instance, settings, _ = juiced
    state = {}

    def change(df):
        state["embedding"], state[METHODS[1]], state[METHODS[-1]] = df.sample_id[3], df.sample_id[5], df.sample_id[7]
        df.at[3, "embedding"] = [float("nan"), *df.embedding[3][1:]]
        df.at[5, METHODS[1]] = [*df[METHODS[1]][5][:-1], math.inf]
        df.at[7, METHODS[-1]] = []
        return df

    with _corrupted(data_dir, "patch_saliency", change):
        check = _run_checks(data_dir, instance, settings, "finite_values")["finite_values"]
    assert not check.passed
    for column, sid in state.items():
        assert sid in _meta(check, f"non_finite_{column}")
        assert sid in _meta(check, "offending_samples")
    good = set(_valid_ids(data_dir)) - set(state.values())
    assert not any(s in _meta(check, "offending_samples").split(", ") for s in good)


def test_classes_outside_the_vocabulary_are_named(juiced):
    data_dir, instance, settings, _ = juiced
    assert "unicorn" not in load_vocabulary().shapes
    state = {}

    def change(df):
        state["victim"] = df.sample_id[2]
        df.at[2, "classes"], df.at[2, "probs"] = ["unicorn"], [1.0]
        return df

    with _corrupted(data_dir, "extracted_classes", change):
        check = _run_checks(data_dir, instance, settings, "classes_in_vocabulary")["classes_in_vocabulary"]
    assert not check.passed
    assert state["victim"] in _meta(check, "offending_samples")
    assert "unicorn" in _meta(check, "unknown_classes")


def test_probabilities_below_tau_are_named(juiced):
    data_dir, instance, settings, _ = juiced
    tau = json.loads((data_dir / "warehouse" / "governor" / "governor.json").read_text())["tau"]
    shape = load_vocabulary().shapes[0]
    state = {}

    def change(df):
        state["below"], state["at_tau"], state["unpaired"] = df.sample_id[1], df.sample_id[3], df.sample_id[5]
        df.at[1, "classes"], df.at[1, "probs"] = [shape], [tau - 0.05]
        df.at[3, "classes"], df.at[3, "probs"] = [shape], [tau]  # stored as float32: τ itself passes
        df.at[5, "classes"], df.at[5, "probs"] = [shape, shape], [tau + 0.01]
        return df

    with _corrupted(data_dir, "extracted_classes", change):
        check = _run_checks(data_dir, instance, settings, "probs_at_least_tau")["probs_at_least_tau"]
    assert not check.passed
    assert check.metadata["tau"].value == pytest.approx(tau)
    named = _meta(check, "offending_samples").split(", ")
    assert state["below"] in named and state["unpaired"] in named
    assert state["at_tau"] not in named


def test_quarantine_alarm_is_read_validated_and_not_hashed(tmp_path):
    from juicer_pipeline.settings import SettingsError, load_settings

    toml = tmp_path / "juicer.toml"
    toml.write_text("[ingest]\nquarantine_alarm = 0.2\n")
    assert load_settings(toml).ingest.quarantine_alarm == 0.2
    assert IngestSettings().quarantine_alarm == 0.5
    assert IngestSettings(quarantine_alarm=0.2).config_hash() == IngestSettings().config_hash()
    toml.write_text("[ingest]\nquarantine_alarm = 1.5\n")
    with pytest.raises(SettingsError, match="quarantine_alarm"):
        load_settings(toml)
