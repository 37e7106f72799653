"""Beyond one machine, on loopback: the Dagster instance on PostgreSQL, the steps of four drop runs
on two dagster-celery workers behind Redis, catalog writes as commit records folded by one
committer, and a reader querying the catalog throughout. The outputs and catalog rows must equal a
serial in-process run of the same drops, and no pipeline writer may wait on the catalog lock."""
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from juicer_pipeline.settings import JuicerSettings, load_settings
from juicer_pipeline.world import DropConfig, generate_drop

from ..catalog_reader import reader_command
from ..helpers import REPO, PostgresServer, RedisServer, comparable_catalog_rows, run_drop, run_governor, wait_for

DROPS = [f"dist-{i}" for i in range(4)]
STAGES = ("raw_samples", "patch_saliency", "pruned_images", "extracted_classes", "sieve_scores", "enriched_captions")
BIN = Path(sys.executable).parent
CELERY_SETTINGS = REPO / "deploy" / "celery" / "juicer.toml"

def _make_drops(data_dir: Path, samples: int) -> None:
    for i, name in enumerate(DROPS):
        generate_drop(data_dir / "drops" / name, DropConfig(n_samples=samples, broken_rate=0.05, seed=70 + i,
                                                            drop_index=i))


def _serial(data_dir: Path, settings: JuicerSettings) -> float:
    """The baseline: the same drops, one after another, in this process, writing the catalog directly."""
    with DagsterInstance.ephemeral() as inst:
        assert run_governor(data_dir, inst, settings).success
        t0 = time.perf_counter()
        for drop in DROPS:
            assert run_drop(data_dir, inst, drop, settings, assets=None).success
        return time.perf_counter() - t0


def tables(data_dir: Path) -> dict:
    out = {}
    for stage in STAGES:
        for drop in DROPS:
            df = pq.read_table(data_dir / "warehouse" / stage / f"{drop}.parquet").to_pandas()
            for col in df.columns:  # paths name the data root, which differs between the two runs
                if df[col].dtype == object and df[col].map(lambda v: isinstance(v, str)).any():
                    df[col] = df[col].str.replace(str(data_dir), "<data>", regex=False)
            out[(stage, drop)] = df
    return out


