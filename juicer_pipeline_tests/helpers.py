"""Helpers for hand-made drops and running the drop job."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
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


def run_governor(data_dir: Path, instance, settings: JuicerSettings):
    defs = build_definitions(settings=settings, data_dir=data_dir)
    return defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
        instance=instance, asset_selection=[AssetKey("governor")],
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
