"""Hostile drops: each input row keeps a row of its own, quarantined with a named reason."""
import io
import tarfile

from PIL import Image

from juicer_pipeline.governance.drop_sources import open_drop
from juicer_pipeline.governance.images import ImageLimits, decode_image
from juicer_pipeline.governance.ingest import IngestStats, ingest_batches
from juicer_pipeline.storage import Catalog, Warehouse

from ..helpers import png_bytes, run_drop, write_folder_drop


def ingest_rows(path, limits=ImageLimits()) -> tuple[list[dict], IngestStats]:
    stats = IngestStats()
    batches = ingest_batches(open_drop(path), "d", limits, 4000, stats, batch_rows=3)
    return [r for b in batches for r in b.to_pylist()], stats


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["local_id"]: r for r in rows}


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A tar with members in exactly the order given (a list: names may repeat or interleave)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_duplicate_sample_ids_get_distinct_row_ids(tmp_path):
    files = {f"{i}.png": png_bytes(colour=(i, i, i)) for i in range(5)}
    rows = [{"image": f"{i}.png", "caption": "x", "sample_id": sid}
            for i, sid in enumerate(["a", "a", "b", "a", "a#dup1"])]
    got, stats = ingest_rows(write_folder_drop(tmp_path / "d", files, rows))
    assert [r["local_id"] for r in got] == ["a", "a#dup1", "b", "a#dup2", "a#dup1#dup1"]
    assert len({r["sample_id"] for r in got}) == len(rows) == stats.n_samples
    assert [r["quarantine_reason"] for r in got] == [None, "duplicate_sample_id", None,
                                                     "duplicate_sample_id", "duplicate_sample_id"]
    assert "'a' appears earlier" in got[1]["quarantine_detail"]


def test_duplicate_sample_ids_do_not_fail_the_drop(data_dir, instance):
    files = {f"{i}.png": png_bytes(colour=(i, i, i)) for i in range(3)}
    rows = [{"image": f"{i}.png", "caption": "x", "sample_id": "same"} for i in range(3)]
    write_folder_drop(data_dir / "drops" / "dups", files, rows)
    assert run_drop(data_dir, instance, "dups").success
    samples = Catalog(Warehouse(data_dir).catalog_path).query("SELECT * FROM samples ORDER BY sample_id")
    assert list(samples.sample_id) == ["dups/same", "dups/same#dup1", "dups/same#dup2"]
    assert list(samples.status) == ["valid", "quarantined", "quarantined"]


def _cap_between(small: bytes, big: bytes) -> int:
    assert len(small) < len(big)
    return len(small)


def test_files_over_max_file_bytes_are_quarantined_unread(tmp_path, monkeypatch):
    import juicer_pipeline.governance.folder_drops as folder_drops

    small, big = png_bytes(colour=(1, 1, 1)), png_bytes((64, 64), colour=(2, 2, 2)) + b"\0" * 4096
    opened: list[str] = []
    monkeypatch.setattr(folder_drops, "open", lambda p, *a, **k: opened.append(str(p)) or io.open(p, *a, **k),
                        raising=False)
    drop = write_folder_drop(tmp_path / "d", {"small.png": small, "big.png": big},
                             [{"image": "small.png", "caption": "x"}, {"image": "big.png", "caption": "x"}])
    got, _ = ingest_rows(drop, ImageLimits(max_file_bytes=_cap_between(small, big)))
    rows = by_id(got)
    assert rows["small.png"]["status"] == "valid"
    assert rows["big.png"]["quarantine_reason"] == "too_large"
    assert "max_file_bytes" in rows["big.png"]["quarantine_detail"]
    assert not any(p.endswith("big.png") for p in opened)


def test_a_file_that_grows_after_stat_is_read_whole_up_to_the_cap(tmp_path, monkeypatch):
    """The read is sized by stat; a file longer than stat said (written to meanwhile) is still read
    to its end, and one that grew past the cap is quarantined."""
    import os

    import juicer_pipeline.governance.folder_drops as folder_drops

    image = png_bytes((32, 32), colour=(3, 3, 3))
    real_lstat = os.lstat

    def lstat_before_growth(path, *args, **kwargs):  # what lstat said before the writer appended
        st = real_lstat(path, *args, **kwargs)
        return os.stat_result((*st[:6], 10, *st[7:])) if str(path).endswith("a.png") else st

    monkeypatch.setattr(folder_drops.os, "lstat", lstat_before_growth)
    drop = write_folder_drop(tmp_path / "d", {"a.png": image}, [{"image": "a.png", "caption": "x"}])
    got, _ = ingest_rows(drop)
    assert got[0]["status"] == "valid" and got[0]["image"] == image
    got, _ = ingest_rows(drop, ImageLimits(max_file_bytes=len(image) - 1))
    assert got[0]["quarantine_reason"] == "too_large"