class _Processes:
    """Every process the test starts, each in its own group, stopped together."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.procs = env, logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop(self, proc: subprocess.Popen, timeout: float = 60) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            try:
                self.stop(proc, timeout=30)
            except ProcessLookupError:
                pass


def run_celery_vs_serial(tmp_path: Path, samples: int = 60, workers: int = 2, extra_toml: str = "") -> dict:
    """Juice DROPS serially in-process (direct catalog writes), then again with `workers` celery
    workers, the PostgreSQL instance, commit records, a committer and a reader; return what was
    measured and both runs' outputs. Every server is started here on 127.0.0.1 and stopped.
    `extra_toml`: settings both runs add (the celery run to deploy/celery/juicer.toml's)."""
    serial_dir, dist_dir = tmp_path / "serial", tmp_path / "celery"
    for root in (serial_dir, dist_dir):
        _make_drops(root, samples)
    celery_settings = tmp_path / "celery-juicer.toml"
    celery_settings.write_text(f"{CELERY_SETTINGS.read_text()}\n{extra_toml}")
    os.environ.pop("JUICER_CONFIG", None)
    serial_s = _serial(serial_dir, JuicerSettings.model_validate(tomllib.loads(extra_toml)))

    pg, redis = PostgresServer(), RedisServer(tmp_path / "redis")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, **pg.env(), "DAGSTER_HOME": str(home), "JUICER_DATA_DIR": str(dist_dir),
           "JUICER_CONFIG": str(celery_settings), "JUICER_CELERY_BROKER": redis.url(0),
           "JUICER_CELERY_BACKEND": redis.url(1), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    saved = dict(os.environ)
    os.environ.update(env)
    procs = _Processes(env, tmp_path / "logs")
    stop_reader = tmp_path / "stop-reader"
    try:
        settings = load_settings(celery_settings)
        assert settings.catalog.writes == "commit_records" and settings.execution.executor == "celery"
        with DagsterInstance.get() as instance:  # the PostgreSQL instance of deploy/postgres/dagster.yaml
            storage_kind = type(instance.run_storage).__name__
            assert run_governor(dist_dir, instance, settings).success  # shared: writes the catalog itself
            instance.add_dynamic_partitions("drops", DROPS)

        worker_procs = [procs.start(f"worker{i}", [str(BIN / "dagster-celery"), "worker", "start", "-A",
                                                   "dagster_celery.app", "-y", str(REPO / "deploy/celery/worker.yaml"),
                                                   "-q", "dagster", "--name", f"w{i}", "--", "--concurrency=1"])
                        for i in range(workers)]
        wait_for(lambda: all(" ready." in procs.log(f"worker{i}") for i in range(workers)), 120,
                 "the celery workers ready", every=1)
        committer = procs.start("committer", [str(BIN / "juicer"), "catalog", "fold", "--every", "1"])
        reader = subprocess.Popen(reader_command(dist_dir, stop_reader, "published"), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

        t0 = time.perf_counter()
        runs = [procs.start(f"run-{d}", [str(BIN / "dagster"), "job", "execute", "-m", "juicer_pipeline.definitions",
                                         "-j", "juice_drop", "--tags", json.dumps({"dagster/partition": d})])
                for d in DROPS]
        codes = [r.wait(timeout=3000) for r in runs]
        celery_s = time.perf_counter() - t0
        assert codes == [0] * len(DROPS), "\n".join(procs.log(f"run-{d}")[-3000:] for d in DROPS)

        procs.stop(committer)  # SIGTERM: one last fold, then it exits
        folds = [json.loads(line) for line in procs.log("committer").splitlines() if line.startswith("{")]
        stop_reader.touch()
        read, _ = reader.communicate(timeout=120)
        for w in worker_procs:
            procs.stop(w)

        with DagsterInstance.get() as instance:
            records = instance.get_run_records(RunsFilter(job_name="juice_drop"))
            statuses = sorted((r.dagster_run.tags["dagster/partition"], r.dagster_run.status) for r in records)
            hosts = {e.dagster_event.engine_event_data.metadata["Celery worker"].value
                     for r in records for e in instance.all_logs(r.dagster_run.run_id)
                     if e.dagster_event and e.dagster_event.is_engine_event
                     and "Celery worker" in (e.dagster_event.engine_event_data.metadata or {})}
    finally:
        stop_reader.touch()
        procs.stop_all()
        redis.stop()
        pg.stop()
        os.environ.clear()
        os.environ.update(saved)
    return {"serial_s": serial_s, "celery_s": celery_s, "statuses": statuses, "hosts": hosts, "folds": folds,
            "reader": json.loads(read), "instance_storage": storage_kind,
            "serial_dir": serial_dir, "celery_dir": dist_dir}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_celery_workers_juice_four_drops_equal_to_a_serial_run(tmp_path):
    # 24 samples a drop; τ calibrated on 100 world images (test_class_extraction.py covers calibration)
    out = run_celery_vs_serial(tmp_path, samples=24, extra_toml="[classes]\ncalibration_images = 100\n")
    assert out["instance_storage"] == "PostgresRunStorage"
    assert out["statuses"] == [(d, DagsterRunStatus.SUCCESS) for d in DROPS]
    assert len(out["hosts"]) == 2, out["hosts"]  # both workers executed steps
    reader, folds = out["reader"], out["folds"]
    assert reader["errors"] == [] and reader["reads"] > 10, reader
    backoffs = sum(f["lock_backoffs"] for f in folds)
    folded = sum(f["folded"] for f in folds)
    assert folds[-1]["pending"] == 0 and folded == len(DROPS) * len(STAGES)
    assert backoffs == 0  # the committer was the catalog's only user: no lock conflict at all

    serial, dist = tables(out["serial_dir"]), tables(out["celery_dir"])
    for key in serial:
        pd.testing.assert_frame_equal(dist[key], serial[key], check_exact=True, obj=str(key))
    assert comparable_catalog_rows(out["celery_dir"]) == comparable_catalog_rows(out["serial_dir"])
    print(f"\n4 drops x {len(STAGES)} stages: serial in-process {out['serial_s']:.1f} s, celery (2 workers, "
          f"PostgreSQL instance, Redis broker) {out['celery_s']:.1f} s; commit records folded {folded} in "
          f"{len(folds)} folds, {backoffs} lock back-offs; reader: {reader['reads']} reads, "
          f"{len(reader['errors'])} errors, up to {reader['most_samples']} samples seen; "
          f"steps ran on {sorted(out['hosts'])}")
