"""The recipe comparison from a fresh data directory: both fair comparisons, learning curves,
the three questions, and salient-token inference.

    .venv/bin/python benchmarks/recipes.py                          # CPU preset, default world (~45 min, 2 cores)
    .venv/bin/python benchmarks/recipes.py --world heavy            # heavier corruption
    .venv/bin/python benchmarks/recipes.py --recipes all --seeds 0 1 2
    .venv/bin/python benchmarks/recipes.py --preset gpu --device cuda
    # scaling (the paper's Figure 3): data, model, schedule
    .venv/bin/python benchmarks/recipes.py --recipes raw datasieve datajuicer --seeds 0 --samples 1250
    .venv/bin/python benchmarks/recipes.py --recipes raw datasieve datajuicer --seeds 0 --student world-xs
    .venv/bin/python benchmarks/recipes.py --recipes raw datasieve datajuicer --seeds 0 --eval-points 6

World drops → governor (the committed world governor) → juicing of every drop → every recipe,
each seed, at an equal vision-token budget and at an equal wall-clock budget → held-out scores →
one table per comparison (mean ± std over seeds) with its dense table beside it (segmentation
probes, MaskCLIP zero-shot segmentation and pointing, counting, binding: `benchmark_scores`' dense
evaluation), learning curves (scores at several points of each budget), the answers to the three
questions on retrieval, classification and the dense scores, and each token-budget checkpoint
evaluated on full images and on only the governor-salient ⌈ρN⌉ tokens (accuracy and images/s).

A question is answered only when the two means differ by more than the sum of their seed
standard deviations; otherwise it is printed as a tie.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

PRESETS = {
    # drops × samples per drop is the pool; budget in full-patch steps; wall-clock budget in seconds.
    # The CPU preset trains twice the pipeline's default budget (600 steps, which keeps `make demo`
    # within 15 minutes): at 600 steps `raw` reaches 21 / 33 % (t2i R@1 / zero-shot), too weak a
    # baseline. bf16 ("native") pays for the extra steps where the CPU runs bf16 faster than fp32.
    "cpu": dict(drops=4, samples=2500, budget_full_steps=1200, wallclock_s=45.0, batch_size=64, student="world-s",
                precision="native"),
    "gpu": dict(drops=8, samples=10000, budget_full_steps=3000, wallclock_s=300.0, batch_size=512, student=str(Path(__file__).resolve().parent / "student_configs" / "world-m.json"),
                precision="fp32"),
}
WORLDS = {
    "default": dict(coverage=0.25, boilerplate=0.25, noise=0.25, omit=0.3, misaligned=0.05),
    "heavy": dict(coverage=0.2, boilerplate=0.6, noise=0.25, omit=0.5, misaligned=0.10),
}
QUESTION_RECIPES = ["raw", "datasieve", "flip", "datajuicer", "sieve_then_juice"]
# The dense scores the questions are answered on: the probe on every block's tokens, MaskCLIP's
# mIoU and pointing, counting where area does not give it away, and binding's group score.
DENSE_ANSWERED = [("seg probe mIoU", "dense_seg_blocks_miou"), ("zero-shot mIoU", "dense_zs_seg_miou"),
                  ("pointing", "dense_pointing"), ("count (area control)", "dense_count_area_control"),
                  ("binding group", "dense_binding_group")]
QUESTIONS = [
    ("(a) salient vs random patches", "datajuicer", "flip"),
    ("(b) does juicing add to sieving?", "sieve_then_juice", "datasieve"),
    ("(b) does sieving beat raw?", "datasieve", "raw"),
    ("(c) the paper's claim", "datajuicer", "datasieve"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "native"], default=None,
                    help="bf16: training steps under autocast (default: the preset's; the CPU preset's is whichever "
                         "of the two runs its training step faster on this CPU, timed at start)")
    ap.add_argument("--world", choices=list(WORLDS), default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=None, help=f"default: {' '.join(QUESTION_RECIPES)}; 'all' for all")
    ap.add_argument("--rho", type=float, default=0.5)
    for k in WORLDS["default"]:
        ap.add_argument(f"--{k}", type=float, default=None, help="override the world's value")
    ap.add_argument("--shared-colour", type=float, default=None, help="world: P(all objects of a scene share a colour)")
    ap.add_argument("--coverage-shared-by", type=int, default=None,
                    help="world: size every object as one of this many sharing the coverage (0: the scene's objects "
                         "share it, the world before 2026-12-01; default: DropConfig's)")
    ap.add_argument("--drops", type=int, default=None)
    ap.add_argument("--samples", type=int, default=None, help="samples per drop (data scaling)")
    ap.add_argument("--student", default=None, help="student config (model scaling)")
    ap.add_argument("--budget", type=int, default=None, help="budget in full-patch steps")
    ap.add_argument("--wallclock", type=float, default=None, help="equal wall-clock budget in seconds (0: skip)")
    ap.add_argument("--eval-points", type=int, default=2, help="learning-curve points over each budget (schedule scaling)")
    ap.add_argument("--eval-samples", type=int, default=2000, help="images of each held-out set")
    ap.add_argument("--no-inference", action="store_true", help="skip the salient-token inference table")
    ap.add_argument("--data-dir", type=Path, default=None, help="keep outputs here instead of a temp dir")
    a = ap.parse_args()
    preset = {**PRESETS[a.preset], **{k: v for k, v in (("drops", a.drops), ("samples", a.samples),
                                                        ("budget_full_steps", a.budget), ("student", a.student),
                                                        ("wallclock_s", a.wallclock)) if v is not None}}
    precision = a.precision or preset["precision"]
    world = {**WORLDS[a.world], **{k: getattr(a, k) for k in WORLDS["default"] if getattr(a, k) is not None}}
    tmp = tempfile.TemporaryDirectory() if a.data_dir is None else None
    root = Path(tmp.name) if tmp else a.data_dir
    os.environ["JUICER_DATA_DIR"] = str(root)
    from dagster import DagsterInstance

    from juicer_pipeline.assets.resources import StorageResource
    from juicer_pipeline.storage.results import comparison_table, learning_curves
    from juicer_pipeline.definitions import (COMPARE_JOB_NAME, DROP_JOB_NAME, GOVERNOR_JOB_NAME, RECIPES_JOB_NAME,
                                             build_definitions)
    from juicer_pipeline.training import student_config, with_native_precision
    from juicer_pipeline.governance.recipes import RECIPE_NAMES
    from juicer_pipeline.settings import GovernorSettings, JuicerSettings, SaliencySettings, TrainingSettings
    from juicer_pipeline.world import CaptionCorruption, DropConfig, generate_drop, generate_eval_set

    t0 = time.perf_counter()
    shared = DropConfig().shared_colour if a.shared_colour is None else a.shared_colour
    sizing = DropConfig().coverage_shared_by if a.coverage_shared_by is None else a.coverage_shared_by
    corruption = CaptionCorruption(world["boilerplate"], world["noise"], world["omit"], world["misaligned"])
    drops = [f"bench-{i:02d}" for i in range(preset["drops"])]
    for i, name in enumerate(drops):
        generate_drop(root / "drops" / name, DropConfig(n_samples=preset["samples"], seed=100, drop_index=i,
                                                        object_coverage=world["coverage"], shared_colour=shared,
                                                        coverage_shared_by=sizing, captions=corruption))
    for kind in ("retrieval", "classification"):
        generate_eval_set(root / "world" / "evalsets" / kind, kind, a.eval_samples, object_coverage=world["coverage"],
                          shared_colour=shared, coverage_shared_by=sizing)
    wallclock = preset["wallclock_s"] or None
    training = TrainingSettings(seeds=a.seeds, eval_points=a.eval_points, device=a.device, precision=precision,
                                budget_full_steps=preset["budget_full_steps"], batch_size=preset["batch_size"],
                                student=preset["student"], wallclock_s=wallclock)
    settings = JuicerSettings(governor=GovernorSettings(device=a.device), saliency=SaliencySettings(rho=a.rho),
                              training=training)
    if precision == "native":  # resolved (and printed) now; training reuses the same timing
        precision = with_native_precision(student_config(settings), progress=print).precision
    defs = build_definitions(settings, root)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    recipes = RECIPE_NAMES if a.recipes == ["all"] else (a.recipes or QUESTION_RECIPES)
    with DagsterInstance.ephemeral() as inst:
        assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=inst, run_config=quiet).success
        inst.add_dynamic_partitions("drops", drops)
        for d in drops:
            assert defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(instance=inst, partition_key=d,
                                                                          run_config=quiet).success
        print(f"juiced {len(drops)} drops x {preset['samples']} samples in {time.perf_counter() - t0:.0f}s", flush=True)
        for r in recipes:
            t = time.perf_counter()
            assert defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(instance=inst, partition_key=r,
                                                                             run_config=quiet).success
            print(f"  {r}: {time.perf_counter() - t:.0f}s", flush=True)
        assert defs.resolve_job_def(COMPARE_JOB_NAME).execute_in_process(instance=inst, run_config=quiet).success
    storage = StorageResource(data_dir=str(root))
    print(f"\npreset {a.preset} (student {training.student}), device {a.device} {precision}, ρ={a.rho}, world {a.world} "
          f"{json.dumps(world)}, shared_colour {shared}, coverage shared by {sizing}, seeds {a.seeds}, pool {len(drops)}x{preset['samples']}, "
          f"budgets: {training.budget_full_steps} full-patch steps of {training.batch_size} | {wallclock} s; "
          f"total {time.perf_counter() - t0:.0f}s")
    for budget, title in (("tokens", "EQUAL VISION TOKENS"), ("wallclock", f"EQUAL WALL-CLOCK ({wallclock} s)")):
        table = comparison_table(storage.catalog, budget)
        if table.empty:
            continue
        print(f"\n{title} (held-out scores in %, mean ± std over seeds)")
        print(format_comparison(table))
        print(f"\n{title}, DENSE (frozen tower, full images; held-out dense sets; in %, mean ± std over seeds)")
        print(format_dense(table))
        print_curves(learning_curves(storage.catalog, budget, "t2i_r@1"),
                     learning_curves(storage.catalog, budget, "top1"), budget)
        print_answers(table)
    if not a.no_inference:
        print_inference(root, settings, storage)
    if tmp:
        tmp.cleanup()


def format_comparison(table) -> str:
    """The comparison table as markdown, scores as 'mean ± std' in percent."""
    from juicer_pipeline.assets.ui import markdown_table
    from juicer_pipeline.storage.results import comparison_rows

    return markdown_table(comparison_rows(table), max_chars=20)


def format_dense(table) -> str:
    """The dense scores of the comparison as markdown, 'mean ± std' in percent."""
    from juicer_pipeline.assets.ui import markdown_table
    from juicer_pipeline.storage.results import dense_rows

    return markdown_table(dense_rows(table), max_chars=20)


def print_curves(t2i: dict, top1: dict, budget: str) -> None:
    unit = "M tokens" if budget == "tokens" else "s"
    print(f"learning curves (t2i R@1 / zero-shot top-1 in %, mean over seeds, at {unit}):")
    for recipe, points in t2i.items():
        print(f"  {recipe:20s} " + "  ".join(f"{x:.2f}: {100 * y:.1f}/{100 * z:.1f}"
                                               for (x, y), (_, z) in zip(points, top1[recipe])))


def verdict(table, better: str, worse: str, metric: str) -> str:
    rows = {r["recipe"]: r for r in table.to_dict("records")}
    if better not in rows or worse not in rows:
        return "not run"
    a, b = rows[better], rows[worse]
    if math.isnan(a[f"{metric}_mean"]) or math.isnan(b[f"{metric}_mean"]):  # checkpoints scored before it existed
        return "not scored"
    diff = 100 * (a[f"{metric}_mean"] - b[f"{metric}_mean"])
    spread = 100 * (a[f"{metric}_std"] + b[f"{metric}_std"])
    if min(a["seeds"], b["seeds"]) < 2:
        return f"Δ {diff:+.1f} (one seed: no spread, not answered)"
    if abs(diff) <= spread:
        return f"tie (Δ {diff:+.1f} within spread {spread:.1f})"
    return f"{better if diff > 0 else worse} (Δ {diff:+.1f} > spread {spread:.1f})"


def print_answers(table) -> None:
    print("answers (beyond the sum of seed std, else a tie):")
    for question, a, b in QUESTIONS:
        print(f"  {question:34s} {a} vs {b}: t2i R@1 {verdict(table, a, b, 't2i_r@1')}; "
              f"zero-shot {verdict(table, a, b, 'top1')}")
        print(f"  {'':34s} dense: " + "; ".join(f"{name} {verdict(table, a, b, metric)}"
                                                 for name, metric in DENSE_ANSWERED))


def print_inference(root: Path, settings, storage) -> None:
    """Each token-budget checkpoint on full images vs only the governor-salient ⌈ρN⌉ patches."""
    import numpy as np
    import pandas as pd
    from open_clip.tokenizer import SimpleTokenizer

    from juicer_pipeline.storage.results import current_checkpoints
    from juicer_pipeline.training import evaluate_student, held_out_eval_set, student_config
    from juicer_pipeline.governance.salient_eval import salient_kept
    from juicer_pipeline.models.loader import load_foundation_model, load_world_clip
    from juicer_pipeline.assets.vocabulary import class_vocabulary

    cfg = student_config(settings)
    tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
    ev = held_out_eval_set(storage.warehouse, tokenizer, cfg.arch.image_size, class_vocabulary(settings.classes))
    governor = load_foundation_model(settings.governor.source, settings.governor.device)
    grid = (cfg.arch.grid, cfg.arch.grid)
    ev.retrieval_kept = salient_kept(governor, ev.retrieval_images, settings.saliency, grid)
    ev.class_kept = salient_kept(governor, ev.class_images, settings.saliency, grid)
    ckpts = current_checkpoints(storage.catalog, "tokens")
    rows = []
    for c in ckpts.itertuples():
        model = load_world_clip(c.path, cfg.device).model
        for salient in (False, True):
            s = evaluate_student(model, tokenizer, ev, cfg.device, salient_only=salient)
            rows.append({"recipe": c.recipe, "seed": c.seed, "tokens": "salient" if salient else "full",
                         "t2i_r@1": 100 * s["t2i_r@1"], "top1": 100 * s["top1"], "images/s": s["images_per_second"]})
    df = pd.DataFrame(rows).groupby(["recipe", "tokens"], sort=False).agg(["mean", "std"])
    print(f"\nINFERENCE on full images vs governor-salient ⌈ρN⌉ tokens (ρ={settings.saliency.rho}; "
          f"held-out, mean ± std over seeds)")
    for (recipe, tokens), r in df.iterrows():
        print(f"  {recipe:20s} {tokens:8s} t2i R@1 {r[('t2i_r@1', 'mean')]:5.1f} ± {np.nan_to_num(r[('t2i_r@1', 'std')]):.1f}  "
              f"zero-shot {r[('top1', 'mean')]:5.1f} ± {np.nan_to_num(r[('top1', 'std')]):.1f}  "
              f"images/s {r[('images/s', 'mean')]:7.0f}")


if __name__ == "__main__":
    main()
