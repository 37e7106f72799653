"""Class extraction against truth, one lever at a time, on a freshly generated world drop.

    .venv/bin/python benchmarks/class_extraction.py [--source world] [--samples 800] [--coverage 0.25]
        [--boilerplate 0.25 --omit 0.3 --misaligned 0.05] [--calibration-images 600]

Generates a world drop (folder format, JPEG, the drops' own distribution), runs the governor's
one full-image pass and the class stage's crop pass exactly as the pipeline does, and scores the
decisions against the drop's `_truth.parquet` (the pipeline itself never reads it). Printed, per
lever: micro precision / recall of the extracted classes at the τ calibrated on the governor's own
corpus validation split (what the pipeline would do), and, for measurement only, the best recall
any single τ reaches at precision ≥ 0.9 on this drop's truth (how separable the scores are).

Levers: crops stretched to the input (the old crop) vs square aspect-preserving crops; with and
without the `background` abstain class; per-class τ; and crops cut from the true boxes (perfect
localisation: the classifier's own ceiling).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def micro_pr(scores: np.ndarray, truth: list[set[int]], tau, k: int = 3) -> tuple[float, float]:
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), scores.shape[1:])
    tp = fp = fn = 0
    for s, true in zip(scores, truth):
        pred = {int(i) for i in np.argsort(-s, kind="stable")[:k] if s[i] >= tau[i]}
        tp, fp, fn = tp + len(pred & true), fp + len(pred - true), fn + len(true - pred)
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def oracle_recall(scores: np.ndarray, truth: list[set[int]], precision: float = 0.9) -> tuple[float, float]:
    """Best recall of any single τ with precision ≥ `precision` on this drop's truth (measurement only)."""
    from juicer_pipeline.governance.classes import TAU_GRID

    best = (float("nan"), 0.0)
    for tau in TAU_GRID:
        p, r = micro_pr(scores, truth, tau)
        if p >= precision and r > best[1]:
            best = (float(tau), r)
    return best


