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
