"""Export throughput and peak memory of `juiced_dataset`'s exporter vs a bare read + JPEG encode.

    .venv/bin/python benchmarks/export_throughput.py --samples 50000 [--data-dir DIR] [--repeats 2]

Prepares a data root (or reuses `--data-dir` when it already holds one) with one juiced world drop
(the packaged world governor) and the `datajuicer` training set. Then, in separate processes so
that each peak RSS is its own, and interleaved over rounds so that a slow spell of this shared
machine hits both alike:
  (1) bare: the training set's image bytes read from raw_samples a row group at a time, decoded,
      put through the governor's geometry (what the export writes) and JPEG-encoded at quality 95;
  (2) export: `export_training_set` into a fresh folder (tar shards with image, caption, JSON,
      saliency and kept indices, per-shard Parquet and stats, sha256s, uids.npy, manifest).
Prints samples/s of each (fastest round), the export/bare ratio and the peak RSS of each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import peak_rss_mb

RECIPE = "datajuicer"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def prepare(data: Path, samples: int) -> None:
    """Generate and juice one world drop, and assemble the recipe's training set (skipped when done)."""
    if (data / "warehouse" / "training_set" / f"{RECIPE}.parquet").exists():
        print(f"reusing {data}")
        return
    os.environ["JUICER_DATA_DIR"] = str(data)
    from dagster import AssetKey, DagsterInstance

    from juicer_pipeline.definitions import DROP_JOB_NAME, GOVERNOR_JOB_NAME, RECIPES_JOB_NAME, build_definitions
    from juicer_pipeline.world import DropConfig, generate_drop, generate_eval_set

    t0 = time.perf_counter()
    generate_drop(data / "drops" / "big", DropConfig(n_samples=samples, seed=21))
    for kind in ("retrieval", "classification"):
        generate_eval_set(data / "world" / "evalsets" / kind, kind, 200)
    (data / "juicer.toml").write_text("[ingest]\nworkers = 2\n")
    defs = build_definitions(data_dir=data)
    with DagsterInstance.ephemeral() as inst:
        inst.add_dynamic_partitions("drops", ["big"])
        assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=inst, run_config=QUIET).success
        assert defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(partition_key="big", instance=inst,
                                                                      run_config=QUIET).success
        assert defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(
            partition_key=RECIPE, instance=inst, run_config=QUIET, asset_selection=[AssetKey("training_set")]).success
    print(f"prepared {samples} samples in {time.perf_counter() - t0:.0f} s")


def _inputs(data: Path):
    os.environ["JUICER_DATA_DIR"] = str(data)
    from juicer_pipeline.assets.export import export_request
    from juicer_pipeline.assets.resources import StorageResource
    from juicer_pipeline.settings import load_settings

    storage = StorageResource(data_dir=str(data))
    request, governor = export_request(load_settings(data_dir=data), storage, RECIPE)
    return storage.warehouse, request, governor


def bare(data: Path) -> dict:
    """Read, decode, apply the geometry and JPEG-encode every member's image: nothing else."""
    import io

    import pyarrow.compute as pc

    from juicer_pipeline.governance.images import load_rgb
    from juicer_pipeline.governance.parquet_batches import iter_parquet_batches

    wh, _, governor = _inputs(data)
    wanted = wh.read_table("training_set", RECIPE, columns=["sample_id"]).column(0)
    t0, n = time.perf_counter(), 0
    pf = wh.parquet_file("raw_samples", "big")
    for batch in iter_parquet_batches(pf, 256, ["sample_id", "image"]):
        chosen = batch.filter(pc.is_in(batch.column(0), value_set=wanted))
        for data_bytes in chosen.column(1).to_pylist():
            buf = io.BytesIO()
            governor.geometry.apply(load_rgb(data_bytes)).save(buf, "JPEG", quality=95)
            n += 1
    seconds = time.perf_counter() - t0
    return {"samples": n, "seconds": seconds, "per_s": n / seconds, "peak_rss_mb": peak_rss_mb()}


def export(data: Path, out: Path) -> dict:
    from juicer_pipeline.export import export_training_set

    wh, request, governor = _inputs(data)
    t0 = time.perf_counter()
    result = export_training_set(wh, str(out), request, governor)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"samples": result.n_samples, "shards": result.n_shards, "bytes": result.bytes, "seconds": seconds,
            "per_s": result.n_samples / seconds, "peak_rss_mb": peak_rss_mb()}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=50000)
    ap.add_argument("--data-dir", type=Path, default=None, help="keep (or reuse) the prepared data root here")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; each figure is the fastest of them")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, data, *rest = a.child
        print(json.dumps(bare(Path(data)) if mode == "bare" else export(Path(data), Path(rest[0]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data_dir.resolve() if a.data_dir else Path(tmp) / "data"
        prepare(data, a.samples)
        rounds = [{"bare": _child("bare", str(data)), "export": _child("export", str(data), str(Path(tmp) / f"out{i}"))}
                  for i in range(a.repeats)]
    fastest = {k: min((r[k] for r in rounds), key=lambda m: m["seconds"]) for k in ("bare", "export")}
    b, e = fastest["bare"], fastest["export"]
    print(json.dumps({"rounds": rounds}, indent=1))
    print(f"{e['samples']} samples ({e['shards']} shards, {e['bytes'] / 1e6:.1f} MB), fastest of {a.repeats} rounds:")
    print(f"  bare read + decode + geometry + JPEG encode: {b['per_s']:.0f} samples/s, peak RSS {b['peak_rss_mb']:.0f} MB")
    print(f"  export (shards, npy, json, parquet, sha256, uids, manifest): {e['per_s']:.0f} samples/s, "
          f"peak RSS {max(r['export']['peak_rss_mb'] for r in rounds):.0f} MB")
    print(f"  export / bare: {e['per_s'] / b['per_s']:.2f}")


if __name__ == "__main__":
    main()