def test_tar_members_over_max_file_bytes_are_quarantined_unread(tmp_path, monkeypatch):
    small, big = png_bytes(colour=(1, 1, 1)), png_bytes((64, 64), colour=(2, 2, 2)) + b"\0" * 4096
    (tmp_path / "d").mkdir()
    write_tar(tmp_path / "d" / "s.tar", [("0.png", small), ("0.txt", b"x"), ("1.png", big), ("1.txt", b"y"),
                                          ("2.png", png_bytes(colour=(3, 3, 3))), ("2.txt", b"z" * len(big))])
    extracted: list[str] = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: extracted.append(getattr(m, "name", m)) or real(self, m))
    got, _ = ingest_rows(tmp_path / "d", ImageLimits(max_file_bytes=_cap_between(small, big)))
    rows = by_id(got)
    assert rows["0"]["status"] == "valid"
    assert rows["1"]["quarantine_reason"] == rows["2"]["quarantine_reason"] == "too_large"
    assert "1.png" not in extracted and "2.txt" not in extracted


def test_max_file_bytes_is_an_ingest_setting(data_dir, instance):
    from juicer_pipeline.settings import IngestSettings, JuicerSettings

    assert IngestSettings().max_file_bytes == 50_000_000
    big = png_bytes((64, 64)) + b"\0" * 4096
    write_folder_drop(data_dir / "drops" / "capped", {"big.png": big}, [{"image": "big.png", "caption": "x"}])
    settings = JuicerSettings(ingest=IngestSettings(max_file_bytes=1000))
    assert run_drop(data_dir, instance, "capped", settings=settings).success
    samples = Catalog(Warehouse(data_dir).catalog_path).query("SELECT * FROM samples")
    assert list(samples.quarantine_reason) == ["too_large"]


def _good_shard(path, keys=("0", "1")) -> None:
    # distinct colours across shards too, so no sample is a duplicate_content of another
    write_tar(path, [m for k in keys
                     for m in ((f"{k}.png", png_bytes(colour=(ord(k[0]), ord(k[-1]), len(k)))),
                               (f"{k}.txt", b"a caption"))])


