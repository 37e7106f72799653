"""The juiced dataset leaves the pipeline: WebDataset shards in img2dataset's layout, read back by
webdataset, open_clip_train and DataComp-style uid filtering."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from dagster import AssetKey, instance_for_test
from PIL import Image

from juicer_pipeline.assets.export import export_request
from juicer_pipeline.assets.resources import StorageResource
from juicer_pipeline.cli import main as juicer_main
from juicer_pipeline.definitions import EXPORT_JOB_NAME, GOVERNOR_JOB_NAME, RECIPES_JOB_NAME, build_definitions
from juicer_pipeline.export import ExportError, export_training_set, uid_for
from juicer_pipeline.export import samples as export_samples
from juicer_pipeline.governance.images import load_rgb
from juicer_pipeline.governance.pruning import kept_on_grid
from juicer_pipeline.settings import ClassSettings, GovernorSettings, JuicerSettings, TrainingSettings
from juicer_pipeline.storage import Catalog, Warehouse
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import run_drop, tiny_governor_world

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
RECIPES = ("raw", "datasieve", "datajuicer")


@pytest.fixture(scope="module")
def juiced(tmp_path_factory):
    """Two juiced drops (64 px images, an 8x8 governor grid) and three recipes' training sets."""
    root = tmp_path_factory.mktemp("export") / "data"
    tiny_governor_world(root, 40)
    generate_drop(root / "drops" / "d1", DropConfig(n_samples=40, seed=1, broken_rate=0.05))
    generate_drop(root / "drops" / "d2", DropConfig(n_samples=30, seed=2, drop_index=1, format="wds"))
    settings = JuicerSettings(
        governor=GovernorSettings(source=f"file:{root / 'tiny.safetensors'}", batch_size=64),
        classes=ClassSettings(calibration_images=20),
        training=TrainingSettings(seeds=[0], budget_full_steps=2, batch_size=16, student="world-xs", eval_points=1))
    defs = build_definitions(settings, root)
    with instance_for_test() as inst:
        assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=inst, run_config=QUIET).success
        for drop in ("d1", "d2"):
            assert run_drop(root, inst, drop, settings, assets=None).success
        for recipe in RECIPES:
            assert defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(
                instance=inst, partition_key=recipe, run_config=QUIET,
                asset_selection=[AssetKey("training_set")]).success
        yield root, settings, defs, inst
    shutil.rmtree(root, ignore_errors=True)


def _storage(root: Path) -> StorageResource:
    return StorageResource(data_dir=str(root))


def _export(root, settings, recipe, out, **kwargs):
    storage = _storage(root)
    request, governor = export_request(settings, storage, recipe, **kwargs)
    return export_training_set(storage.warehouse, str(out), request, governor)


def _samples(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))


