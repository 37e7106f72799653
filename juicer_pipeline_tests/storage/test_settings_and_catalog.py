import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from juicer_pipeline.settings import IngestSettings, JuicerSettings, SettingsError, code_version, load_settings
from juicer_pipeline.storage import Catalog, CatalogLocked, LineageRow, atomic_path, write_lineage


def test_settings_file_is_validated(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[ingest]\nmin_side = 32\n")
    assert load_settings(good).ingest.min_side == 32
    typo = tmp_path / "typo.toml"
    typo.write_text("[ingest]\nmin_sidee = 32\n")
    with pytest.raises(SettingsError, match="min_sidee"):
        load_settings(typo)
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nmin_side = 900\nmax_side = 100\n")
    with pytest.raises(SettingsError, match="must not exceed"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    nul = tmp_path / "nul.toml"  # TOML's \u0000 escape: a path no os call accepts, named at load
    nul.write_text('[classes]\nvocabulary = "classes\\u0000.txt"\n')
    with pytest.raises(SettingsError, match="vocabulary contains a NUL byte"):
        load_settings(nul)


def test_settings_come_from_env_or_data_dir(tmp_path, monkeypatch):
    (tmp_path / "juicer.toml").write_text("[ingest]\nmax_caption_chars = 99\n")
    monkeypatch.delenv("JUICER_CONFIG", raising=False)
    assert load_settings(data_dir=tmp_path).ingest.max_caption_chars == 99
    other = tmp_path / "other.toml"
    other.write_text("[ingest]\nmax_caption_chars = 7\n")
    monkeypatch.setenv("JUICER_CONFIG", str(other))
    assert load_settings(data_dir=tmp_path).ingest.max_caption_chars == 7


def test_config_hash_is_stable_and_sensitive():
    a, b = IngestSettings(), IngestSettings(min_side=17)
    assert a.config_hash() == IngestSettings().config_hash()
    assert a.config_hash() != b.config_hash()
    assert code_version("x-1", a) != code_version("x-1", b) != code_version("x-2", b)
    assert JuicerSettings().ingest == a


def test_migrations_are_idempotent(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    v = cat.migrate()
    assert v >= 1 and cat.migrate() == v
    tables = set(cat.query("SELECT table_name FROM information_schema.tables").table_name)
    assert {"drops", "samples", "lineage", "schema_version"} <= tables
    assert {"version", "status", "status_changed_at"} <= set(cat.query("DESCRIBE drops").column_name)


_HOLD_LOCK = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE IF NOT EXISTS t (x INT)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_lock_conflicts_are_retried_until_free(tmp_path):
    path = tmp_path / "c.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.perf_counter()
    Catalog(path, lock_timeout_s=30).migrate()  # waits for the other process
    assert time.perf_counter() - t0 > 0.3
    holder.wait(5)


def test_lock_that_never_frees_gives_clear_error_after_the_window(tmp_path):
    path = tmp_path / "c.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path), "10"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(CatalogLocked, match=r"stayed locked for 0.6 s: another process holds it.*raise \[catalog\] lock_timeout_s"):
            Catalog(path, lock_timeout_s=0.6, base_delay_s=0.01).migrate()
        assert 0.5 < time.perf_counter() - t0 < 5  # the window, not a fixed number of attempts
    finally:
        holder.kill()
        holder.wait()


def test_lock_timeout_is_a_setting_that_reaches_the_catalog(tmp_path):
    from juicer_pipeline.definitions import build_definitions

    toml = tmp_path / "juicer.toml"
    toml.write_text("[catalog]\nlock_timeout_s = 7.5\n")
    settings = load_settings(toml)
    assert settings.catalog.lock_timeout_s == 7.5
    storage = build_definitions(settings, tmp_path).resources["storage"]
    assert storage.catalog.lock_timeout_s == 7.5


def test_write_conflict_inside_a_transaction_is_retried(tmp_path):
    """A conflict after connect (here: another connection's open transaction on the same row) is
    backed off and the whole transaction re-run, not only the connect."""
    cat = Catalog(tmp_path / "c.duckdb", lock_timeout_s=20, base_delay_s=0.01)
    cat.migrate()
    cat.write(lambda con: con.execute("CREATE TABLE t (k INT PRIMARY KEY, v INT); INSERT INTO t VALUES (1, 0)"))
    other = duckdb.connect(str(cat.path))
    other.execute("BEGIN")
    other.execute("UPDATE t SET v = 1 WHERE k = 1")
    attempts = []

    def bump(con):
        attempts.append(1)
        con.execute("UPDATE t SET v = v + 10 WHERE k = 1")

    releaser = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    releaser.start()
    cat.write(bump)
    releaser.join()
    other.close()
    assert len(attempts) > 1 and cat.query("SELECT v FROM t").v[0] == 11


_READ_SNAPSHOT = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1], read_only=True)
print(con.execute("SELECT count(*) FROM lineage").fetchone()[0], flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_outside_reader_of_the_snapshot_does_not_block_writers(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb", lock_timeout_s=0.5)
    cat.migrate()
    cat.write(lambda con: write_lineage(con, LineageRow("governor", None, [], "r1", "v", "h")))
    snap = cat.snapshot()
    assert snap == tmp_path / "catalog-snapshot.duckdb"
    reader = subprocess.Popen([sys.executable, "-c", _READ_SNAPSHOT, str(snap), "10"], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "1"
        cat.write(lambda con: write_lineage(con, LineageRow("eval_sets", None, [], "r2", "v", "h")))  # no CatalogLocked
        assert len(cat.query("SELECT * FROM lineage")) == 2
        assert cat.snapshot() == snap  # refreshed in place while the reader still has the old copy open
        assert len(Catalog(snap).query("SELECT * FROM lineage")) == 2
    finally:
        reader.kill()
        reader.wait()


def test_status_prints_the_snapshot_and_a_read_only_recipe(data_dir, capsys):
    from juicer_pipeline.cli import main

    Catalog(data_dir / "catalog.duckdb").migrate()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    snap = data_dir / "catalog-snapshot.duckdb"
    assert snap.exists() and f"snapshot: {snap}" in out
    assert f"duckdb.connect('{snap}', read_only=True)" in out and "read_parquet(" in out
    assert f"duckdb.connect('{data_dir / 'catalog.duckdb'}'" not in out


def test_readme_no_longer_advises_read_only_connections_to_the_live_catalog():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "read_only=True` while the pipeline runs" not in readme
    assert "catalog-snapshot.duckdb" in readme and "lock_timeout_s" in readme


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_cli_reports_a_broken_catalog_in_one_line(data_dir, capsys):
    from juicer_pipeline.cli import main

    (data_dir / "catalog.duckdb").write_bytes(b"this is not a DuckDB file" * 100)
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("juicer: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("juicer: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_reports_a_locked_catalog_in_one_line_that_says_what_to_do(data_dir, capsys):
    import subprocess
    import sys

    from juicer_pipeline.cli import main

    Catalog(data_dir / "catalog.duckdb").migrate()
    (data_dir / "juicer.toml").write_text("[catalog]\nlock_timeout_s = 1\n")
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('holding', flush=True); time.sleep(120)", str(data_dir / "catalog.duckdb")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert main(["status"]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = _one_error_line(capsys)
    assert "CatalogLocked" in err and "catalog-snapshot.duckdb" in err and "lock_timeout_s" in err


@pytest.mark.parametrize("toml, expected", [
    ('[governor]\nsource = "file:{d}/no-such-governor.safetensors"\n', "no weights at {d}/no-such-governor.safetensors"),
    ('[classes]\nvocabulary = "{d}/no-such-vocabulary.txt"\n', "no-such-vocabulary.txt"),
])
def test_cli_demo_stops_at_a_missing_model_or_vocabulary_before_any_work(data_dir, capsys, toml, expected):
    from juicer_pipeline.cli import main

    (data_dir / "juicer.toml").write_text(toml.format(d=data_dir))
    assert main(["demo", "--skip-training"]) == 2
    assert expected.format(d=data_dir) in _one_error_line(capsys)
    assert not any((data_dir / "drops").iterdir())  # failed before generating the demo world
