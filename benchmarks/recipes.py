"""The whole recipe comparison from a fresh data directory, printed as one table.

    .venv/bin/python benchmarks/recipes.py                      # CPU preset (≈ 1 h on 2 cores)
    .venv/bin/python benchmarks/recipes.py --preset gpu --device cuda
    .venv/bin/python benchmarks/recipes.py --rho 0.25 --coverage 0.15 --boilerplate 0.5 --seeds 0 1 2

World drops → governor (the committed world governor) → juicing of every drop → every recipe at
an equal vision-token budget, each seed → held-out scores → the comparison table (mean ± std
over seeds), with learning curves (scores at several points of the budget). The drop pool is
large relative to the budget so that "more samples" means new samples, not more epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PRESETS = {
    # (drops, samples per drop, budget in full-patch steps, batch, width, vision layers, text layers)
    "cpu": dict(drops=4, samples=2500, budget_full_steps=300, batch_size=128, vision_width=96, vision_layers=3,
                text_width=96, text_layers=2),
    "gpu": dict(drops=8, samples=10000, budget_full_steps=3000, batch_size=512, vision_width=256, vision_layers=6,
                text_width=256, text_layers=4),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=None)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--coverage", type=float, default=0.25, help="world object coverage")
    ap.add_argument("--boilerplate", type=float, default=0.25)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--omit", type=float, default=0.3)
    ap.add_argument("--misaligned", type=float, default=0.05)
    ap.add_argument("--drops", type=int, default=None)
    ap.add_argument("--samples", type=int, default=None, help="samples per drop")
    ap.add_argument("--budget", type=int, default=None, help="budget in full-patch steps")
    ap.add_argument("--eval-points", type=int, default=3, help="learning-curve points over the budget")
    ap.add_argument("--data-dir", type=Path, default=None, help="keep outputs here instead of a temp dir")
    a = ap.parse_args()
    preset = {**PRESETS[a.preset], **{k: v for k, v in (("drops", a.drops), ("samples", a.samples),
                                                        ("budget_full_steps", a.budget)) if v is not None}}
    tmp = tempfile.TemporaryDirectory() if a.data_dir is None else None
    root = Path(tmp.name) if tmp else a.data_dir
    os.environ["JUICER_DATA_DIR"] = str(root)
    from dagster import DagsterInstance

    from juicer_pipeline.assets.training import comparison_table, format_comparison
    from juicer_pipeline.assets.resources import StorageResource
    from juicer_pipeline.definitions import (COMPARE_JOB_NAME, DROP_JOB_NAME, GOVERNOR_JOB_NAME, RECIPES_JOB_NAME,
                                             build_definitions)
    from juicer_pipeline.governance.recipes import RECIPE_NAMES
    from juicer_pipeline.settings import GovernorSettings, JuicerSettings, SaliencySettings, TrainingSettings
    from juicer_pipeline.world import CaptionCorruption, DropConfig, generate_drop, generate_eval_set

    t0 = time.perf_counter()
    corruption = CaptionCorruption(a.boilerplate, a.noise, a.omit, a.misaligned)
    drops = [f"bench-{i:02d}" for i in range(preset["drops"])]
    for i, name in enumerate(drops):
        generate_drop(root / "drops" / name, DropConfig(n_samples=preset["samples"], seed=100, drop_index=i,
                                                        object_coverage=a.coverage, captions=corruption))
    for kind in ("retrieval", "classification"):
        generate_eval_set(root / "world" / "evalsets" / kind, kind, 2000, object_coverage=a.coverage)
    training = TrainingSettings(seeds=a.seeds, eval_points=a.eval_points, device=a.device,
                                **{k: v for k, v in preset.items() if k not in ("drops", "samples")})
    settings = JuicerSettings(governor=GovernorSettings(device=a.device), saliency=SaliencySettings(rho=a.rho),
                              training=training)
    defs = build_definitions(settings, root)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    recipes = a.recipes or RECIPE_NAMES
    with DagsterInstance.ephemeral() as inst:
        assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=inst, run_config=quiet).success
        inst.add_dynamic_partitions("drops", drops)
        for d in drops:
            assert defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(instance=inst, partition_key=d,
                                                                          run_config=quiet).success
        t_juiced = time.perf_counter()
        print(f"juiced {len(drops)} drops x {preset['samples']} samples in {t_juiced - t0:.0f}s", flush=True)
        for r in recipes:
            t = time.perf_counter()
            assert defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(instance=inst, partition_key=r,
                                                                             run_config=quiet).success
            print(f"  {r}: {time.perf_counter() - t:.0f}s", flush=True)
        assert defs.resolve_job_def(COMPARE_JOB_NAME).execute_in_process(instance=inst, run_config=quiet).success
    storage = StorageResource(data_dir=str(root))
    table = comparison_table(storage)
    print(f"\npreset {a.preset}, device {a.device}, ρ={a.rho}, coverage {a.coverage}, caption corruption "
          f"{json.dumps(corruption.__dict__)}, seeds {a.seeds}, budget {training.budget_full_steps} full-patch steps "
          f"of {training.batch_size}; total {time.perf_counter() - t0:.0f}s")
    print(format_comparison(table))
    curves = storage.catalog.query("SELECT recipe, seed, record FROM checkpoints ORDER BY recipe, seed")
    print("\nlearning curves (t2i R@1 / zero-shot top-1 at each evaluation point, seed-wise):")
    for row in curves.itertuples():
        points = json.loads(row.record)["learning_curve"]
        print(f"  {row.recipe:20s} seed {row.seed}: " + "  ".join(
            f"{p['tokens_seen'] / 1e6:.2f}M tok: {100 * p['t2i_r@1']:.1f}/{100 * p['top1']:.1f}" for p in points))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
