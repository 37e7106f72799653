"""Concurrency: four drops juiced at once by the real Dagster daemon (drop sensor → queued runs, four
at a time, each in its own process), while another process keeps reading the catalog the way the
README tells users to (snapshots and the Parquet files). Nothing may fail on a lock, and every
count must equal a serial run of the same drops.

Each run executes its steps in its own process (`executor = "in_process"`): the four writers that
contend for the catalog are the four run processes. Under the default multiprocess executor every
step would be one more process importing torch and Dagster (about 8 s of CPU each, some 50 per
test) without adding a writer that the run processes do not already exercise."""
import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from juicer_pipeline.settings import JuicerSettings, load_settings
from juicer_pipeline.storage import Catalog
from juicer_pipeline.world import DropConfig, generate_drop

from ..catalog_reader import reader_command
from ..helpers import ONLY_THE_DROP_SENSOR, THREADED_LAUNCHES, DagsterDev, run_drop, run_governor

DROPS = [f"par-{i}" for i in range(4)]
SAMPLES = 30
# the daemon's runs read the data root's settings: the same for the serial run, with a τ
# calibration on 100 world images (test_class_extraction.py covers calibration itself)
SETTINGS_TOML = '[execution]\nexecutor = "in_process"\n[classes]\ncalibration_images = 100\n'
STAGES = ("raw_samples", "patch_saliency", "pruned_images", "extracted_classes", "enriched_captions")

def _make_drops(data_dir: Path) -> JuicerSettings:
    (data_dir / "juicer.toml").write_text(SETTINGS_TOML)
    for i, name in enumerate(DROPS):
        generate_drop(data_dir / "drops" / name, DropConfig(n_samples=SAMPLES, seed=40 + i, drop_index=i))
    return load_settings(data_dir=data_dir)


def _counts(data_dir: Path) -> dict:
    catalog = Catalog(data_dir / "catalog.duckdb")
    drops = catalog.query("SELECT drop_id, n_samples, n_valid, n_quarantined FROM drops ORDER BY drop_id")
    samples = catalog.query("SELECT drop_id, status, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL")
    lineage = catalog.query("SELECT artifact, count(*) AS n FROM lineage_current "
                            "WHERE artifact NOT LIKE 'governor%' GROUP BY ALL ORDER BY ALL")
    rows = {(a, d): pq.read_metadata(data_dir / "warehouse" / a / f"{d}.parquet").num_rows
            for a in STAGES for d in DROPS}
    return {"drops": drops.to_dict("records"), "samples": samples.to_dict("records"),
            "lineage": lineage.to_dict("records"), "rows": rows}


def _runs(server: DagsterDev) -> list[dict]:
    return server.query("""{ runsOrError { ... on Runs { results { runId status startTime endTime
        tags { key value } } } } }""")["runsOrError"]["results"]


def _most_at_once(runs: list[dict]) -> int:
    events = sorted([(r["startTime"], 1) for r in runs] + [(r["endTime"], -1) for r in runs])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_four_drops_juiced_at_once_beside_a_reader_equal_a_serial_run(data_dir, tmp_path):
    settings = _make_drops(data_dir)
    with DagsterInstance.ephemeral() as inst:
        assert run_governor(data_dir, inst, settings).success
    stop = tmp_path / "stop-reader"
    reader = subprocess.Popen(reader_command(data_dir, stop, "own"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    # four runs at a time, launched together; the asset daemon (which evaluates the automation
    # sensor) is off, so that only the drop sensor launches runs
    server = DagsterDev(data_dir, tmp_path / "dagster_home", max_concurrent_runs=4,
                        extra_yaml=ONLY_THE_DROP_SENSOR + THREADED_LAUNCHES)
    try:
        server.wait_ready()
        deadline, runs = time.time() + 900, []
        while time.time() < deadline:
            runs = _runs(server)
            if len(runs) == len(DROPS) and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
                break
            time.sleep(3)
    finally:
        server.stop()
        stop.touch()
        out, err = reader.communicate(timeout=120)
    partitions = sorted(t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition")
    assert partitions == DROPS, runs
    assert [r["status"] for r in runs] == ["SUCCESS"] * len(DROPS), runs
    overlap = _most_at_once(runs)
    read = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"stderr": err}
    print(f"runs at once: {overlap}; reader: {read}")
    assert overlap == len(DROPS)  # all four really ran at the same time
    assert read["errors"] == [] and read["reads"] > 0, read
    parallel = _counts(data_dir)

    serial_dir = tmp_path / "serial"
    (serial_dir / "drops").mkdir(parents=True)
    assert _make_drops(serial_dir) == settings
    with DagsterInstance.ephemeral() as inst:
        assert run_governor(serial_dir, inst, settings).success
        for drop in DROPS:
            assert run_drop(serial_dir, inst, drop, settings, assets=None).success
    assert parallel == _counts(serial_dir)
    assert sum(d["n_samples"] for d in parallel["drops"]) == 4 * SAMPLES  # rows in = rows out, nothing lost
