"""Step cost of kept-token training: full-patch step vs ρ=0.5 kept-token step, same model and batch,
and where a step's time goes.

    .venv/bin/python benchmarks/train_step.py [--rho 0.5] [--steps 20] [--student world-s] [--device cpu]
    # the GPU preset at ViT-B/16 scale
    python benchmarks/train_step.py --student vit-b-16 --device cuda --precision bf16 --batch-size 256

Uses the training step itself (`clip_loss`, the students' `Optimizers`, uint8 batches normalised
per step as in training) on the configured student, measured interleaved in one run: mean seconds
per step of each and their ratio (target ≤ 0.55 at ρ=0.5), then a profile of each step's parts
(data normalisation, vision tower, text tower, loss, optimizer) measured the same way.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--student", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the settings' batch size")
    a = ap.parse_args()

    import torch.nn.functional as F

    from juicer_pipeline.governance.clip_training import student_config
    from juicer_pipeline.governance.clip_training import _CLIP_LOSS, Optimizers, clip_loss
    from juicer_pipeline.governance.images import attention_kernels, autocast, normalise_batch
    from juicer_pipeline.governance.pruning import kept_count
    from juicer_pipeline.models.kept_tokens import install_kept_tokens
    from juicer_pipeline.models.world_clip import build_clip
    from juicer_pipeline.settings import JuicerSettings, TrainingSettings

    overrides = {k: v for k, v in (("student", a.student), ("batch_size", a.batch_size)) if v is not None}
    training = TrainingSettings(**overrides)
    cfg = student_config(JuicerSettings(training=training))
    torch.manual_seed(0)
    torch.set_num_threads(cfg.threads)
    dev = torch.device(a.device)
    model = build_clip(cfg.arch).to(dev).train()
    kept = install_kept_tokens(model)
    opts = Optimizers(model, cfg)
    b, n = cfg.batch_size, cfg.arch.grid ** 2
    k = kept_count(n, a.rho)
    images_u8 = torch.randint(0, 256, (b, 3, cfg.arch.image_size, cfg.arch.image_size), dtype=torch.uint8)
    tokens = torch.randint(1, 49000, (b, cfg.arch.context_length), device=dev)
    idx = torch.rand(b, n).argsort(1)[:, :k].sort(1).values.to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(indices, parts=None):
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())

        kept.indices = indices
        images = normalise_batch(images_u8.to(dev))
        mark()
        with autocast(dev, a.precision):
            if parts is None:
                loss = clip_loss(model, images, tokens)
            else:  # the same computation, split so that each part is timed
                img = F.normalize(model.encode_image(images), dim=-1)
                mark()
                txt = F.normalize(model.encode_text(tokens), dim=-1)
                mark()
                loss = _CLIP_LOSS(img, txt, model.logit_scale.exp().clamp(max=100))
                mark()
        opts.zero_grad()
        loss.backward()
        mark()
        opts.step()
        mark()
        if parts is not None:
            names = ["data", "vision fwd", "text fwd", "loss", "backward (all)", "optimizer"]
            for name, t0, t1 in zip(names, marks, marks[1:]):
                parts[name] = parts.get(name, 0.0) + t1 - t0
        return marks[-1] - marks[0]

    with attention_kernels(dev, a.precision):  # as training runs: on CPU, the math kernel for bf16
        for _ in range(3):
            step(None), step(idx)  # warm-up
        times = {"full": [], "kept": []}
        for _ in range(a.steps):
            for name, indices in (("full", None), ("kept", idx)):
                times[name].append(step(indices))
        full, pruned = (sum(v) / len(v) for v in (times["full"], times["kept"]))
        print(f"student {training.student} ({cfg.arch.vision_width}w/{cfg.arch.vision_layers}L vision, "
              f"{cfg.arch.stem} stem), batch {b}, {n} patches, device {_device_name(dev)}, {a.precision}, "
              f"{torch.get_num_threads()} threads, "
              f"{a.steps} interleaved steps each")
        print(f"full-patch step      : {full:.4f} s")
        print(f"kept-token step (ρ={a.rho}, {k} tokens): {pruned:.4f} s")
        print(f"ratio kept/full      : {pruned / full:.3f}   (target ≤ 0.55)")
        profile = {"full": {}, "kept": {}}
        for _ in range(a.steps):
            for name, indices in (("full", None), ("kept", idx)):
                step(indices, profile[name])
        print("where a step's time goes (s per step; backward covers both towers):")
        for part in profile["full"]:
            f, p = profile["full"][part] / a.steps, profile["kept"][part] / a.steps
            print(f"  {part:15s} full {f:.4f}   kept {p:.4f}")


def _device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
