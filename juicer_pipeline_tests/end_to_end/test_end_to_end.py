"""Slow end-to-end tests: the demo command and the real Dagster UI server."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from juicer_pipeline.cli import main
from juicer_pipeline.storage import Catalog

from ..helpers import DagsterDev

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_generates_world_juices_drops_and_prints_summary(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    args = ["demo", "--drops", "2", "--samples", "60", "--eval-samples", "50", "--skip-training"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "juicer demo summary" in out and "quarantined by reason" in out
    assert "saliency vs truth on demo-00" in out and "classes vs truth" in out
    assert (data_dir / "juicer.toml").exists()  # the demo's settings, shared with `make ui`
    drops = Catalog(data_dir / "catalog.duckdb").query("SELECT * FROM drops ORDER BY drop_id")
    assert list(drops.drop_id) == ["demo-00", "demo-01"] and list(drops.format) == ["folder", "wds"]
    assert (drops.n_samples == 60).all() and (drops.n_valid + drops.n_quarantined == 60).all()
    assert f"total: 120 samples, {drops.n_valid.sum()} valid" in out
    for kind in ("retrieval", "classification"):
        assert (data_dir / "world" / "evalsets" / kind / "captions.parquet").exists()
    # a second run reuses the world and replaces rows instead of adding them
    assert main(args) == 0
    assert Catalog(data_dir / "catalog.duckdb").query("SELECT count(*) AS n FROM samples").n[0] == 120


def test_the_demo_names_the_recipes_its_table_leaves_out():
    from juicer_pipeline.demo import DEMO_RECIPES, demo_scope
    from juicer_pipeline.governance.recipes import RECIPE_NAMES

    assert set(DEMO_RECIPES) < set(RECIPE_NAMES)
    line = demo_scope(list(DEMO_RECIPES), 2)
    assert f"trains {len(DEMO_RECIPES)} of {len(RECIPE_NAMES)} recipes" in line and "2 seeds" in line
    left_out = line.split("left out: ")[1].split(")")[0].split(", ")
    assert set(left_out) == set(RECIPE_NAMES) - set(DEMO_RECIPES) and "flip" in left_out
    assert "left out: none" in demo_scope(RECIPE_NAMES, 3)


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    """One `dagster dev` for the UI tests of this module (each start loads the code location in
    three processes), on a data root of its own: `server.data_dir`."""
    root = tmp_path_factory.mktemp("ui")
    data_dir = root / "data"
    (data_dir / "drops").mkdir(parents=True)
    server = DagsterDev(data_dir, root / "dagster_home")
    server.data_dir = data_dir
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_ui_lists_assets_sensors_and_schedule_without_errors(dagster_dev):
    data = dagster_dev.wait_ready()
    repo = data["repositoriesOrError"]["nodes"][0]
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    # the committer runs only where steps write commit records ([catalog] writes), not by default
    assert sensors == {"drop_sensor": "RUNNING", "automation": "RUNNING", "catalog_committer": "STOPPED"}
    assert {s["name"] for s in repo["schedules"]} == {"retrain_recipes"}
    assert {"juice_drop", "prepare_shared", "train_recipe", "compare_recipes"} <= {j["name"] for j in repo["jobs"]}
    assets = {tuple(a["assetKey"]["path"]): a for a in data["assetNodes"]}
    assert "drops" in assets[("raw_samples",)]["partitionDefinition"]["description"]
    assert {("governor",), ("enriched_captions",), ("clip_checkpoint",), ("recipe_comparison",)} <= set(assets)
    errors = dagster_dev.query("{ workspaceOrError { ... on Workspace { locationEntries { name "
                               "locationOrLoadError { __typename } } } } }")
    (entry,) = errors["workspaceOrError"]["locationEntries"]
    assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def _chromium(url: str, out_png: Path, profile: Path) -> str:
    """Render a page headless: a screenshot, and the DOM after its JavaScript ran."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required for the browser tests (.ci/run installs it)"
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
            "--virtual-time-budget=20000"]
    subprocess.run([*base, f"--screenshot={out_png}", url], check=True, capture_output=True, timeout=120)
    return subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.slow
