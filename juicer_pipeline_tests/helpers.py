"""Helpers for hand-made drops and running the drop job."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
from PIL import Image

from dagster import AssetKey

from juicer_pipeline.definitions import DROP_JOB_NAME, GOVERNOR_JOB_NAME, build_definitions
from juicer_pipeline.settings import JuicerSettings

REPO = Path(__file__).resolve().parents[1]


def png_bytes(size=(32, 32), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, "PNG")
    return buf.getvalue()


def write_folder_drop(root: Path, files: dict[str, bytes], rows: list[dict], manifest: str = "parquet") -> Path:
    """A hand-made folder drop: files relative to the drop, manifest rows as given."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    df = pd.DataFrame(rows)
    if manifest == "parquet":
        df.to_parquet(root / "captions.parquet", index=False)
    elif manifest == "csv":
        df.to_csv(root / "captions.csv", index=False)
    else:
        df.to_json(root / "captions.jsonl", orient="records", lines=True)
    return root


def run_drop(data_dir: Path, instance, drop: str, settings: JuicerSettings | None = None, raise_on_error=True,
             assets: tuple[str, ...] | None = ("raw_samples",)):
    """Run the drop job for one partition; by default only ingestion (`assets=None`: every stage)."""
    defs = build_definitions(settings=settings, data_dir=data_dir)
    if drop not in instance.get_dynamic_partitions("drops"):
        instance.add_dynamic_partitions("drops", [drop])
    selection = [AssetKey(a) for a in assets] if assets else None
    return defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(
        partition_key=drop, instance=instance, raise_on_error=raise_on_error, asset_selection=selection,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})


def tiny_governor_world(root: Path, eval_samples: int) -> Path:
    """The training tests' set-up: a random-init tiny governor (64 px, conv stem, seeded) at
    `root/tiny.safetensors` and the world's held-out sets of `eval_samples` images each."""
    import torch

    from juicer_pipeline.models.loader import save_world_clip
    from juicer_pipeline.models.world_clip import build_clip, tiny_arch
    from juicer_pipeline.world import generate_eval_set

    torch.manual_seed(0)
    arch = tiny_arch(image_size=64, conv_stem=True)
    path = root / "tiny.safetensors"
    save_world_clip(build_clip(arch), arch, path, {"note": "random init"})
    for kind in ("retrieval", "classification"):
        generate_eval_set(root / "world" / "evalsets" / kind, kind, eval_samples)
    return path


def comparable_catalog_rows(data_dir: Path) -> dict:
    """Everything the per-drop stages put in the catalog, without what differs by run, data root or
    file times (a drop's version fingerprints its files' modification times): two data roots
    juiced from the same drops by different executors compare equal."""
    import re

    from juicer_pipeline.storage import Catalog

    cat = Catalog(data_dir / "catalog.duckdb")
    frames = {
        "samples": cat.query("SELECT * FROM samples ORDER BY sample_id"),
        "drops": cat.query("SELECT * EXCLUDE (ingested_at, run_id, version, status_changed_at) FROM drops "
                           "ORDER BY drop_id"),
        "lineage": cat.query("SELECT artifact, asset, partition_key, inputs, code_version, config_hash, governor_id "
                             "FROM lineage_current WHERE partition_key IS NOT NULL ORDER BY artifact"),
    }
    text = json.dumps({k: v.to_dict("records") for k, v in frames.items()}, default=str).replace(str(data_dir), "<data>")
    return json.loads(re.sub(r"drop_version:[0-9a-f]{64}", "drop_version:<version>", text))


def code_versions(defs) -> dict[str, str]:
    """Asset name -> Dagster code version, for every materialisable asset of the definitions."""
    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).code_version for key in graph.materializable_asset_keys}


class DropSensorTicks:
    """Ticks of the drop sensor as the daemon runs them: the cursor carried from tick to tick, and
    each tick's asset events stored and partitions added before the next."""

    def __init__(self, data_dir: Path, instance, settings: JuicerSettings | None = None):
        from dagster import build_sensor_context

        from juicer_pipeline.assets.resources import StorageResource

        self.defs = build_definitions(settings=settings, data_dir=data_dir)
        self.instance, self.cursor = instance, None
        self._context = lambda: build_sensor_context(
            instance=instance, instance_ref=instance.get_ref(), definitions=self.defs, cursor=self.cursor,
            resources={"storage": StorageResource(data_dir=str(data_dir))})

    def tick(self):
        result = self.defs.resolve_sensor_def("drop_sensor").evaluate_tick(self._context())
        self.cursor = result.cursor if result.cursor is not None else self.cursor
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)
        for request in result.dynamic_partitions_requests:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result


