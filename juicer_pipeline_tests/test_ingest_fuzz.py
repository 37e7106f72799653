"""Property-based fuzzing of ingestion: manifests, captions and tar layouts.

Whatever the input, a drop is either ingested with one row per input record (valid, or quarantined
with a named reason; ids unique) or refused as a whole with a `DropError` that names the problem.
"""
import csv
import io
import tarfile
import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from juicer_pipeline.governance.drop_sources import DropError, open_drop
from juicer_pipeline.governance.images import ImageLimits
from juicer_pipeline.governance.ingest import IngestStats, ingest_batches

# derandomized: CI sees the same 40 examples every run (set derandomize=False locally to explore more)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _image(kind: str, side: int, mode: str) -> bytes | None:
    if kind == "missing":
        return None
    if kind == "empty":
        return b""
    if kind == "junk":
        return b"<html>not an image</html>"
    buf = io.BytesIO()
    img = Image.new(mode, (side, side), 128 if mode in ("L", "P") else (10, 200, 30)[: len(mode)] or 0)
    img.save(buf, "PNG" if kind in ("png", "truncated") else "GIF")
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


IMAGES = st.builds(_image, st.sampled_from(["png", "gif", "truncated", "junk", "empty", "missing"]),
                   st.sampled_from([4, 24, 40]), st.sampled_from(["RGB", "L", "RGBA", "P"]))
CAPTIONS = st.one_of(st.none(), st.text(max_size=60), st.sampled_from(["", "   ", "a red star.", "<p>x</p>"]))
IDS = st.one_of(st.none(), st.sampled_from(["a", "b", "a#dup1", "../up", "x/y"]), st.text(min_size=1, max_size=8))


def _rows_ok(rows: list[dict]) -> None:
    assert len({r["sample_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["status"] in ("valid", "quarantined")
        if r["status"] == "quarantined":
            assert r["quarantine_reason"], r
        else:
            assert r["image"] and r["caption"]


def _ingest(path: Path) -> list[dict]:
    runs = []
    for workers in (1, 3):
        stats = IngestStats()
        rows = [r for b in ingest_batches(open_drop(path), "d", ImageLimits(min_side=8), 4000, stats, batch_rows=4,
                                          workers=workers) for r in b.to_pylist()]
        assert stats.n_samples == len(rows)
        runs.append(rows)
    assert runs[0] == runs[1]  # the workers setting changes no row and no order
    return runs[0]


@FUZZ
@given(records=st.lists(st.tuples(IMAGES, CAPTIONS, IDS), min_size=1, max_size=10),
       manifest=st.sampled_from(["parquet", "csv", "jsonl"]))
def test_folder_drops_keep_one_row_per_manifest_row(records, manifest):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "drop"
        root.mkdir()
        rows = []
        for i, (data, caption, sid) in enumerate(records):
            name = f"{i}.img"
            if data is not None:
                (root / name).write_bytes(data)
            rows.append({"image": name, "caption": caption, "sample_id": sid})
        df = pd.DataFrame(rows)
        if manifest == "parquet":
            df.to_parquet(root / "captions.parquet", index=False)
        elif manifest == "csv":  # every field quoted: a bare carriage return in a field is a line break in CSV
            df.to_csv(root / "captions.csv", index=False, quoting=csv.QUOTE_ALL)
        else:
            df.to_json(root / "captions.jsonl", orient="records", lines=True)
        try:
            got = _ingest(root)
        except DropError as exc:  # refused as a whole, with the problem named
            assert "manifest" in str(exc)
            return
        assert len(got) == len(records)  # rows in = rows out
        _rows_ok(got)


MEMBER_NAMES = st.sampled_from(["k1", "k2", "k3", "../k4", "/abs", "dir/k5", "k1.extra"])
EXTENSIONS = st.sampled_from(["png", "gif", "txt", "json", "jpg", "bin"])


def _member(key: str, ext: str, image: bytes | None, caption: str | None) -> tuple[str, bytes]:
    if ext == "txt":
        return f"{key}.txt", (caption or "").encode("utf-8", "surrogatepass")
    if ext == "json":
        return f"{key}.json", (b'{"caption": "x"}' if caption else b"{broken")
    return f"{key}.{ext}", image or b""


@FUZZ
@given(members=st.lists(st.builds(_member, MEMBER_NAMES, EXTENSIONS, IMAGES, CAPTIONS), min_size=1, max_size=12),
       cut=st.one_of(st.none(), st.floats(0.05, 0.95)))
def test_tar_drops_never_crash_and_name_every_rejection(members, cut):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "drop"
        root.mkdir()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        (root / "shard-0.tar").write_bytes(data if cut is None else data[: int(len(data) * cut)])
        try:
            got = _ingest(root)
        except DropError as exc:
            assert "shard" in str(exc)
            return
        _rows_ok(got)
        if cut is None:  # an intact shard: every key that has an image member keeps a row
            keys = {_wds_key(n) for n, _ in members if n.rsplit(".", 1)[1] in ("png", "gif", "jpg", "bin")}
            assert len(got) >= len(keys)


def _wds_key(name: str) -> str:
    """WebDataset's key of a member: its path up to the first dot of the file name
    ("dir/k1.extra.png" -> "dir/k1")."""
    folder, _, base = name.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]
