"""The exact-duplicate store: ids and content digests seen earlier in a drop, kept on disk.

Ingestion's decisions (which row is a duplicate, which fresh id a repeated id gets) must not
depend on which keys happen to be in memory and which on disk."""
import hashlib
import random

import pytest

import juicer_pipeline.governance.ingest as ingest
from juicer_pipeline.governance.seen_keys import SeenKeys

from ..helpers import png_bytes, write_folder_drop
from .test_ingest_hostile import ingest_rows


def test_keys_are_found_after_they_move_to_disk():
    with SeenKeys(max_in_memory=4) as seen:
        digests = [hashlib.sha256(str(i).encode()).digest() for i in range(10)]
        for d in digests[:5]:
            assert d not in seen
            seen.add(d)
            seen.flush_if_full()
        assert len(seen._memory) < 4 and len(seen._unwritten) < 4  # some of them went to disk
        assert all(d in seen for d in digests[:5])
        assert not any(d in seen for d in digests[5:])
        seen.flush()
        assert seen._memory == {} and seen._unwritten == {}
        seen.prefetch(digests)  # the whole batch in one query: found and absent ones alike
        assert {d: seen._memory[d] for d in digests} == {d: (0 if i < 5 else None) for i, d in enumerate(digests)}
        assert [d in seen for d in digests] == [True] * 5 + [False] * 5


def test_values_survive_a_flush_and_are_overwritten_not_duplicated():
    with SeenKeys(max_in_memory=2) as seen:
        seen["a"] = 0
        seen.flush()
        seen["a"] = seen["a"] + 1  # read back from disk, written again
        seen["b"] = 7
        seen.flush()
        assert (seen["a"], seen["b"]) == (1, 7)
        with pytest.raises(KeyError):
            seen["c"]
        assert seen._db.execute("SELECT count(*) FROM seen").fetchone()[0] == 2


def test_prefetch_of_more_keys_than_one_query_takes():
    keys = [f"id{i}" for i in range(1234)]
    with SeenKeys() as seen:
        for k in keys[::2]:
            seen[k] = 3
        seen.flush()
        seen.prefetch(keys)
        assert len(seen._memory) == len(keys)
        seen._db.close()  # every answer below must come from memory now
        assert [k in seen for k in keys] == [i % 2 == 0 for i in range(len(keys))]


def _reference_ids(ids: list[str]) -> list[str]:
    """What ingestion did with a plain dict: a repeat of `x` becomes the first `x#dup<n>` not taken."""
    seen, out = {}, []
    for local_id in ids:
        if local_id in seen:
            n = seen[local_id] + 1
            while f"{local_id}#dup{n}" in seen:
                n += 1
            seen[local_id] = n
            local_id = f"{local_id}#dup{n}"
        seen[local_id] = 0
        out.append(local_id)
    return out


@pytest.fixture
def tiny_memory(monkeypatch):
    """Stores that move their keys to disk after every batch of 3 rows."""
    monkeypatch.setattr(ingest, "SEEN_KEYS_IN_MEMORY", 1)


def test_duplicate_ids_across_flushes_get_the_same_fresh_ids(tmp_path, tiny_memory):
    ids = ["a", "b", "a", "c", "d", "a#dup1", "e", "a", "b", "f", "a#dup3", "a", "b#dup1", "b"]
    files = {f"{i}.png": png_bytes(colour=(i, 0, 0)) for i in range(len(ids))}
    rows = [{"image": f"{i}.png", "caption": "x", "sample_id": sid} for i, sid in enumerate(ids)]
    got, stats = ingest_rows(write_folder_drop(tmp_path / "d", files, rows))
    assert [r["local_id"] for r in got] == _reference_ids(ids) == [
        "a", "b", "a#dup1", "c", "d", "a#dup1#dup1", "e", "a#dup2", "b#dup1", "f", "a#dup3", "a#dup4",
        "b#dup1#dup1", "b#dup2"]
    assert len({r["sample_id"] for r in got}) == len(ids) == stats.n_samples
    repeated = {2, 5, 7, 8, 11, 12, 13}
    assert [r["quarantine_reason"] for r in got] == [
        "duplicate_sample_id" if i in repeated else None for i in range(len(ids))]


def test_many_copies_of_one_id(tmp_path, tiny_memory):
    n = 60
    files = {f"{i}.png": png_bytes(colour=(i, i, 0)) for i in range(n)}
    rows = [{"image": f"{i}.png", "caption": "x", "sample_id": "same"} for i in range(n)]
    got, stats = ingest_rows(write_folder_drop(tmp_path / "d", files, rows))
    assert [r["local_id"] for r in got] == ["same"] + [f"same#dup{i}" for i in range(1, n)]
    assert stats.n_valid == 1 and stats.quarantined == {"duplicate_sample_id": n - 1}


def test_duplicate_content_across_flushes(tmp_path, tiny_memory):
    # 12 rows in batches of 3: the repeats of image 0 and 4 come batches after the first copy,
    # by which time its digest is on disk only
    colours = [0, 1, 2, 3, 4, 5, 0, 6, 7, 4, 8, 0]
    files = {f"{i}.png": png_bytes(colour=(c, 9, 9)) for i, c in enumerate(colours)}
    rows = [{"image": f"{i}.png", "caption": "x", "sample_id": f"s{i}"} for i in range(len(colours))]
    got, stats = ingest_rows(write_folder_drop(tmp_path / "d", files, rows))
    assert [r["quarantine_reason"] for r in got] == [
        "duplicate_content" if i in (6, 9, 11) else None for i in range(len(colours))]
    assert got[6]["content_hash"] == got[0]["content_hash"] and got[6]["image"] is None
    assert "same bytes as an earlier sample" in got[9]["quarantine_detail"]
    assert stats.n_valid == 9


def test_rows_are_the_same_whatever_the_store_holds_in_memory(tmp_path, monkeypatch):
    rng = random.Random(5)
    ids = [rng.choice(["p", "q", "r", "p#dup1", f"u{i}"]) for i in range(40)]
    colours = [rng.randrange(12) for _ in ids]
    files = {f"{i}.png": png_bytes(colour=(c, 1, 2)) for i, c in enumerate(colours)}
    rows = [{"image": f"{i}.png", "caption": "x", "sample_id": sid} for i, sid in enumerate(ids)]
    drop = write_folder_drop(tmp_path / "d", files, rows)
    in_memory, _ = ingest_rows(drop)  # 40 rows: never flushed
    monkeypatch.setattr(ingest, "SEEN_KEYS_IN_MEMORY", 1)
    flushed, _ = ingest_rows(drop)
    assert flushed == in_memory
    assert [r["local_id"] for r in flushed] == _reference_ids(ids)
    assert {r["quarantine_reason"] for r in flushed} == {None, "duplicate_sample_id", "duplicate_content"}
