"""Crash safety: a drop partition SIGKILLed mid-stage, then re-run, equals an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import AssetCheckSeverity, DagsterInstance

from juicer_pipeline.storage import Catalog
from juicer_pipeline.world import DropConfig, generate_drop

from juicer_pipeline.settings import load_settings

from ..helpers import run_drop, run_governor

# Runs the whole drop job for one partition in its own process (so that it can be killed).
RUN_DROP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dagster import AssetKey, DagsterInstance
    from juicer_pipeline.definitions import DROP_JOB_NAME, GOVERNOR_JOB_NAME, build_definitions
    defs = build_definitions(data_dir=Path(sys.argv[1]))
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with DagsterInstance.ephemeral() as inst:
        defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=inst, run_config=quiet,
                                                                   asset_selection=[AssetKey("governor")])
        inst.add_dynamic_partitions("drops", ["d"])
        defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(instance=inst, partition_key="d", run_config=quiet)
""")
STAGES = ("raw_samples", "patch_saliency", "pruned_images", "extracted_classes", "enriched_captions")
# Both data roots' settings (the killed run's process reads them too): raw_samples streams row groups
# of 32 rows, so that a 160-sample drop is several row groups into its file when the kill comes, as
# a big drop would be; τ calibrated on 100 world images (test_class_extraction.py covers calibration).
SETTINGS_TOML = "[ingest]\nbatch_rows = 32\n[classes]\ncalibration_images = 100\n"
SAMPLES = 160


def _kill_when_writing(data_dir: Path, asset: str, timeout: float = 300) -> None:
    """Start the drop job and SIGKILL its process group once `asset` is half-written."""
    env = {**os.environ, "JUICER_DATA_DIR": str(data_dir)}
    log = open(data_dir / "killed-run.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", RUN_DROP, str(data_dir)], env=env, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    folder = data_dir / "warehouse" / asset
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if folder.exists() and any(folder.glob(".d.parquet.*.tmp")):
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before {asset} was being written:\n"
                            f"{(data_dir / 'killed-run.log').read_text()[-3000:]}")
            time.sleep(0.005)
        else:
            pytest.fail(f"{asset} was never being written")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had already ended
            pass
        proc.wait()
        log.close()


def _outputs(data_dir: Path) -> dict:
    tables = {a: pq.read_table(data_dir / "warehouse" / a / "d.parquet") for a in STAGES}
    cat = Catalog(data_dir / "catalog.duckdb")
    samples = cat.query("SELECT * FROM samples ORDER BY sample_id")
    lineage = cat.query("SELECT artifact, count(*) AS n FROM lineage_current GROUP BY ALL ORDER BY 1")
    return {"tables": tables, "samples": samples, "lineage": lineage}


def _juice(root: Path) -> dict:
    """Juice drop d with the world governor; {check name: evaluation}."""
    with DagsterInstance.ephemeral() as inst:
        assert run_governor(root, inst, load_settings(data_dir=root)).success
        result = run_drop(root, inst, "d", assets=None)
        assert result.success
        return {c.check_name: c for c in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    (root / "juicer.toml").write_text(SETTINGS_TOML)
    generate_drop(root / "drops" / "d", DropConfig(n_samples=SAMPLES, seed=3))
    old = os.environ.get("JUICER_DATA_DIR")
    os.environ["JUICER_DATA_DIR"] = str(root)
    try:
        checks = _juice(root)
    finally:
        os.environ.pop("JUICER_DATA_DIR") if old is None else os.environ.update(JUICER_DATA_DIR=old)
    return root, _outputs(root), checks


@pytest.mark.slow
@pytest.mark.parametrize("killed_in", ["raw_samples", "patch_saliency"])
def test_killed_stage_reruns_to_the_uninterrupted_result(tmp_path, killed_in, monkeypatch, uninterrupted):
    clean, want, _ = uninterrupted
    crashed = tmp_path / "crashed"
    shutil.copytree(clean / "drops", crashed / "drops")
    shutil.copy(clean / "juicer.toml", crashed / "juicer.toml")
    _kill_when_writing(crashed, killed_in)
    assert not (crashed / "warehouse" / killed_in / "d.parquet").exists()  # nothing half-written in place
    monkeypatch.setenv("JUICER_DATA_DIR", str(crashed))
    _juice(crashed)
    got = _outputs(crashed)
    for asset in STAGES:
        assert got["tables"][asset].equals(want["tables"][asset]), asset
    assert got["samples"].drop(columns=[c for c in got["samples"] if c.endswith("_at")]).equals(
        want["samples"].drop(columns=[c for c in want["samples"] if c.endswith("_at")]))
    assert got["samples"].sample_id.is_unique
    assert got["lineage"].equals(want["lineage"])
    assert not list((crashed / "warehouse").rglob("*.tmp"))  # the killed run's temporary file is gone


@pytest.mark.slow
def test_world_governor_knows_world_drops(uninterrupted):
    """The world governor ranks a world drop's own captions far above chance, so there its
    similarity check is an error when it fails (on real photos it only warns: test_bring_your_own)."""
    checks = uninterrupted[2]
    similarity = checks["similarity_not_worse"]
    print("matched caption percentile:", similarity.metadata["matched_caption_percentile"].value)
    assert similarity.metadata["governor_knows_domain"].value is True
    assert similarity.severity == AssetCheckSeverity.ERROR
    assert all(c.passed for c in checks.values()), {n: c.passed for n, c in checks.items()}