def test_truncated_shard_keeps_readable_members_and_records_the_offset(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    _good_shard(drop / "a.tar", ("a0", "a1"))
    _good_shard(drop / "b.tar", ("b0", "b1", "b2"))
    data = (drop / "b.tar").read_bytes()
    with tarfile.open(drop / "b.tar") as tar:
        cut_member = tar.getmember("b1.txt")
    (drop / "b.tar").write_bytes(data[:cut_member.offset_data + 3])  # b1's caption is cut short
    got, stats = ingest_rows(drop)
    rows = by_id(got)
    assert [rows[k]["status"] for k in ("a0", "a1", "b0")] == ["valid"] * 3
    assert rows["b1"]["quarantine_reason"] == "missing_caption"  # its image was read, its caption cut
    shard = rows["b.tar"]
    assert shard["quarantine_reason"] == "truncated_shard" and shard["path"] == "b.tar"
    assert f"byte {cut_member.offset}" in shard["quarantine_detail"]
    assert "b2" not in rows  # wholly after the cut: the shard row stands for it
    assert stats.n_samples == len(got) == 5


def test_corrupt_header_mid_shard_is_a_truncated_shard(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    _good_shard(drop / "s.tar", ("0", "1"))
    data = bytearray((drop / "s.tar").read_bytes())
    with tarfile.open(drop / "s.tar") as tar:
        bad = tar.getmember("1.png").offset
    data[bad:bad + 512] = b"\xff" * 512  # a garbage header: tarfile alone would read this as the end
    (drop / "s.tar").write_bytes(bytes(data))
    rows = by_id(ingest_rows(drop)[0])
    assert rows["0"]["status"] == "valid" and "1" not in rows
    assert rows["s.tar"]["quarantine_reason"] == "truncated_shard"
    assert f"byte {bad}" in rows["s.tar"]["quarantine_detail"]


def test_shard_that_is_not_a_tar_is_one_quarantine_row(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    _good_shard(drop / "a.tar")
    (drop / "b.tar").write_bytes(b"not a tar at all" * 100)
    rows = by_id(ingest_rows(drop)[0])
    assert rows["0"]["status"] == rows["1"]["status"] == "valid"
    assert rows["b.tar"]["quarantine_reason"] == "truncated_shard"
    assert "byte 0" in rows["b.tar"]["quarantine_detail"]


def test_unsafe_member_names_are_quarantined(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    write_tar(drop / "s.tar", [
        ("../escape.png", png_bytes(colour=(1, 1, 1))), ("../escape.txt", b"x"),
        ("/abs/key.png", png_bytes(colour=(2, 2, 2))), ("/abs/key.txt", b"x"),
        ("dir/../../up.png", png_bytes(colour=(3, 3, 3))), ("dir/../../up.txt", b"x"),
        ("ok.png", png_bytes(colour=(4, 4, 4))), ("ok.txt", b"x"),
    ])
    got, stats = ingest_rows(drop)
    assert stats.n_valid == 1 and by_id(got)["ok"]["status"] == "valid"
    unsafe = [r for r in got if r["local_id"] != "ok"]
    assert len(unsafe) == 3
    assert {r["quarantine_reason"] for r in unsafe} == {"path_escapes_drop"}
    assert all(r["image"] is None for r in unsafe)


def test_members_of_a_key_are_grouped_wherever_they_sit(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    write_tar(drop / "s.tar", [
        ("0.png", png_bytes(colour=(1, 1, 1))), ("1.png", png_bytes(colour=(2, 2, 2))),
        ("1.txt", b"one"), ("0.txt", b"zero"), ("0.json", b'{"url": "u0"}'),
    ])
    got, stats = ingest_rows(drop)
    assert [r["local_id"] for r in got] == ["0", "1"] and stats.n_valid == 2
    assert by_id(got)["0"]["caption"] == "zero" and by_id(got)["0"]["url"] == "u0"


def test_broken_metadata_json_is_quarantined(tmp_path):
    drop = tmp_path / "d"
    drop.mkdir()
    write_tar(drop / "s.tar", [
        ("0.png", png_bytes(colour=(1, 1, 1))), ("0.txt", b"x"), ("0.json", b'{"sample_id": "ab'),
        ("1.png", png_bytes(colour=(2, 2, 2))), ("1.txt", b"x"), ("1.json", b"[1, 2]"),
        ("2.png", png_bytes(colour=(3, 3, 3))), ("2.txt", b"x"), ("2.json", b'{"sample_id": "two"}'),
    ])
    rows = by_id(ingest_rows(drop)[0])
    assert rows["0"]["quarantine_reason"] == rows["1"]["quarantine_reason"] == "bad_metadata"
    assert "not valid JSON" in rows["0"]["quarantine_detail"]
    assert rows["two"]["status"] == "valid"


def test_truncated_shard_drop_is_ingested_through_dagster(data_dir, instance):
    drop = data_dir / "drops" / "cut"
    drop.mkdir()
    _good_shard(drop / "a.tar")
    _good_shard(drop / "b.tar", ("2", "3"))
    (drop / "b.tar").write_bytes((drop / "b.tar").read_bytes()[:700])  # inside 2.png's block padding
    assert run_drop(data_dir, instance, "cut").success
    samples = Catalog(Warehouse(data_dir).catalog_path).query("SELECT * FROM samples ORDER BY sample_id")
    assert list(samples.sample_id) == ["cut/0", "cut/1", "cut/2", "cut/b.tar"]
    assert list(samples.quarantine_reason.fillna("")) == ["", "", "missing_caption", "truncated_shard"]


def _frames_bytes(fmt: str, colours=((200, 0, 0), (0, 0, 200)), size=(24, 20)) -> bytes:
    """An image file in `fmt`; multi-frame (animated GIF, multi-page TIFF) when more colours."""
    frames = [Image.new("RGB", size, c) for c in colours]
    buf = io.BytesIO()
    if len(frames) > 1:
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    else:
        frames[0].save(buf, fmt)
    return buf.getvalue()


def test_gif_bmp_tiff_decode_to_their_first_frame_in_folders_and_shards(tmp_path):
    files = {"anim.gif": _frames_bytes("GIF"), "pic.bmp": _frames_bytes("BMP", ((0, 200, 0),)),
             "pages.tiff": _frames_bytes("TIFF", ((0, 0, 200), (200, 0, 0)))}
    folder = write_folder_drop(tmp_path / "f", files, [{"image": n, "caption": "x"} for n in files])
    (tmp_path / "w").mkdir()
    write_tar(tmp_path / "w" / "s.tar", [("anim.gif", files["anim.gif"]), ("anim.txt", b"x"),
                                          ("pic.bmp", files["pic.bmp"]), ("pic.txt", b"x"),
                                          ("pages.tif", files["pages.tiff"]), ("pages.txt", b"x")])
    folder_rows, shard_rows = by_id(ingest_rows(folder)[0]), by_id(ingest_rows(tmp_path / "w")[0])
    for name, fmt, colour in (("anim.gif", "GIF", (200, 0, 0)), ("pic.bmp", "BMP", (0, 200, 0)),
                              ("pages.tiff", "TIFF", (0, 0, 200))):
        for row in (folder_rows[name], shard_rows[name.split(".")[0]]):
            assert row["status"] == "valid", row["quarantine_detail"]
            assert (row["format"], row["width"], row["height"]) == (fmt, 24, 20)
            first = decode_image(row["image"]).image
            assert first.mode == "RGB" and first.getpixel((5, 5)) == colour


def test_other_formats_are_unsupported_format(tmp_path):
    files = {"a.ppm": _frames_bytes("PPM", ((1, 2, 3),)), "b.ico": _frames_bytes("ICO", ((4, 5, 6),), (32, 32)),
             "ok.png": png_bytes(colour=(7, 8, 9))}
    folder = write_folder_drop(tmp_path / "f", files, [{"image": n, "caption": "x"} for n in files])
    (tmp_path / "w").mkdir()
    write_tar(tmp_path / "w" / "s.tar", [("0.heic", b"\0\0\0\x18ftypheic"), ("0.txt", b"x"),
                                          ("1.ppm", files["a.ppm"]), ("1.txt", b"x")])
    rows = by_id(ingest_rows(folder)[0]) | by_id(ingest_rows(tmp_path / "w")[0])
    for local_id in ("a.ppm", "b.ico", "0", "1"):
        assert rows[local_id]["quarantine_reason"] == "unsupported_format", local_id
    assert rows["ok.png"]["status"] == "valid"


def _jsonl(root, lines: list[str]):
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes())
    (root / "sub").mkdir()
    (root / "captions.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


def test_paths_no_file_system_can_name_are_quarantined_not_fatal(tmp_path):
    """A NUL byte (os calls raise ValueError on it), a lone surrogate (no byte sequence encodes it),
    a 10 kB name (ENAMETOOLONG) and a directory: each its own named row; the good row survives."""
    import json

    refs = {"nul": "ok\x00.png", "surrogate": "ok\ud800.png", "long": "x" * 10_000, "folder": "sub", "good": "ok.png"}
    root = _jsonl(tmp_path / "d", [json.dumps({"image": ref, "caption": "a red star", "sample_id": sid})
                                   for sid, ref in refs.items()])
    got, stats = ingest_rows(root)
    reasons = {r["local_id"]: r["quarantine_reason"] for r in got}
    assert reasons == {"nul": "invalid_path", "surrogate": "invalid_path", "long": "invalid_path",
                       "folder": "missing_file", "good": None}
    assert "NUL" in by_id(got)["nul"]["quarantine_detail"] and stats.n_samples == len(refs)


def test_undecodable_ids_and_captions_are_stored_escaped(tmp_path):
    """A tar member name in Latin-1, and KEY.json strings with lone surrogates: the sample keeps its
    row, its id and label escaped so the catalog can store them; such a caption is binary."""
    write_tar_members = [("caf\udce9.png", png_bytes()), ("caf\udce9.txt", b"a red star"),
                         ("k.png", png_bytes(colour=(1, 2, 3))), ("k.txt", b"a blue \xed\xa0\x80 star"),
                         ("k.json", b'{"sample_id": "id\\ud800", "label": "\\udcff"}')]
    (tmp_path / "d").mkdir()
    with tarfile.open(tmp_path / "d" / "0.tar", "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in write_tar_members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = by_id(ingest_rows(tmp_path / "d")[0])
    assert got["caf\\xe9"]["status"] == "valid" and got["caf\\xe9"]["sample_id"] == "d/caf\\xe9"
    assert got["id\\ud800"]["label"] == "\\xff" and got["id\\ud800"]["quarantine_reason"] == "binary_caption"


def test_unparseable_manifest_lines_are_rows_of_their_own(tmp_path):
    root = _jsonl(tmp_path / "d", ['{"image": "ok.png", "caption": "a red star"}', "{broken", "[1, 2]", ""])
    got, stats = ingest_rows(root)
    assert [(r["status"], r["quarantine_reason"]) for r in got] == [
        ("valid", None), ("quarantined", "bad_manifest_row"), ("quarantined", "bad_manifest_row")]
    assert "line 2" in got[1]["quarantine_detail"] and "line 3" in got[2]["quarantine_detail"]
    csv_drop = tmp_path / "c"
    csv_drop.mkdir()
    (csv_drop / "ok.png").write_bytes(png_bytes())
    (csv_drop / "captions.csv").write_bytes(b'image,caption\nok.png,a red star\nok.png,x,extra\n\xff.png,caf\xe9\n')
    rows = ingest_rows(csv_drop)[0]
    assert [r["quarantine_reason"] for r in rows] == [None, "bad_manifest_row", "missing_file"]
    assert rows[2]["path"] == "\\xff.png"  # the undecodable byte, escaped
