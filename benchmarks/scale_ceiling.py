"""Scale ceiling: world drops of growing size streamed through `raw_samples` and `patch_saliency`,
each stage in its own process, so that each peak RSS is that stage's own.

    .venv/bin/python benchmarks/scale_ceiling.py --sizes 20000 200000

For every size: generate a WebDataset drop (img2dataset layout, 1000 samples per shard) in a
temporary data dir, resolve the governor once, then run each stage through Dagster for the drop's
partition. Printed per size and stage: samples, seconds, samples/s, peak RSS of the process and
the RSS it had with Dagster and the models loaded before the run. Bounded memory means the peak
barely moves between sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import peak_rss_mb

STAGES = ("raw_samples", "patch_saliency")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}




def _run(data_dir: Path, what: str, drop: str | None) -> dict:
    """In a child process: the governor job, or one stage of the drop job for `drop`."""
    os.environ["JUICER_DATA_DIR"] = str(data_dir)
    from dagster import AssetKey, DagsterInstance

    from juicer_pipeline.definitions import DROP_JOB_NAME, GOVERNOR_JOB_NAME, build_definitions

    defs = build_definitions(data_dir=data_dir)
    with DagsterInstance.ephemeral() as inst:
        if what == "governor":
            ok = defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
                instance=inst, asset_selection=[AssetKey("governor")], run_config=QUIET).success
            return {"ok": ok}
        inst.add_dynamic_partitions("drops", [drop])
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        result = defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(
            partition_key=drop, instance=inst, asset_selection=[AssetKey(what)], run_config=QUIET)
        seconds = time.perf_counter() - t0
    meta = result.asset_materializations_for_node(what)[0].metadata
    n = meta["samples"].value if "samples" in meta else meta["images"].value
    return {"ok": result.success, "samples": n, "seconds": seconds, "rss_before_mb": rss_before,
            "peak_rss_mb": peak_rss_mb()}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        data, what, *drop = a.child
        print(json.dumps(_run(Path(data), what, drop[0] if drop else None)))
        return

    from juicer_pipeline.world import DropConfig, generate_drop

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        (data / "drops").mkdir(parents=True)
        assert _child(str(data), "governor")["ok"]
        for i, n in enumerate(a.sizes):
            drop = f"scale-{n}"
            report = generate_drop(data / "drops" / drop, DropConfig(n_samples=n, seed=21 + i, drop_index=i,
                                                                      format="wds"))
            print(f"generated {drop}: {n} samples in {report.seconds:.0f} s", flush=True)
            for stage in STAGES:
                r = _child(str(data), stage, drop)
                assert r["ok"], r
                rows.append((n, stage, r))
                print(f"  {stage}: {r['samples']} in {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                      flush=True)
    print("\n| drop size | stage | samples | seconds | samples/s | peak RSS MB | RSS before the run MB |")
    print("|---|---|---|---|---|---|---|")
    for n, stage, r in rows:
        print(f"| {n} | {stage} | {r['samples']} | {r['seconds']:.1f} | {r['samples'] / r['seconds']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} |")
    for stage in STAGES:
        peaks = [r["peak_rss_mb"] for _, s, r in rows if s == stage]
        print(f"{stage}: peak RSS from {a.sizes[0]} to {a.sizes[-1]} samples: {peaks[-1] - peaks[0]:+.0f} MB")


if __name__ == "__main__":
    main()
