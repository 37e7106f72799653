"""`juicer demo`: generate the demo world if absent, juice its drops, train three recipes, print a summary.

Every run goes through the Dagster instance the UI reads, so `make ui` shows what the demo did.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from .storage import Catalog, Warehouse
from .storage.records import drop_counts, quarantine_reasons
from .storage.results import comparison_table
from .truth_report import truth_report
from .world import demo_drop_configs, generate_drop, generate_eval_set

log = logging.getLogger("juicer")
DEMO_DROP_PREFIX = "demo"
_DEFAULT_DAGSTER_YAML = """telemetry:
  enabled: false
concurrency:
  runs:
    max_concurrent_runs: 2
run_monitoring:
  enabled: true
"""
# Three of the paper's recipes (the baseline, the sieve and the juicer) with two seeds at the CPU
# preset's budget: a table with spreads in the time docs/benchmarks.md gives. benchmarks/recipes.py
# runs every question recipe with three seeds at both budgets.
DEMO_RECIPES = ("raw", "datasieve", "datajuicer")
DEMO_SETTINGS = """# Written by `juicer demo` (edit freely; delete to return to the defaults).
# The CPU preset's training budget (600 steps of 64 images) with two seeds and one evaluation per
# run. benchmarks/recipes.py runs the full comparison, 3 seeds, both budgets.
[training]
seeds = [0, 1]
eval_points = 1
# whichever of fp32 and bf16 runs the training step faster on this CPU (timed at the start of
# training; the default, fp32, repeats bit for bit on any machine)
precision = "native"
"""
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_demo(data_dir: Path, drops: int, samples: int, eval_samples: int, seed: int, train: bool = True) -> int:
    """The whole demo; returns the process exit code (1 when a run failed, named on stderr)."""
    from .definitions import build_definitions
    from .settings import load_settings

    wh = Warehouse(data_dir)
    t0 = time.perf_counter()
    ensure_demo_settings(data_dir)
    preflight(load_settings(data_dir=data_dir))  # a wrong model or vocabulary fails now, not after the world
    names = ensure_demo_world(wh, drops, samples, eval_samples, seed)
    instance = dagster_instance(data_dir)
    defs = build_definitions(data_dir=data_dir)
    known = set(instance.get_dynamic_partitions("drops"))
    instance.add_dynamic_partitions("drops", [n for n in names if n not in known])
    for job, partition, what in _demo_runs(names, train):
        log.info(what)
        result = defs.resolve_job_def(job).execute_in_process(partition_key=partition, instance=instance,
                                                              raise_on_error=False, run_config=QUIET)
        if not result.success:
            print(f"juicer: the demo's run failed ({what}); see the run in the UI (make ui)", file=sys.stderr)
            return 1
    print_summary(wh, names, time.perf_counter() - t0, trained=train)
    return 0


def _demo_runs(names: list[str], train: bool) -> list[tuple[str, str | None, str]]:
    """(job, partition, what it does) of every run the demo makes, in order."""
    from .definitions import COMPARE_JOB_NAME, DROP_JOB_NAME, GOVERNOR_JOB_NAME, RECIPES_JOB_NAME

    runs = [(GOVERNOR_JOB_NAME, None, "resolving the governor and ingesting the held-out evaluation sets")]
    runs += [(DROP_JOB_NAME, name, f"juicing drop {name}") for name in names]
    if train:
        runs += [(RECIPES_JOB_NAME, recipe, f"training recipe {recipe}") for recipe in DEMO_RECIPES]
        runs.append((COMPARE_JOB_NAME, None, "comparing the recipes"))
    return runs


def ensure_demo_world(wh: Warehouse, n_drops: int, n_samples: int, eval_samples: int, seed: int) -> list[str]:
    """Generate whatever part of the demo world is missing; return the demo drop names."""
    names = []
    for cfg in demo_drop_configs(n_drops, n_samples, seed):
        name = f"{DEMO_DROP_PREFIX}-{cfg.drop_index:02d}"
        names.append(name)
        if not (wh.drops_dir / name).exists():
            r = generate_drop(wh.drops_dir / name, cfg)
            log.info("generated drop %s (%s, %d samples, %.0f images/s)", name, cfg.format, r.n_samples,
                     r.images_per_second)
    for kind in ("retrieval", "classification"):
        out = wh.world_dir / "evalsets" / kind
        if not out.exists():
            r = generate_eval_set(out, kind, eval_samples, seed)
            log.info("generated held-out %s set (%d images, %.0f images/s)", kind, r.n_samples, r.images_per_second)
    return names


def dagster_instance(data_dir: Path):
    """The Dagster instance the UI reads, so demo runs show up in `make ui`."""
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        home = data_dir / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists():
            (home / "dagster.yaml").write_text(_DEFAULT_DAGSTER_YAML)
        os.environ["DAGSTER_HOME"] = str(home)
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return DagsterInstance.get()


def preflight(settings) -> None:
    """One clear error before any long work: the models the settings name exist, and the class
    vocabulary file reads. (The code location itself loads without them, so the UI can show the
    failing stage; a command-line run should not get that far.)"""
    from .assets.vocabulary import class_vocabulary
    from .models.loader import ModelNotFound, weights_path

    source = settings.governor.source
    folder = Path(source[3:]) if source.startswith("hf:") else None
    path = weights_path(source)
    if (folder is not None and not folder.is_dir()) or (folder is None and path is not None and not path.exists()):
        raise ModelNotFound(f"[governor] source = {source!r}: no weights at {folder or path}; put them there "
                            f"or change the source (docs/bring-your-own.md)")
    caption_model = settings.captions.model_path
    if settings.captions.backend == "transformers" and not Path(caption_model).is_dir():
        raise ModelNotFound(f"[captions] model_path = {caption_model!r} is not a folder; point it at a local "
                            f"transformers model folder or set backend = \"rules\"")
    class_vocabulary(settings.classes)  # a missing or malformed vocabulary file raises its own clear error


def ensure_demo_settings(data_dir: Path) -> None:
    path = data_dir / "juicer.toml"
    if not path.exists() and not os.environ.get("JUICER_CONFIG"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DEMO_SETTINGS)
        log.info("wrote demo settings to %s", path)


def print_summary(wh: Warehouse, names: list[str], seconds: float, trained: bool = True) -> None:
    """What the demo did: samples per drop, quarantine reasons, truth metrics, the recipe table."""
    from .settings import load_settings

    cat = Catalog(wh.catalog_path)
    counts = drop_counts(cat, names)
    reasons = quarantine_reasons(cat, names).groupby("reason", as_index=False).n.sum()
    print("\n=== juicer demo summary ===")
    print(f"time: {seconds:.1f}s   data dir: {wh.root}")
    print(counts[["drop_id", "n_samples", "n_valid", "n_quarantined"]].to_string(index=False))
    print(f"total: {int(counts.n_samples.sum())} samples, {int(counts.n_valid.sum())} valid, "
          f"{int(counts.n_quarantined.sum())} quarantined")
    print("quarantined by reason:")
    print(reasons.sort_values(["n", "reason"], ascending=[False, True]).to_string(index=False)
          if len(reasons) else "  (none)")
    settings = load_settings(data_dir=wh.root)
    for name in names:
        print(truth_report(wh, name, settings.saliency.rho))
    if trained:
        _print_recipes(wh, cat, settings.training)
    print(f"outputs:  {wh.tables_dir}/<asset>/<drop>.parquet")
    print(f"catalog:  {wh.catalog_path}")
    print(reader_recipe(wh, cat.snapshot()))
    print("UI:       make ui   (then open http://127.0.0.1:3000)")


def _print_recipes(wh: Warehouse, cat: Catalog, training) -> None:
    table = comparison_table(cat)
    print(f"recipes (held-out scores, % mean ± std over {len(training.seeds)} seeds; equal vision-token budget "
          f"of {training.budget_full_steps} full-patch steps of {training.batch_size} images, trained in "
          f"{'/'.join(sorted(set(table.precision)))}; chance: zero-shot top-1 10 %):")
    print(table[["recipe", "seeds", "tokens_seen", "samples_seen"]].assign(
        **{m: [f"{100 * r[m + '_mean']:.1f} ± {100 * r[m + '_std']:.1f}" for r in table.to_dict("records")]
           for m in ("i2t_r@1", "t2i_r@1", "top1")}).to_string(index=False))
    print(demo_scope(list(table.recipe), len(training.seeds)))
    print(f"curves:   {wh.tables_dir}/recipe_comparison/learning_curves_tokens.png")


def demo_scope(trained: list[str], n_seeds: int) -> str:
    """The demo's table is a subset of the benchmark's: say which recipes it left out."""
    from .governance.recipes import RECIPE_NAMES

    left_out = ", ".join(r for r in RECIPE_NAMES if r not in set(trained)) or "none"
    return (f"the demo trains {len(trained)} of {len(RECIPE_NAMES)} recipes (left out: {left_out}) with {n_seeds} "
            f"seeds and no equal wall-clock runs; benchmarks/recipes.py runs the full "
            f"comparison (flip too, both budgets, 3 seeds)")


def reader_recipe(wh: Warehouse, snap: Path) -> str:
    """How to query the catalog from outside the pipeline without making its writers wait."""
    return "\n".join([
        f"snapshot: {snap}  (a copy of {wh.catalog_path}; `juicer status` refreshes it)",
        "query it, never the live catalog (an open connection, even read-only, makes pipeline writers wait):",
        f"  python -c \"import duckdb; print(duckdb.connect('{snap}', read_only=True)"
        f".sql('SELECT status, quarantine_reason, count(*) FROM samples GROUP BY ALL'))\"",
        f"or the Parquet files directly: duckdb.sql(\"SELECT * FROM read_parquet('{wh.tables_dir}/raw_samples/*.parquet')\")",
    ])
