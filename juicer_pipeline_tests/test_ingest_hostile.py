"""Hostile drops: each input row keeps a row of its own, quarantined with a named reason."""
import io
import tarfile

from juicer_pipeline.governance.drop_sources import open_drop
from juicer_pipeline.governance.images import ImageLimits
from juicer_pipeline.governance.ingest import IngestStats, ingest_batches
from juicer_pipeline.storage import Catalog, Warehouse

from .helpers import png_bytes, run_drop, write_folder_drop


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
    import juicer_pipeline.governance.drop_sources as drop_sources

    small, big = png_bytes(colour=(1, 1, 1)), png_bytes((64, 64), colour=(2, 2, 2)) + b"\0" * 4096
    opened: list[str] = []
    monkeypatch.setattr(drop_sources, "open", lambda p, *a, **k: opened.append(str(p)) or io.open(p, *a, **k),
                        raising=False)
    drop = write_folder_drop(tmp_path / "d", {"small.png": small, "big.png": big},
                             [{"image": "small.png", "caption": "x"}, {"image": "big.png", "caption": "x"}])
    got, _ = ingest_rows(drop, ImageLimits(max_file_bytes=_cap_between(small, big)))
    rows = by_id(got)
    assert rows["small.png"]["status"] == "valid"
    assert rows["big.png"]["quarantine_reason"] == "too_large"
    assert "max_file_bytes" in rows["big.png"]["quarantine_detail"]
    assert not any(p.endswith("big.png") for p in opened)


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