def test_export_layout_fields_and_kept_tokens(juiced, tmp_path):
    root, settings, _, _ = juiced
    wh = Warehouse(root)
    out = tmp_path / "dj"
    result = _export(root, settings, "datajuicer", out, grids=[(4, 4)], samples_per_shard=25)
    members = wh.read_table("training_set", "datajuicer").to_pandas().set_index("sample_id")
    n = len(members)
    assert result.n_samples == n and result.n_shards == -(-n // 25) >= 2
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == sorted([f"{i:05d}{ext}" for i in range(result.n_shards) for ext in (".tar", ".parquet",
                                                                                          "_stats.json")]
                           + ["sizes.json"])
    assert {p.name for p in out.iterdir()} == {"shards", "uids.npy", "excluded.parquet", "manifest.json",
                                               "open_clip_model"}
    samples = _samples(out)
    assert len(samples) == n
    saliency = pd.concat([wh.read_table("patch_saliency", d, ["sample_id", settings.saliency.method]).to_pandas()
                          for d in ("d1", "d2")]).set_index("sample_id")[settings.saliency.method]
    for s in samples:
        meta = s["json"]
        assert "." not in s["__key__"] and s["__key__"] == meta["uid"] == uid_for(meta["sample_id"])
        m = members.loc[meta["sample_id"]]
        assert s["txt"] == m.train_caption and meta["caption_version"] == m.caption_version
        assert s["jpg"].size == (64, 64)
        assert s["saliency.npy"].shape == (8, 8) and s["saliency.npy"].dtype == np.float32
        assert s["kept.8x8.npy"].tolist() == list(m.kept)  # the training set's own, 0-based, row-major
        stored = np.asarray(saliency[meta["sample_id"]], np.float32)
        assert np.allclose(s["saliency.npy"].ravel(), stored)
        # on another grid, resampled as training resamples for a student on that grid
        assert s["kept.4x4.npy"].tolist() == kept_on_grid(stored[None], (8, 8), (4, 4), settings.saliency.rho)[0].tolist()
        assert meta["governor_id"] == result.manifest["governor"]["model_id"] and meta["rho"] == settings.saliency.rho
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == n and set(sizes) == {f"{i:05d}.tar" for i in range(result.n_shards)}
    shard_rows = pd.concat([pd.read_parquet(out / "shards" / f"{i:05d}.parquet") for i in range(result.n_shards)])
    assert sorted(shard_rows.uid) == sorted(s["json"]["uid"] for s in samples)
    stats = json.loads((out / "shards" / "00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 25


def test_manifest_uids_and_exclusions(juiced, tmp_path):
    import hashlib

    root, settings, _, _ = juiced
    out = tmp_path / "dj"
    result = _export(root, settings, "datajuicer", out, samples_per_shard=25)
    m = json.loads((out / "manifest.json").read_text())
    assert m == result.manifest and m["schema_version"] == 1 and m["recipe"] == "datajuicer"
    for s in m["shards"]:
        assert hashlib.sha256((out / "shards" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert m["grids"] == [{"name": "8x8", "h": 8, "w": 8, "k": 32, "file": "kept.8x8.npy", "source": "training set"}]
    assert m["image"]["width"] == m["image"]["height"] == 64 and m["image"]["patch_size"] == [8, 8]
    assert any("Resize" in step for step in m["image"]["geometry"])
    assert m["provenance"]["lineage_seq"] is not None and m["provenance"]["code_version"].startswith("juiced_dataset")
    uids = np.load(out / "uids.npy")
    assert uids.dtype == np.dtype("u8,u8") and len(uids) == m["samples"]
    assert (np.sort(uids) == uids).all()
    as_hex = {f"{a:016x}{b:016x}" for a, b in uids.tolist()}
    assert as_hex == {s["json"]["uid"] for s in _samples(out)}
    excluded = pd.read_parquet(out / "excluded.parquet")
    expected = pd.read_parquet(root / "warehouse" / "training_set_excluded" / "datajuicer.parquet")
    assert sorted(excluded.sample_id) == sorted(expected.sample_id) and "quarantined" in set(excluded.reason)


def test_exported_images_are_what_the_governor_saw(juiced, tmp_path):
    """Lossless: each PNG is the governor's geometry applied to the ingested image, and the governor
    scores the exported image exactly as it scored the sample."""
    from juicer_pipeline.governance.saliency import VisionPass
    from juicer_pipeline.models.loader import load_foundation_model

    root, settings, _, _ = juiced
    wh = Warehouse(root)
    out = tmp_path / "png"
    result = _export(root, settings, "datajuicer", out, lossless=True)
    fm = load_foundation_model(settings.governor.source)
    raw = wh.read_table("raw_samples", "d1", ["sample_id", "image"]).to_pandas().set_index("sample_id")
    samples = [s for s in _samples(out) if s["json"]["drop"] == "d1"][:4]
    vision = VisionPass(fm.model)
    try:
        for s in samples:
            png = s["png"]
            expected = result_geometry(settings).apply(load_rgb(raw.image[s["json"]["sample_id"]]))
            assert np.array_equal(np.asarray(png), np.asarray(expected))
            again = vision.run(fm.preprocess(png)[None]).saliency[settings.saliency.method][0].numpy()
            assert np.allclose(again, s["saliency.npy"].ravel(), atol=1e-5)
    finally:
        vision.close()
    assert result.manifest["image"]["format"] == "png"


def result_geometry(settings):
    from juicer_pipeline.export import governor_geometry
    from juicer_pipeline.models.loader import load_foundation_model

    return governor_geometry(load_foundation_model(settings.governor.source).preprocess)


def test_rerun_replaces_whole_and_a_failed_export_leaves_the_old_one(juiced, tmp_path, monkeypatch):
    root, settings, _, _ = juiced
    out = tmp_path / "dj"
    first = _export(root, settings, "datajuicer", out, samples_per_shard=25)
    again = _export(root, settings, "datajuicer", out, samples_per_shard=25)
    assert again.export_id == first.export_id  # same inputs, same bytes: re-runnable
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []
    real = export_samples._encode_image

    def failing(*args):
        calls.append(1)
        if len(calls) > 30:  # after the first shard was published
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(export_samples, "_encode_image", failing)
    with pytest.raises(OSError, match="disk full"):
        _export(root, settings, "datajuicer", out, samples_per_shard=10)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the old export, whole; the half-written one never appeared
    assert [p.name for p in tmp_path.iterdir()] == ["dj"]  # and its staging folder is gone


def test_bad_inputs_fail_clearly(juiced, tmp_path, monkeypatch, capsys):
    root, settings, _, _ = juiced
    with pytest.raises(ExportError, match=r"no training set yet: materialise training_set\[flip\]"):
        _export(root, settings, "flip", tmp_path / "a")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        _export(root, settings, "nope", tmp_path / "a")
    with pytest.raises(ExportError, match="raw.*no kept tokens"):
        _export(root, settings, "raw", tmp_path / "a", grids=[(4, 4)])
    wh = Warehouse(root)
    empty = wh.read_table("training_set", "raw").slice(0, 0)
    wh.write_table("training_set", "juicer_text_only", empty)
    try:
        with pytest.raises(ExportError, match="juicer_text_only' has no members"):
            _export(root, settings, "juicer_text_only", tmp_path / "a")
    finally:
        Path(wh.partition_path("training_set", "juicer_text_only")).unlink()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ExportError, match="cannot write an export"):
        _export(root, settings, "datajuicer", a_file / "sub")
    foreign = tmp_path / "home"
    (foreign / "notes").mkdir(parents=True)
    with pytest.raises(ExportError, match="is not a juicer export"):
        _export(root, settings, "datajuicer", foreign)
    assert (foreign / "notes").is_dir()
    # the command line: one clear line, exit status 2
    monkeypatch.setenv("JUICER_DATA_DIR", str(root))
    monkeypatch.setenv("JUICER_CONFIG", str(_settings_file(tmp_path, settings)))
    assert juicer_main(["export", "--recipe", "flip", "--out", str(tmp_path / "b")]) == 2
    assert "juicer: error: recipe 'flip' has no training set yet" in capsys.readouterr().err
    assert juicer_main(["export", "--recipe", "datajuicer", "--out", str(a_file / "sub")]) == 2
    assert "cannot write an export" in capsys.readouterr().err
    assert juicer_main(["export", "--recipe", "datajuicer", "--out", str(tmp_path / "c"), "--grid", "4by4"]) == 2
    assert "grid '4by4' is not HxW" in capsys.readouterr().err


def _settings_file(tmp_path: Path, settings: JuicerSettings) -> Path:
    path = tmp_path / "juicer.toml"
    path.write_text(f'[governor]\nsource = "{settings.governor.source}"\nbatch_size = 64\n'
                    f'[classes]\ncalibration_images = 20\n'
                    f'[training]\nseeds = [0]\nbudget_full_steps = 2\nbatch_size = 16\nstudent = "world-xs"\n'
                    f'eval_points = 1\n')
    return path


def test_sieve_exports_uids_alone_that_subset_the_pool_datacomp_style(juiced, tmp_path):
    root, settings, _, _ = juiced
    pool = _export(root, settings, "raw", tmp_path / "raw")
    sieve = _export(root, settings, "datasieve", tmp_path / "sieve")
    assert {p.name for p in (tmp_path / "sieve").iterdir()} == {"uids.npy", "excluded.parquet", "manifest.json"}
    assert sieve.manifest["uids_only"] and sieve.manifest["shards"] == []
    subset = np.load(tmp_path / "sieve" / "uids.npy")
    assert subset.dtype == np.dtype("u8,u8") and (np.sort(subset) == subset).all()
    # what DataComp's resharder -s does: keep the pool's samples whose uid is in the subset
    wanted = {f"{a:016x}{b:016x}" for a, b in subset.tolist()}
    kept = {s["json"]["sample_id"] for s in _samples(tmp_path / "raw") if s["json"]["uid"] in wanted}
    members = Warehouse(root).read_table("training_set", "datasieve").to_pandas()
    assert kept == set(members.sample_id) and 0 < len(kept) < pool.n_samples


def test_asset_metadata_preview_and_lineage_both_ways(juiced, tmp_path, monkeypatch, capsys):
    from juicer_pipeline.storage.lineage import trace_export

    root, settings, defs, inst = juiced
    result = defs.resolve_job_def(EXPORT_JOB_NAME).execute_in_process(instance=inst, partition_key="datajuicer",
                                                                      run_config=QUIET)
    assert result.success
    meta = result.asset_materializations_for_node("juiced_dataset")[0].metadata
    members = Warehouse(root).read_table("training_set", "datajuicer").to_pandas()
    assert meta["samples"].value == len(members) and meta["shards"].value == 1 and meta["bytes"].value > 10_000
    assert "| 8x8 | 32 |" in meta["k_per_grid"].value
    preview = meta["preview"].value
    assert preview.count("data:image/png;base64,") == 4 and "kept 32/64" in preview and "classes:" in preview
    assert "open_clip_train.main" in meta["open_clip_train"].value
    out = root / "warehouse" / "juiced_dataset" / "datajuicer"
    manifest = json.loads((out / "manifest.json").read_text())
    cat = Catalog(root / "catalog.duckdb")
    back = trace_export(cat, manifest["export_id"][:10])
    assert back["recipe"] == "datajuicer" and back["training_set_id"] == manifest["training_set_id"]
    assert sorted(back["members"].sample_id) == sorted(members.sample_id)
    assert {"training_set/datajuicer", "governor", "raw_samples/d1", "juiced_dataset/datajuicer"} <= set(
        back["lineage"].artifact)
    uid = uid_for(members.sample_id.iloc[0])
    forward = trace_export(cat, uid)
    assert forward["sample"]["sample_id"] == members.sample_id.iloc[0]
    assert manifest["export_id"] in set(forward["exports"].export_id)
    monkeypatch.setenv("JUICER_DATA_DIR", str(root))
    monkeypatch.setenv("JUICER_CONFIG", str(_settings_file(tmp_path, settings)))
    assert juicer_main(["lineage", "--export", manifest["export_id"][:12], "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"export {manifest['export_id']} (recipe datajuicer)" in printed and "training_set/datajuicer" in printed


# --- real trainers on an export -------------------------------------------------------------------

# Installed in the trainer's process through PYTHONPATH (sitecustomize), this only watches: it logs
# the key of every sample open_clip_train's own filter admits into training. The trainer's
# "[n/N (100%)]" line alone proves little: webdataset's with_epoch repeats what it can read to
# fill the epoch, so shards whose samples are skipped still end at 100 %.
AUDIT = '''
import logging
import open_clip_train.data as data
_admit = data.filter_no_caption_or_no_image
def _audited(sample):
    admitted = _admit(sample)
    if admitted:
        logging.info("audit: admitted sample %s", sample["__key__"])
    return admitted
data.filter_no_caption_or_no_image = _audited
'''


def _run_trainer(command: list[str], cwd: Path, timeout: float = 240) -> str:
    audit = cwd / "audit"
    audit.mkdir(exist_ok=True)
    (audit / "sitecustomize.py").write_text(AUDIT)
    env = {**__import__("os").environ, "PYTHONPATH": str(audit), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _every_sample_read(log: str, uids: set[str]) -> bool:
    """The run admitted each exported sample (and nothing else) into training."""
    import re

    admitted = set(re.findall(r"audit: admitted sample (\w+)", log))
    return admitted == uids


def _epoch_end(log: str) -> tuple[int, int] | None:
    import re

    seen = re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+) \(100%\)\]", log)
    return tuple(map(int, seen[-1])) if seen else None


@pytest.fixture(scope="module")
def exported(juiced, tmp_path_factory):
    root, settings, _, _ = juiced
    out = tmp_path_factory.mktemp("oc") / "export"
    result = _export(root, settings, "datajuicer", out, samples_per_shard=32)
    assert result.n_shards == 2
    return out, result


def test_open_clip_train_trains_one_epoch_on_the_export_reading_every_sample(exported, tmp_path):
    """The command `juicer export` prints, run as printed (python -> this interpreter)."""
    import shlex

    from juicer_pipeline.export.webdataset_export import open_clip_train_command

    out, result = exported
    command = shlex.split(open_clip_train_command(str(out), result.manifest))
    assert command[:3] == ["python", "-m", "open_clip_train.main"]
    assert "--train-data" in command and command[command.index("--train-data") + 1].endswith("{00000..00001}.tar")
    log = _run_trainer([sys.executable, *command[1:], "--log-every-n-steps", "1"], tmp_path)
    uids = set(result.members.column("uid").to_pylist())
    assert _every_sample_read(log, uids)
    assert _epoch_end(log) == (result.n_samples, result.n_samples)  # sizes.json gave the epoch its length


def test_shards_without_captions_fail_the_same_assertion(exported, tmp_path):
    """Negative control: the second shard loses its .txt members; open_clip_train still ends its
    epoch at 100 % (it repeats the first shard), and the assertion above catches it. (Batches of
    half the export: webdataset restarts the whole pipeline on each repetition, so a batch larger
    than the readable samples would never fill.)"""
    import tarfile

    out, result = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = broken / "shards" / "00001.tar"
    with tarfile.open(out / "shards" / "00001.tar") as src, tarfile.open(shard, "w") as dst:
        for member in src.getmembers():
            if not member.name.endswith(".txt"):
                dst.addfile(member, src.extractfile(member))
    command = [sys.executable, "-m", "open_clip_train.main", "--train-data",
               str(broken / "shards" / "{00000..00001}.tar"), "--dataset-type", "webdataset",
               "--model", f"local-dir:{broken / 'open_clip_model'}", "--aug-cfg", "scale=(1.0,1.0)",
               "--batch-size", str(result.n_samples // 2), "--epochs", "1", "--workers", "0", "--device", "cpu",
               "--precision", "fp32", "--warmup", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
               "--report-to", "", "--logs", str(tmp_path / "logs"), "--log-every-n-steps", "1"]
    assert result.n_samples % 2 == 0 and result.manifest["shards"][0]["samples"] >= result.n_samples // 2
    log = _run_trainer(command, tmp_path, timeout=120)
    assert _epoch_end(log) == (result.n_samples, result.n_samples)  # the progress line alone is fooled
    assert not _every_sample_read(log, set(result.members.column("uid").to_pylist()))


def test_kept_tokens_in_a_stock_open_clip_train_run(exported, tmp_path):
    """The launcher feeds each batch its stored kept.8x8.npy: the vision transformer sees K + 1
    tokens per image (CLS and the 32 kept patches), batch after batch, and every sample once."""
    import json as _json
    import re

    out, result = exported
    n, k = result.n_samples, result.manifest["grids"][0]["k"]
    batch = max(d for d in range(1, n // 2 + 1) if n % d == 0)
    assert batch > 1
    command = [sys.executable, "-m", "juicer_pipeline.export.open_clip_kept", "--", "--train-data",
               str(out / "shards" / "{00000..00001}.tar"), "--dataset-type", "webdataset",
               "--model", f"local-dir:{out / 'open_clip_model'}", "--aug-cfg", "scale=(1.0,1.0)",
               "--batch-size", str(batch), "--epochs", "1", "--workers", "0", "--device", "cpu",
               "--precision", "fp32", "--warmup", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
               "--report-to", "", "--logs", str(tmp_path / "logs"), "--log-every-n-steps", "1"]
    log = _run_trainer(command, tmp_path)
    report = _json.loads(re.search(r"^juicer-kept-tokens (\{.*\})$", log, re.M).group(1))
    batches = n // batch
    assert report["kept_file"] == "kept.8x8.npy" and report["tokens_per_image"] == [k + 1]
    assert report["batches"] == batches and report["vision_tokens"] == batches * batch * (k + 1)
    assert report["module_tokens_fed"] == report["vision_tokens"]
    assert _every_sample_read(log, set(result.members.column("uid").to_pylist()))
    assert _epoch_end(log) == (n, n)


def test_export_to_object_storage_is_committed_by_its_manifest(juiced, tmp_path, monkeypatch):
    """On S3 (a moto server on loopback) each object is uploaded whole and the manifest, uploaded
    last, commits the export; a re-export removes the objects it no longer has, and a failed one
    leaves no manifest, so no reader takes it for a whole export."""
    import hashlib

    import s3fs

    from ..helpers import MotoS3Server

    root, settings, _, _ = juiced
    storage = _storage(root)
    server = MotoS3Server()
    try:
        options = server.storage_options()
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("exports")
        request, governor = export_request(settings, storage, "datajuicer", samples_per_shard=20)
        first = export_training_set(storage.warehouse, "s3://exports/dj", request, governor, options)
        names = sorted(p.split("exports/dj/", 1)[1] for p in fs.find("exports/dj"))
        assert names == sorted(["manifest.json", "uids.npy", "excluded.parquet", "open_clip_model/open_clip_config.json",
                                "shards/sizes.json"] + [f"shards/{i:05d}{e}" for i in range(first.n_shards)
                                                        for e in (".tar", ".parquet", "_stats.json")])
        local = tmp_path / "00000.tar"
        fs.get_file("exports/dj/shards/00000.tar", str(local))
        assert hashlib.sha256(local.read_bytes()).hexdigest() == first.manifest["shards"][0]["sha256"]
        assert len(list(wds.WebDataset(str(local), shardshuffle=False))) == 20
        fewer = export_training_set(storage.warehouse, "s3://exports/dj", dataclasses_replace(request, 40), governor,
                                    options)
        assert fewer.n_shards == 2 < first.n_shards and not fs.exists("exports/dj/shards/00002.tar")
        assert json.loads(fs.cat_file("exports/dj/manifest.json")) == fewer.manifest
        monkeypatch.setattr(export_samples, "_encode_image", _raises(OSError("connection reset")))
        with pytest.raises(OSError, match="connection reset"):
            export_training_set(storage.warehouse, "s3://exports/dj", request, governor, options)
        assert not fs.exists("exports/dj/manifest.json")
    finally:
        server.stop()


def dataclasses_replace(request, samples_per_shard: int):
    import dataclasses

    return dataclasses.replace(request, samples_per_shard=samples_per_shard)


def _raises(exc: Exception):
    def fail(*args):
        raise exc
    return fail


def test_scale_one_crop_keeps_the_whole_exported_image():
    """What the docs promise: open_clip_train's training transform with --aug-cfg scale='(1.0,1.0)'
    gives a square exported image to the model whole, so its patch grid is the export's."""
    import open_clip

    train = open_clip.image_transform(64, is_train=True, aug_cfg={"scale": (1.0, 1.0)})
    whole = open_clip.image_transform(64, is_train=False, resize_mode="squash")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    reference = whole(image)
    assert all(torch.allclose(train(image), reference, atol=1e-6) for _ in range(100))
    default = open_clip.image_transform(64, is_train=True)  # scale (0.9, 1.0): crops move the grid
    assert not all(torch.allclose(default(image), reference, atol=1e-6) for _ in range(100))


def test_cli_export_prints_the_commands_that_train(juiced, tmp_path, monkeypatch, capsys):
    root, settings, _, _ = juiced
    monkeypatch.setenv("JUICER_DATA_DIR", str(root))
    monkeypatch.setenv("JUICER_CONFIG", str(_settings_file(tmp_path, settings)))
    out = tmp_path / "cli"
    assert juicer_main(["export", "--recipe", "datajuicer", "--out", str(out), "--grid", "4x4",
                        "--samples-per-shard", "40"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"exported {manifest['samples']} samples of recipe datajuicer" in printed
    assert "K per grid {'8x8': 32, '4x4': 8}" in printed
    assert f"python -m open_clip_train.main --train-data '{out}/shards/{{00000..00001}}.tar'" in printed
    assert "python -m juicer_pipeline.export.open_clip_kept -- --train-data" in printed
    assert juicer_main(["export", "--recipe", "datasieve", "--out", str(tmp_path / "sieve")]) == 0
    assert "uids only (DataComp's subset format)" in capsys.readouterr().out


def test_the_exporter_and_the_launcher_import_no_dagster():
    code = ("import sys, juicer_pipeline.export, juicer_pipeline.export.open_clip_kept; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
