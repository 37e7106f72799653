"""Throughput of the `patch_saliency` stage vs a bare batched forward of the same model.

    .venv/bin/python benchmarks/vision_throughput.py --samples 2000 [--source world] [--device cpu]
    # the GPU preset at ViT-B/16 scale (any open_clip ViT-B-16 weights file)
    python benchmarks/vision_throughput.py --source open_clip:ViT-B-16:vit_b_16.pt --device cuda --precision bf16 --batch-size 512

Both sides start from the same stored image bytes and include decoding and preprocessing; the
bare side then calls `model.encode_image` on the batch, the stage side does everything the asset
does (hooked pass, every saliency method, embedding, Parquet write). Printed: images/s of each,
their ratio (target ≥ 0.9) and the peak RSS of the process.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _measure import peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--source", default="world")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: governor.batch_size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    a = ap.parse_args()
    if a.batch_size is None:
        from juicer_pipeline.settings import GovernorSettings

        a.batch_size = GovernorSettings().batch_size

    from juicer_pipeline.governance.ingest import RAW_SAMPLES_SCHEMA, IngestStats, ingest_batches
    from juicer_pipeline.governance.drop_sources import open_drop
    from juicer_pipeline.governance.images import ImageLimits
    from juicer_pipeline.training.runtime import autocast
    from juicer_pipeline.governance.saliency import VisionPass
    from juicer_pipeline.governance.vision import (SALIENCY_SCHEMA, iter_valid_images, saliency_record_batch,
                                                   score_batch)
    from juicer_pipeline.models.loader import load_foundation_model
    from juicer_pipeline.storage import Warehouse
    from juicer_pipeline.world import DropConfig, generate_drop

    torch.set_num_threads(torch.get_num_threads())
    fm = load_foundation_model(a.source, a.device)

    def _sync():
        if fm.device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(Path(tmp))
        generate_drop(wh.drops_dir / "bench", DropConfig(n_samples=a.samples, broken_rate=0, duplicate_rate=0))
        with wh.stream_table("raw_samples", "bench", RAW_SAMPLES_SCHEMA) as w:
            for b in ingest_batches(open_drop(wh.drops_dir / "bench"), "bench", ImageLimits(), 4000, IngestStats()):
                w.write_batch(b)
        raw = str(wh.partition_path("raw_samples", "bench"))

        def bare() -> int:
            n = 0
            with torch.inference_mode(), autocast(fm.device, a.precision):
                for _, images in iter_valid_images(raw, a.batch_size):
                    x = torch.stack([fm.preprocess(im) for im in images]).to(fm.device)
                    fm.model.encode_image(x)
                    n += len(images)
            _sync()
            return n

        def stage() -> int:
            n = 0
            vision = VisionPass(fm.model)
            with wh.stream_table("patch_saliency", "bench", SALIENCY_SCHEMA) as w:
                for ids, images in iter_valid_images(raw, a.batch_size):
                    w.write_batch(saliency_record_batch(ids, fm.grid, score_batch(fm, vision, images, a.precision)))
                    n += len(ids)
            vision.close()
            return n

        bare()  # warm-up
        results = {"bare": [], "stage": []}
        for _ in range(a.repeats):  # interleaved, so drift in machine load hits both alike
            for name, fn in (("bare", bare), ("stage", stage)):
                t0 = time.perf_counter()
                n = fn()
                results[name].append(n / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in results.items()}
    device = torch.cuda.get_device_name(fm.device) if fm.device.type == "cuda" else "cpu"
    print(f"device {device}, {a.precision}, governor {fm.model_id[:12]} ({a.source}), {n} images, "
          f"batch {a.batch_size}, {torch.get_num_threads()} threads")
    print(f"bare batched forward : {best['bare']:.1f} images/s")
    print(f"patch_saliency stage : {best['stage']:.1f} images/s")
    print(f"ratio stage/bare     : {best['stage'] / best['bare']:.3f}   (best of {a.repeats} interleaved runs each)")
    print(f"peak RSS             : {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
