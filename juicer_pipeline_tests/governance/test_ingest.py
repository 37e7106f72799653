"""Ingestion on hand-made drops: every format, every quarantine reason, broken manifests."""
import io
import json
import tarfile

import pandas as pd
import pytest
from PIL import Image

from juicer_pipeline.governance.drop_sources import DropError, open_drop
from juicer_pipeline.governance.images import ImageLimits, decode_image
from juicer_pipeline.governance.ingest import IngestStats, ingest_batches

from ..helpers import png_bytes, write_folder_drop


def ingest(path, limits=ImageLimits(), max_caption_chars=4000):
    stats = IngestStats()
    batches = list(ingest_batches(open_drop(path), "d", limits, max_caption_chars, stats, batch_rows=3))
    rows = [r for b in batches for r in b.to_pylist()]
    return {r["local_id"]: r for r in rows}, stats


def jpeg_bytes(size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize(size).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("manifest", ["parquet", "csv", "jsonl"])
def test_folder_drop_with_each_manifest_format(tmp_path, manifest):
    files = {"images/a.png": png_bytes(colour=(1, 2, 3)), "images/b.jpg": jpeg_bytes()}
    rows = [{"image": "images/a.png", "caption": "A red square.", "url": "http://x/a"},
            {"image": "images/b.jpg", "caption": "  a   gradient\n"}]
    rows_by_id, stats = ingest(write_folder_drop(tmp_path / "d", files, rows, manifest))
    assert stats.n_samples == 2 and stats.n_valid == 2
    a, b = rows_by_id["images/a.png"], rows_by_id["images/b.jpg"]
    assert a["sample_id"] == "d/images/a.png" and a["url"] == "http://x/a"
    assert b["caption"] == "a gradient" and b["raw_caption"] == "  a   gradient\n"
    assert a["content_hash"] != b["content_hash"] and len(a["content_hash"]) == 64
    assert (a["width"], a["height"], a["format"]) == (32, 32, "PNG")
    assert a["image"] == files["images/a.png"]


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    drop = tmp_path / "wds"
    drop.mkdir()
    _tar(drop / "shard-00000.tar", {
        "000.jpg": jpeg_bytes(), "000.txt": b"a caption", "000.json": json.dumps({"url": "u0"}).encode(),
        "001.png": png_bytes(colour=(9, 9, 9)), "001.txt": b"second",
        "002.txt": b"no image here",
        "003.webp": b"garbage", "003.txt": b"x",
    })
    _tar(drop / "shard-00001.tar", {"004.png": png_bytes(colour=(5, 5, 5)), "004.json": b"{}"})
    rows, stats = ingest(drop)
    assert stats.n_samples == 5
    assert rows["000"]["status"] == "valid" and rows["000"]["url"] == "u0"
    assert rows["000"]["path"] == "shard-00000.tar:000.jpg"
    assert rows["001"]["caption"] == "second"
    assert rows["002"]["quarantine_reason"] == "missing_file"
    assert rows["003"]["quarantine_reason"] == "not_an_image"
    assert rows["004"]["quarantine_reason"] == "missing_caption"


def test_every_quarantine_reason(tmp_path, monkeypatch):
    ok = png_bytes(colour=(10, 20, 30))
    files = {
        "ok.png": ok, "zero.png": b"", "text.jpg": b"<html>404</html>",
        "trunc.jpg": jpeg_bytes((64, 64))[:300], "tiny.png": png_bytes((4, 4)),
        "huge.png": png_bytes((300, 20)), "dup.png": ok, "c1.png": png_bytes(colour=(1, 1, 1)),
        "c2.png": png_bytes(colour=(2, 2, 2)), "c3.png": png_bytes(colour=(3, 3, 3)),
        "c4.png": png_bytes(colour=(4, 4, 4)), "c5.png": png_bytes(colour=(5, 5, 5)),
        "id.png": png_bytes(colour=(6, 6, 6)),
    }
    (tmp_path / "outside.png").write_bytes(ok)
    rows = [
        {"image": "ok.png", "caption": "fine", "sample_id": "ok"},
        {"image": "zero.png", "caption": "x", "sample_id": "zero"},
        {"image": "text.jpg", "caption": "x", "sample_id": "text"},
        {"image": "trunc.jpg", "caption": "x", "sample_id": "trunc"},
        {"image": "tiny.png", "caption": "x", "sample_id": "tiny"},
        {"image": "huge.png", "caption": "x", "sample_id": "huge"},
        {"image": "missing.png", "caption": "x", "sample_id": "missing"},
        {"image": "../outside.png", "caption": "x", "sample_id": "escape"},
        {"image": str(tmp_path / "outside.png"), "caption": "x", "sample_id": "absolute"},
        {"image": "dup.png", "caption": "same bytes", "sample_id": "dup"},
        {"image": "c1.png", "caption": "   ", "sample_id": "blank"},
        {"image": "c2.png", "caption": "", "sample_id": "empty"},
        {"image": "c3.png", "caption": "bin\x00\x01\x02ary", "sample_id": "binary"},
        {"image": "c4.png", "caption": "y" * 50, "sample_id": "long"},
        {"image": "c5.png", "caption": None, "sample_id": "nocaption"},
        {"image": "id.png", "caption": "x", "sample_id": "ok"},
    ]
    got, stats = ingest(write_folder_drop(tmp_path / "d", files, rows), ImageLimits(min_side=8, max_side=256),
                        max_caption_chars=40)
    reasons = {}
    for r in got.values():
        reasons[r["local_id"]] = r["quarantine_reason"]
    # 'ok' appears twice: the second row is the duplicate id, under an id of its own
    assert got["ok"]["status"] == "valid"
    assert got["ok#dup1"]["quarantine_reason"] == "duplicate_sample_id"
    expected = {
        "zero": "empty_file", "text": "not_an_image", "trunc": "truncated_image", "tiny": "too_small",
        "huge": "too_large", "missing": "missing_file", "escape": "path_escapes_drop",
        "absolute": "path_escapes_drop", "dup": "duplicate_content", "blank": "empty_caption",
        "empty": "empty_caption", "binary": "binary_caption", "long": "caption_too_long",
        "nocaption": "missing_caption",
    }
    for local_id, reason in expected.items():
        assert reasons[local_id] == reason, local_id
        assert got[local_id]["status"] == "quarantined" and got[local_id]["image"] is None
    assert stats.n_samples == 16 and stats.n_valid == 1 and stats.n_quarantined == 15


def test_decompression_bomb_is_quarantined(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    files = {"bomb.png": png_bytes((20, 20)), "bomb2.png": png_bytes((16, 16), colour=(1, 1, 1))}
    rows = [{"image": "bomb.png", "caption": "x"}, {"image": "bomb2.png", "caption": "y"}]
    got, _ = ingest(write_folder_drop(tmp_path / "d", files, rows))
    assert {r["quarantine_reason"] for r in got.values()} == {"decompression_bomb"}


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_odd_modes_become_rgb(mode):
    img = Image.new(mode, (20, 20))
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    decoded = decode_image(buf.getvalue())
    assert decoded.image.mode == "RGB" and decoded.mode == mode and decoded.image.size == (20, 20)


def test_missing_manifest_column_names_file_and_column(tmp_path):
    drop = write_folder_drop(tmp_path / "d", {"a.png": png_bytes()}, [{"image": "a.png", "text": "x"}], "csv")
    with pytest.raises(DropError, match=r"captions\.csv.*missing required column\(s\) 'caption'"):
        ingest(drop)


def test_unreadable_manifest_fails_with_clear_message(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    (drop / "captions.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DropError, match=r"captions\.parquet is unreadable"):
        ingest(drop)


def test_empty_csv_manifest_is_an_error(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    (drop / "captions.csv").write_text("")
    with pytest.raises(DropError, match="captions.csv"):
        ingest(drop)


def test_truncated_shard_is_quarantined_naming_the_shard(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    _tar(drop / "s.tar", {"0.png": png_bytes(), "0.txt": b"x", "1.png": png_bytes(colour=(1, 1, 1))})
    data = (drop / "s.tar").read_bytes()
    (drop / "s.tar").write_bytes(data[:700])
    rows, stats = ingest(drop)
    assert rows["s.tar"]["quarantine_reason"] == "truncated_shard" and stats.n_samples == 2


def test_ambiguous_or_empty_drop_is_an_error(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    with pytest.raises(DropError, match="no manifest"):
        open_drop(drop)
    pd.DataFrame({"image": [], "caption": []}).to_parquet(drop / "captions.parquet")
    (drop / "captions.csv").write_text("image,caption\n")
    with pytest.raises(DropError, match="several manifests"):
        open_drop(drop)


def test_symlinks_out_of_the_drop_are_quarantined(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    drop = write_folder_drop(tmp_path / "d", {"in.png": png_bytes(colour=(1, 1, 1))},
                             [{"image": "linked/secret.png", "caption": "x", "sample_id": "dir"},
                              {"image": "file.png", "caption": "x", "sample_id": "file"},
                              {"image": "in.png", "caption": "x", "sample_id": "in"},
                              {"image": "alias.png", "caption": "x", "sample_id": "alias"},
                              {"image": "gone.png", "caption": "x", "sample_id": "dangling"}])
    (drop / "linked").symlink_to(outside)
    (drop / "file.png").symlink_to(outside / "secret.png")
    (drop / "other.png").write_bytes(png_bytes(colour=(2, 2, 2)))
    (drop / "alias.png").symlink_to(drop / "other.png")  # a link that stays inside the drop is followed
    (drop / "gone.png").symlink_to(drop / "nothing.png")
    got, _ = ingest(drop)
    assert got["dir"]["quarantine_reason"] == "path_escapes_drop"
    assert got["file"]["quarantine_reason"] == "path_escapes_drop"
    assert got["in"]["status"] == "valid"
    assert got["alias"]["status"] == "valid" and got["alias"]["n_bytes"] == len(png_bytes(colour=(2, 2, 2)))
    assert got["dangling"]["quarantine_reason"] == "missing_file"


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_inspection_in_worker_processes_gives_the_same_rows_in_the_same_order(tmp_path, monkeypatch, fmt):
    """A world drop with broken files, repeated content and captions to quarantine: rows from the
    asset's own process and from a pool of 3 worker processes (started after 20 records here,
    chunks of 8) are identical, row for row, folder and tar shards alike."""
    from juicer_pipeline.governance import ingest as ingest_module
    from juicer_pipeline.world import DropConfig, generate_drop

    monkeypatch.setattr(ingest_module, "POOL_AFTER_RECORDS", 20)
    monkeypatch.setattr(ingest_module, "POOL_CHUNK", 8)
    chunks_sent = []

    class CountingPool(ingest_module.ProcessPoolExecutor):
        def submit(self, fn, images, *args):
            chunks_sent.append(len(images))
            return super().submit(fn, images, *args)

    monkeypatch.setattr(ingest_module, "ProcessPoolExecutor", CountingPool)
    drop = generate_drop(tmp_path / "w", DropConfig(n_samples=150, broken_rate=0.15, duplicate_rate=0.1, seed=5,
                                                     format=fmt, shard_size=60)).path
    runs = []
    for workers in (1, 3):
        stats = IngestStats()
        runs.append([r for b in ingest_batches(open_drop(drop), "w", ImageLimits(), 4000, stats, batch_rows=16,
                                               workers=workers) for r in b.to_pylist()])
    assert len(runs[0]) == 150 and runs[0] == runs[1]
    assert sum(chunks_sent) == 130 and max(chunks_sent) == 8  # the pool inspected all but the first 20
    reasons = {r["quarantine_reason"] for r in runs[0]} - {None}
    assert "duplicate_content" in reasons and len(reasons) >= 3  # the decisions that depend on order were taken


def test_worker_chunks_stop_at_a_byte_budget(monkeypatch):
    """Photo-sized records: a chunk sent to a worker holds at most POOL_CHUNK_BYTES (plus one
    record), so the images in flight stay bounded whatever the file sizes."""
    from juicer_pipeline.governance import ingest as ingest_module
    from juicer_pipeline.governance.drop_sources import RawRecord

    monkeypatch.setattr(ingest_module, "POOL_CHUNK_BYTES", 1000)
    records = [RawRecord(local_id=str(i), path=str(i), image_bytes=b"x" * 300, caption="c") for i in range(10)]
    chunks = list(ingest_module._chunks(iter(records)))
    assert [len(c) for c in chunks] == [4, 4, 2] and sum(chunks, []) == records


def test_the_work_sent_to_ingestion_workers_imports_neither_pandas_pyarrow_torch_nor_dagster():
    """A spawned worker imports what its task's function lives in before inspecting anything:
    kept to PIL and NumPy, that takes about a tenth of a second instead of the three quarters
    the ingestion module's pandas and PyArrow take, on every worker of every run."""
    import subprocess
    import sys

    from juicer_pipeline.governance import ingest as ingest_module

    assert ingest_module.inspect_chunk.__module__ == "juicer_pipeline.governance.inspection"
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, juicer_pipeline.governance.inspection; "
         "print(' '.join(m for m in ('pandas', 'pyarrow', 'torch', 'dagster', 'duckdb') if m in sys.modules))"],
        check=True, capture_output=True, text=True).stdout.split()
    assert heavy == []


def test_raw_samples_are_written_with_image_bytes_uncompressed_and_read_back_whole(tmp_path):
    import pyarrow.parquet as pq

    from juicer_pipeline.governance.ingest import RAW_SAMPLES_SCHEMA, RAW_SAMPLES_WRITER_OPTIONS

    files = {f"images/{i}.jpg": jpeg_bytes((40 + i, 40)) for i in range(5)}
    rows = [{"image": name, "caption": f"caption {i}"} for i, name in enumerate(files)]
    batches = list(ingest_batches(open_drop(write_folder_drop(tmp_path / "d", files, rows, "parquet")), "d",
                                  ImageLimits(), 4000, IngestStats(), batch_rows=2))
    with pq.ParquetWriter(tmp_path / "raw.parquet", RAW_SAMPLES_SCHEMA, **RAW_SAMPLES_WRITER_OPTIONS) as writer:
        for batch in batches:
            writer.write_batch(batch)
    meta = pq.ParquetFile(tmp_path / "raw.parquet").metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs["image"] == codecs["content_hash"] == "UNCOMPRESSED" and codecs["caption"] == "SNAPPY"
    back = pq.read_table(tmp_path / "raw.parquet")
    assert back.to_pylist() == [r for b in batches for r in b.to_pylist()]
    assert {r["path"]: r["image"] for r in back.to_pylist()} == files
