"""Step cost of kept-token training: full-patch step vs ρ=0.5 kept-token step, same model and batch.

    .venv/bin/python benchmarks/train_step.py [--rho 0.5] [--steps 20] [--device cpu]

Uses the CPU training preset's student (settings.training defaults) and prints mean seconds per
step of each, measured interleaved in one run, and their ratio (target ≤ 0.6 at ρ=0.5).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    from juicer_pipeline.assets.training import student_config
    from juicer_pipeline.governance.clip_training import _clip_loss
    from juicer_pipeline.governance.pruning import kept_count
    from juicer_pipeline.models.kept_tokens import install_kept_tokens
    from juicer_pipeline.models.world_clip import build_clip
    from juicer_pipeline.settings import JuicerSettings

    cfg = student_config(JuicerSettings())
    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = build_clip(cfg.arch).to(dev).train()
    kept = install_kept_tokens(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, n = cfg.batch_size, cfg.arch.grid ** 2
    k = kept_count(n, a.rho)
    images = torch.randn(b, 3, cfg.arch.image_size, cfg.arch.image_size, device=dev)
    tokens = torch.randint(1, 49000, (b, cfg.arch.context_length), device=dev)
    idx = torch.rand(b, n).argsort(1)[:, :k].sort(1).values.to(dev)

    def step(indices):
        kept.indices = indices
        loss = _clip_loss(model, images, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step(None), step(idx)  # warm-up
    times = {"full": [], "kept": []}
    for _ in range(a.steps):
        for name, indices in (("full", None), ("kept", idx)):
            t0 = time.perf_counter()
            step(indices)
            times[name].append(time.perf_counter() - t0)
    full, pruned = (sum(v) / len(v) for v in (times["full"], times["kept"]))
    print(f"student {cfg.arch.vision_width}w/{cfg.arch.vision_layers}L vision, batch {b}, {n} patches, "
          f"device {a.device}, {torch.get_num_threads()} threads, {a.steps} interleaved steps each")
    print(f"full-patch step      : {full:.4f} s")
    print(f"kept-token step (ρ={a.rho}, {k} tokens): {pruned:.4f} s")
    print(f"ratio kept/full      : {pruned / full:.3f}   (target ≤ 0.6)")


if __name__ == "__main__":
    main()