def test_browser_renders_the_asset_graph_and_an_asset_page(dagster_dev, tmp_path):
    dagster_dev.wait_ready()
    shots = Path(os.environ.get("JUICER_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{dagster_dev.port}"
    graph = _chromium(f"{base}/asset-groups", shots / "asset_graph.png", tmp_path / "profile1")
    assert "Global asset lineage" in graph
    for group in ("ingest", "vision", "text", "training", "evaluation"):
        assert f">{group}<" in graph, f"group {group} not rendered in the asset graph"
    vision = _chromium(f"{base}/locations/juicer_pipeline.definitions/asset-groups/vision",
                       shots / "asset_group_vision.png", tmp_path / "profile3")
    for name in ("governor", "patch_saliency", "pruned_images", "extracted_classes", "sieve_scores"):
        assert name in vision, f"{name} not rendered in the vision group graph"
    page = _chromium(f"{base}/assets/pruned_images", shots / "asset_pruned_images.png", tmp_path / "profile2")
    assert "pruned_images" in page and "Top ⌈ρ·N⌉ patches" in page
    assert "Join the Dagster community" not in page  # dagster.yaml turns the first-visit modal off
    assert (shots / "asset_graph.png").stat().st_size > 10_000


@pytest.mark.slow
def test_materialise_a_drop_through_graphql_and_read_back_metadata_and_lineage(dagster_dev):
    """Last of the tests on the module's server: the partition it adds wakes its sensors."""
    from juicer_pipeline.world import DropConfig, generate_drop

    data_dir = dagster_dev.data_dir

    repo = dagster_dev.wait_ready()["repositoriesOrError"]["nodes"][0]
    selector = {"repositoryLocationName": repo["location"]["name"], "repositoryName": repo["name"]}
    # the drop is written under a hidden name and renamed, as users are told to; the partition is added
    # through the API (the sensor would do the same within its 30 s interval)
    generate_drop(data_dir / "drops" / ".gql-drop", DropConfig(n_samples=60, seed=9))
    dagster_dev.query("""mutation($sel: RepositorySelector!) { addDynamicPartition(repositorySelector: $sel,
        partitionsDefName: "drops", partitionKey: "gql-drop") { __typename } }""", {"sel": selector})
    (data_dir / "drops" / ".gql-drop").rename(data_dir / "drops" / "gql-drop")
    launched = dagster_dev.query("""mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""", {"params": {
        "selector": {**selector, "jobName": "juice_drop", "assetSelection": [{"path": ["raw_samples"]}]},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "gql-drop"}]}}})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline, status = time.time() + 180, None
    while time.time() < deadline:
        status = dagster_dev.query("""query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }""",
                                   {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS"
    mats = dagster_dev.query("""{ assetOrError(assetKey: {path: ["raw_samples"]}) { ... on Asset {
        assetMaterializations(partitions: ["gql-drop"]) { runId partition metadataEntries { label
        ... on IntMetadataEntry { intValue } } } } } }""")["assetOrError"]["assetMaterializations"]
    # the server's sensors may juice the new drop too (they tick every 30 s): read back this run's
    (mine,) = [m for m in mats if m["runId"] == run_id]
    entries = {e["label"]: e.get("intValue") for e in mine["metadataEntries"]}
    assert entries["samples"] == 60 and entries["valid"] + entries["quarantined"] == 60
    lineage = Catalog(data_dir / "catalog.duckdb").query(
        "SELECT run_id, code_version FROM lineage WHERE artifact = 'raw_samples/gql-drop'")
    assert run_id in set(lineage.run_id)


def _drop_runs(server: DagsterDev) -> list[dict]:
    runs = server.query("""{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }""")
    return [{"run_id": r["runId"], "status": r["status"], **{t["key"]: t["value"] for t in r["tags"]}}
            for r in runs["runsOrError"]["results"]]


def _wait_for_runs(server: DagsterDev, n: int, timeout: float = 420) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = _drop_runs(server)
        if len(runs) >= n and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"waited {timeout:.0f}s for {n} finished runs: {_drop_runs(server)}")


def _run_end_times(server: DagsterDev) -> list[float]:
    runs = server.query("{ runsOrError { ... on Runs { results { endTime } } } }")["runsOrError"]["results"]
    return [r["endTime"] for r in runs]


def _next_tick(server: DagsterDev, sensor: dict, after: float, timeout: float = 120) -> dict:
    """The sensor's first finished tick that started after `after` (it ticks every 30 s)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ticks = server.query("""query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor {
            sensorState { ticks(limit: 3) { timestamp status runIds } } } } }""", {"s": sensor})
        done = [t for t in ticks["sensorOrError"]["sensorState"]["ticks"]
                if t["timestamp"] > after and t["status"] in ("SUCCESS", "SKIPPED", "FAILURE")]
        if done:
            return min(done, key=lambda t: t["timestamp"])
        time.sleep(2)
    raise AssertionError(f"no {sensor['sensorName']} tick within {timeout} s after the last run")


def _raw_samples_status(server: DagsterDev, drops: list[str]) -> list[str]:
    """What the UI shows per partition: FRESH, or STALE ('Unsynced')."""
    nodes = server.query("""query($p: [String!]) { assetNodes(assetKeys: [{path: ["raw_samples"]}]) {
        staleStatusByPartition(partitions: $p) } }""", {"p": drops})["assetNodes"]
    return nodes[0]["staleStatusByPartition"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_daemon_rejuices_exactly_the_drop_whose_files_changed(data_dir, tmp_path):
    """The real daemon and webserver: two drops are juiced; one gets a new image and manifest row;
    the UI then shows only its raw_samples partition unsynced, and the drop sensor launches one run
    for it, tagged with its new version; after that run both are fresh and no further run comes."""
    from dagster import DagsterInstance

    from juicer_pipeline.settings import load_settings
    from juicer_pipeline.world import DropConfig, generate_drop

    from ..helpers import ONLY_THE_DROP_SENSOR, THREADED_LAUNCHES, png_bytes, run_governor

    # each run in one process (no process start per step); juice_drop needs the governor, and the
    # asset daemon is off below, so only the drop sensor starts runs
    # (τ calibrated on 100 world images: test_class_extraction.py covers calibration)
    (data_dir / "juicer.toml").write_text('[execution]\nexecutor = "in_process"\n[classes]\ncalibration_images = 100\n')
    with DagsterInstance.ephemeral() as inst:
        assert run_governor(data_dir, inst, load_settings(data_dir=data_dir)).success
    for i, name in enumerate(("keep", "grow")):
        generate_drop(data_dir / "drops" / name, DropConfig(n_samples=12, manifest_format="csv", seed=70 + i))
    server = DagsterDev(data_dir, tmp_path / "dagster_home", extra_yaml=ONLY_THE_DROP_SENSOR + THREADED_LAUNCHES)
    try:
        repo = server.wait_ready()["repositoriesOrError"]["nodes"][0]
        sensor = {"repositoryLocationName": repo["location"]["name"], "repositoryName": repo["name"],
                  "sensorName": "drop_sensor"}
        first = _wait_for_runs(server, 2)
        assert sorted(r["dagster/partition"] for r in first) == ["grow", "keep"], first
        assert {r["status"] for r in first} == {"SUCCESS"}, first
        assert _raw_samples_status(server, ["keep", "grow"]) == ["FRESH", "FRESH"]
        grow = data_dir / "drops" / "grow"
        (grow / "images" / "late.png").write_bytes(png_bytes(colour=(5, 150, 250)))
        with open(grow / "captions.csv", "a") as manifest:
            manifest.write("images/late.png,a late blue square\n")
        deadline = time.time() + 120  # the sensor looks every 30 s
        while _raw_samples_status(server, ["keep", "grow"]) != ["FRESH", "STALE"] and time.time() < deadline:
            time.sleep(2)
        assert _raw_samples_status(server, ["keep", "grow"]) == ["FRESH", "STALE"]
        runs = _wait_for_runs(server, 3)
        (again,) = [r for r in runs if r["run_id"] not in {f["run_id"] for f in first}]
        assert again["dagster/partition"] == "grow" and again["status"] == "SUCCESS", again
        assert len(again["juicer/drop_version"]) == 64
        assert _raw_samples_status(server, ["keep", "grow"]) == ["FRESH", "FRESH"]
        # one more sensor tick after that run: unchanged drops start nothing
        tick = _next_tick(server, sensor, after=max(_run_end_times(server)))
        assert tick["runIds"] == [] and len(_drop_runs(server)) == 3, tick
    finally:
        server.stop()
    assert Catalog(data_dir / "catalog.duckdb").query(
        "SELECT n_samples FROM drops WHERE drop_id = 'grow'").n_samples[0] == 13
