"""Serial in-process juicing vs dagster-celery workers, on loopback.

Four world drops are juiced once serially in this process (direct catalog writes, the default) and
once by `--workers` celery workers behind Redis, with the Dagster instance on PostgreSQL, commit
records folded by one committer and a reader querying the catalog throughout (the arrangement of
juicer_pipeline_tests/end_to_end/test_distributed.py, which this reuses). Prints both wall times, their ratio,
and whether every table and catalog row came out identical.

    .venv/bin/python benchmarks/celery_vs_serial.py --samples 600

Needs redis-server and PostgreSQL installed (`make test` installs them).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from juicer_pipeline_tests.helpers import comparable_catalog_rows  # noqa: E402
from juicer_pipeline_tests.end_to_end.test_distributed import run_celery_vs_serial, tables  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=600, help="samples per drop (4 drops)")
    p.add_argument("--workers", type=int, default=2, help="celery worker processes (concurrency 1 each)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="juicer-celery-bench-") as tmp:
        out = run_celery_vs_serial(Path(tmp), a.samples, a.workers)
        serial, dist = tables(out["serial_dir"]), tables(out["celery_dir"])
        same_tables = all(dist[k].equals(serial[k]) for k in serial)
        same_catalog = comparable_catalog_rows(out["celery_dir"]) == comparable_catalog_rows(out["serial_dir"])
    result = {"drops": 4, "samples_per_drop": a.samples, "workers": a.workers,
              "serial_s": round(out["serial_s"], 1), "celery_s": round(out["celery_s"], 1),
              "celery_over_serial": round(out["celery_s"] / out["serial_s"], 2),
              "runs": [str(s) for _, s in out["statuses"]], "workers_used": sorted(out["hosts"]),
              "lock_backoffs": sum(f["lock_backoffs"] for f in out["folds"]),
              "records_folded": sum(f["folded"] for f in out["folds"]),
              "reader_reads": out["reader"]["reads"], "reader_errors": len(out["reader"]["errors"]),
              "tables_identical": same_tables, "catalog_identical": same_catalog}
    print(json.dumps(result, indent=1))
    print(f"celery ({a.workers} workers) / serial wall time: {result['celery_over_serial']}")
    return result


if __name__ == "__main__":
    main()