def stretched_crop(image, region, grid):
    """The crop class extraction used before: one patch of margin, stretched to the input square."""
    ph, pw = image.height / grid[0], image.width / grid[1]
    box = (max(0, (region.c0 - 1) * pw), max(0, (region.r0 - 1) * ph),
           min(image.width, (region.c1 + 1) * pw), min(image.height, (region.r1 + 1) * ph))
    return image.crop(tuple(int(round(v)) for v in box)).resize(image.size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="world")
    ap.add_argument("--samples", type=int, default=800)
    ap.add_argument("--coverage", type=float, default=0.25)
    ap.add_argument("--boilerplate", type=float, default=0.25)
    ap.add_argument("--omit", type=float, default=0.3)
    ap.add_argument("--misaligned", type=float, default=0.05)
    ap.add_argument("--drop-index", type=int, default=0)
    ap.add_argument("--calibration-images", type=int, default=600)
    ap.add_argument("--target-precision", type=float, default=0.9)
    ap.add_argument("--method", default="attention_rollout")
    ap.add_argument("--region-fractions", default="0.15,0.25", help="comma-separated shares of top patches")
    ap.add_argument("--max-regions", type=int, default=4)
    ap.add_argument("--margins", default="0.3", help="comma-separated crop margins around a region")
    a = ap.parse_args()
    a.region_fraction = tuple(float(v) for v in a.region_fractions.split(","))

    import torch

    from juicer_pipeline.world.calibration import world_validation_set
    from juicer_pipeline.governance.classes import image_regions
    from juicer_pipeline.governance.classes import (calibrate_tau, calibrate_tau_per_class, crop_probs,
                                                    square_crop)
    from juicer_pipeline.governance.classes import CropPlan, region_crops
    from juicer_pipeline.governance.images import load_rgb
    from juicer_pipeline.governance.prompts import abstain_embedding, class_embeddings
    from juicer_pipeline.governance.saliency import VisionPass
    from juicer_pipeline.governance.vision import score_batch
    from juicer_pipeline.models.loader import load_foundation_model
    from juicer_pipeline.world.captions import CaptionCorruption
    from juicer_pipeline.world.generate import DropConfig, generate_drop
    from juicer_pipeline.world.vocabulary import load_vocabulary

    torch.set_num_threads(2)
    vocab = load_vocabulary()
    fm = load_foundation_model(a.source)
    class_emb = class_embeddings(fm.encode_text, list(vocab.shapes), vocab.colour_names)
    abstain = abstain_embedding(fm.encode_text)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DropConfig(n_samples=a.samples, drop_index=a.drop_index, object_coverage=a.coverage,
                         captions=CaptionCorruption(boilerplate=a.boilerplate, omit=a.omit, misaligned=a.misaligned))
        drop = Path(tmp) / "bench"
        generate_drop(drop, cfg, vocab)
        truth_rows = pd.read_parquet(drop / "_truth.parquet")
        images, truth, boxes = [], [], []
        for row in truth_rows.itertuples():
            path = drop / "images" / row.image
            try:
                img = load_rgb(path.read_bytes())
            except Exception:  # the drop's deliberately broken files: ingestion quarantines them
                continue
            images.append(img)
            truth.append({vocab.shapes.index(c) for c in row.classes})
            boxes.append([(o["shape"], (o["x0"], o["y0"], o["x1"], o["y1"])) for o in row.objects])
    print(f"drop: {len(images)} decodable images, coverage {a.coverage}, governor {fm.model_id[:12]} ({a.source})")

    vision = VisionPass(fm.model)

    def saliency_of(imgs):
        return np.concatenate([score_batch(fm, vision, imgs[i:i + 256]).saliency[a.method].numpy()
                               for i in range(0, len(imgs), 256)])

    val_images, val_truth = world_validation_set(64, a.calibration_images)
    saliency, val_saliency = saliency_of(images), saliency_of(val_images)
    vision.close()

    def per_image(probs, owner, n):
        out = np.zeros((n, len(class_emb)), np.float32)
        for i, p in zip(owner, probs):
            out[i] = np.maximum(out[i], p)
        return out

    plan = CropPlan(a.region_fraction, a.max_regions, tuple(float(v) for v in a.margins.split(",")))
    old_plan = CropPlan((0.35,), 4)  # what class extraction did before: one share, stretched crops

    def stretched(imgs, sal):
        regions = [image_regions(s, fm.grid, old_plan.fractions, old_plan.max_regions) for s in sal]
        return ([stretched_crop(imgs[i], g, fm.grid) for i, rs in enumerate(regions) for g in rs],
                [i for i, rs in enumerate(regions) for _ in rs])

    def square(imgs, sal, p=plan):
        crops, owner, _ = region_crops(imgs, sal, fm.grid, p)
        return crops, owner

    true_owner = [i for i, bs in enumerate(boxes) for _ in bs]
    true_crops = [square_crop(images[i], b, 0.25) for i, bs in enumerate(boxes) for _, b in bs]
    true_labels = np.array([vocab.shapes.index(s) for bs in boxes for s, _ in bs])
    levers = [("before: share 0.35, stretched crops, no abstain", stretched, False),
              ("square crops (margin 0.15, share 0.35), no abstain", lambda i, s: square(i, s, CropPlan((0.35,), 4, (0.15,))), False),
              (f"square crops (margins {a.margins}, shares {a.region_fractions}), no abstain", square, False),
              (f"square crops (margins {a.margins}, shares {a.region_fractions}) + background abstain", square, True)]
    rows = []
    for name, cut, use_abstain in levers + [("true-box crops + abstain (perfect localisation)", None, True)]:
        ab = abstain if use_abstain else None
        if cut is None:
            crops, own = true_crops, true_owner
            val_cut = square  # calibration has no truth boxes either: the pipeline's own crops
        else:
            crops, own = cut(images, saliency)
            val_cut = cut
        probs = crop_probs(fm, crops, class_emb, ab)
        scores = per_image(probs, own, len(images))
        vc, vo = val_cut(val_images, val_saliency)
        val = per_image(crop_probs(fm, vc, class_emb, ab), vo, len(val_images))
        row = {"lever": name, "crops": len(crops)}
        if cut is None:
            row["crop_shape_top1"] = float((probs.argmax(1) == true_labels).mean())
        cal = calibrate_tau(val, val_truth, a.target_precision)
        row["tau"] = cal["tau"]
        row["precision"], row["recall"] = micro_pr(scores, truth, cal["tau"])
        per_class = calibrate_tau_per_class(val, val_truth, a.target_precision)
        row["per_class_precision"], row["per_class_recall"] = micro_pr(scores, truth, per_class)
        row["oracle_tau"], row["oracle_recall_at_p0.9"] = oracle_recall(scores, truth)
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    print("\nall levers:")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
