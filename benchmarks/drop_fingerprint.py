"""What versioning a drop costs the drop sensor: `fingerprint_drop` against a bare walk + stat.

    .venv/bin/python benchmarks/drop_fingerprint.py [--samples 200000] [--shards 20] [--repeats 3]

Writes, in a temporary folder, a folder drop of `--samples` small image files in 100 sub-folders
with a CSV manifest of as many rows, and a WebDataset drop of `--shards` shards of 256 MB sparse
files (what a 200k-sample img2dataset drop weighs). Then times, best of `--repeats` (the file
system's metadata cache warm, as it is for a sensor that looks every 30 s): a bare `os.walk` with
one `stat` per file (the least any change detector based on file metadata can do), and the
fingerprint of each drop. Prints the seconds and the ratio fingerprint / bare walk.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from juicer_pipeline.governance.drop_fingerprint import fingerprint_drop  # noqa: E402

SHARD_BYTES = 256 << 20


def write_folder_drop(root: Path, samples: int) -> None:
    lines = ["image,caption"]
    for i in range(samples):
        rel = f"images/{i % 100:02d}/{i:07d}.jpg"
        if i < 100:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\xff\xd8 not decoded here %d" % i)
        lines.append(f"{rel},a red square number {i}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")


def write_shard_drop(root: Path, shards: int) -> None:
    root.mkdir(parents=True)
    for s in range(shards):
        with open(root / f"{s:05d}.tar", "wb") as fh:  # sparse: the size is real, the blocks are not written
            fh.write(os.urandom(1 << 16))
            fh.truncate(SHARD_BYTES)


def bare_walk(root: Path) -> int:
    n = 0
    for folder, _, files in os.walk(root):
        for name in files:
            os.stat(os.path.join(folder, name))
            n += 1
    return n


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="juicer-fingerprint-") as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        t0 = time.perf_counter()
        write_folder_drop(folder, a.samples)
        write_shard_drop(shards, a.shards)
        print(f"wrote {a.samples} files + manifest and {a.shards} shards of {SHARD_BYTES >> 20} MB "
              f"in {time.perf_counter() - t0:.1f}s")
        bare_walk(folder)  # warm the metadata cache once
        for name, root in (("folder drop", folder), ("shard drop", shards)):
            bare = best_of(a.repeats, lambda: bare_walk(root))
            fp_s = best_of(a.repeats, lambda: fingerprint_drop(root))
            fp = fingerprint_drop(root)
            print(f"{name}: {fp.n_files} files, {fp.n_bytes / 1e9:.2f} GB | bare walk+stat {bare:.3f}s | "
                  f"fingerprint {fp_s:.3f}s | ratio {fp_s / max(bare, 1e-9):.2f}")


if __name__ == "__main__":
    main()