def run_governor(data_dir: Path, instance, settings: JuicerSettings):
    defs = build_definitions(settings=settings, data_dir=data_dir)
    return defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
        instance=instance, asset_selection=[AssetKey("governor")],
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# dagster.yaml additions for the daemon tests: no asset daemon (only the drop sensor starts runs), and
# queued runs launched by parallel threads: a launch waits until its run process has imported the
# code, so one at a time runs queued together would start seconds apart
ONLY_THE_DROP_SENSOR = "auto_materialize:\n  enabled: false\n  use_sensors: false\n"
THREADED_LAUNCHES = ("run_coordinator:\n  module: dagster.core.run_coordinator\n  class: QueuedRunCoordinator\n"
                     "  config:\n    dequeue_use_threads: true\n    dequeue_num_workers: 4\n")


class DagsterDev:
    """`dagster dev` on a free loopback port, in its own process group so that it can be killed whole
    (it does not exit promptly on SIGINT)."""

    def __init__(self, data_dir: Path, home: Path, max_concurrent_runs: int | None = None, extra_yaml: str = ""):
        home.mkdir(parents=True, exist_ok=True)
        yaml = (REPO / "dagster.yaml").read_text()
        if max_concurrent_runs is not None:
            yaml = re.sub(r"max_concurrent_runs: \d+", f"max_concurrent_runs: {max_concurrent_runs}", yaml)
        (home / "dagster.yaml").write_text(yaml + extra_yaml)
        self.port = _free_port()
        env = {**os.environ, "DAGSTER_HOME": str(home), "JUICER_DATA_DIR": str(data_dir)}
        dagster = Path(sys.executable).with_name("dagster")
        self.proc = subprocess.Popen([str(dagster), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1",
                                      "-p", str(self.port)], cwd=REPO, env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.loads(resp.read())
        assert "errors" not in out, out
        return out["data"]

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                data = self.query("""{ repositoriesOrError { ... on RepositoryConnection { nodes {
                    name location { name } sensors { name sensorState { status } } jobs { name }
                    schedules { name scheduleState { status } } } } }
                    assetNodes { assetKey { path } partitionDefinition { description } } }""")
                if data["repositoriesOrError"]["nodes"]:
                    return data
            except (OSError, AssertionError):
                pass
            time.sleep(2)
        raise AssertionError(f"the UI did not answer GraphQL within {timeout} s")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def free_port() -> int:
    return _free_port()


def wait_for(check, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def _stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class RedisServer:
    """Debian's redis-server on a free loopback port, nothing saved to disk."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)], start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG", 30, "redis-server answering PING")

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        _stop_group(self.proc)


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; `make test` does it)")
    return str(found[-1])


class PostgresServer:
    """Debian's PostgreSQL in a temporary cluster on a free loopback port. initdb refuses to run as
    root, so the cluster belongs to the `postgres` user when the tests run as root."""

    USER = "dagster"

    def __init__(self):
        # its own folder under /tmp: the postgres user cannot enter pytest's root-only tmp_path
        self.root = Path(tempfile.mkdtemp(prefix="juicer-pg-"))
        self.root.chmod(0o755)
        self.dir = self.root / "pgdata"
        self.dir.mkdir()
        self.port = _free_port()
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, text=True)
        self._run(_pg_bin("initdb"), "-D", str(self.dir), "-A", "trust", "-U", self.USER)
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-l", str(self.dir / "server.log"), "-w", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}", "start")
        self._run(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, "dagster")

    def env(self) -> dict[str, str]:
        """What deploy/postgres/dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.USER,
                "DAGSTER_PG_PASSWORD": "unused-with-trust", "DAGSTER_PG_DB": "dagster"}

    def stop(self) -> None:
        try:
            self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class MotoS3Server:
    """moto's S3-compatible server on a free loopback port (no data leaves the process)."""

    KEY, SECRET = "juicer-test", "juicer-test-secret"

    def __init__(self):
        self.port = _free_port()
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                      "-p", str(self.port)], start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                urllib.request.urlopen(f"{self.endpoint}/", timeout=2)
                return True
            except OSError:
                return False
        wait_for(answers, 60, "moto_server answering")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": self.KEY, "secret": self.SECRET}

    def stop(self) -> None:
        _stop_group(self.proc)
