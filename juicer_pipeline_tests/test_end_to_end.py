"""Slow end-to-end tests: the demo command and the real Dagster UI server."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from juicer_pipeline.cli import main
from juicer_pipeline.storage import Catalog

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_generates_world_juices_drops_and_prints_summary(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    args = ["demo", "--drops", "2", "--samples", "150", "--eval-samples", "50", "--skip-training"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "juicer demo summary" in out and "quarantined by reason" in out
    assert "saliency vs truth on demo-00" in out and "classes vs truth" in out
    assert (data_dir / "juicer.toml").exists()  # the demo's settings, shared with `make ui`
    drops = Catalog(data_dir / "catalog.duckdb").query("SELECT * FROM drops ORDER BY drop_id")
    assert list(drops.drop_id) == ["demo-00", "demo-01"] and list(drops.format) == ["folder", "wds"]
    assert (drops.n_samples == 150).all() and (drops.n_valid + drops.n_quarantined == 150).all()
    assert f"total: 300 samples, {drops.n_valid.sum()} valid" in out
    for kind in ("retrieval", "classification"):
        assert (data_dir / "world" / "evalsets" / kind / "captions.parquet").exists()
    # a second run reuses the world and replaces rows instead of adding them
    assert main(args) == 0
    assert Catalog(data_dir / "catalog.duckdb").query("SELECT count(*) AS n FROM samples").n[0] == 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["data"]


@pytest.mark.slow
def test_ui_serves_assets_and_sensor_without_errors(data_dir, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "JUICER_DATA_DIR": str(data_dir)}
    dagster = Path(sys.executable).with_name("dagster")
    # dagster dev does not exit promptly on SIGINT: own process group, then SIGKILL the group.
    proc = subprocess.Popen([str(dagster), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1",
                             "-p", str(port)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        data = None
        while time.time() < deadline:
            try:
                data = _graphql(port, """{ repositoriesOrError { ... on RepositoryConnection { nodes {
                    sensors { name sensorState { status } } jobs { name } } } }
                    assetNodes { assetKey { path } partitionDefinition { description } } }""")
                if data["repositoriesOrError"]["nodes"]:
                    break
            except OSError:
                pass
            time.sleep(2)
        assert data is not None, "the UI did not answer GraphQL within 120 s"
        repo = data["repositoriesOrError"]["nodes"][0]
        assert {"name": "drop_sensor", "sensorState": {"status": "RUNNING"}} in repo["sensors"]
        assert "juice_drop" in {j["name"] for j in repo["jobs"]}
        assets = {tuple(a["assetKey"]["path"]): a for a in data["assetNodes"]}
        assert "drops" in assets[("raw_samples",)]["partitionDefinition"]["description"]
        errors = _graphql(port, "{ workspaceOrError { ... on Workspace { locationEntries { name "
                                "locationOrLoadError { __typename } } } } }")
        (entry,) = errors["workspaceOrError"]["locationEntries"]
        assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
