"""Step cost of kept-token training: full-patch step vs ρ=0.5 kept-token step, same model and batch,
and where a step's time goes.

    .venv/bin/python benchmarks/train_step.py [--rho 0.5] [--steps 20] [--student world-s] [--device cpu]
    # several students compared in one run
    .venv/bin/python benchmarks/train_step.py --student world-s benchmarks/student_configs/world-s-v6-text1-stem4.json --precision bf16
    # the GPU preset at ViT-B/16 scale
    python benchmarks/train_step.py --student vit-b-16 --device cuda --precision bf16 --batch-size 256

Uses the training step itself (`clip_loss`, the students' `Optimizers`, uint8 batches normalised
per step as in training) on the configured students, measured interleaved in one run: median seconds
per step of each and their ratio (target ≤ 0.55 at ρ=0.5), then a profile of each step's parts
(data normalisation, vision tower, text tower, loss, optimizer) measured the same way, and the
FLOPs of both steps (matmuls and convolutions, counted by `torch.utils.flop_counter`). The FLOP
ratio is what the time ratio would be if every FLOP cost the same: what pruning cannot shrink (the
stem on whole images, the text tower) is a share of the arithmetic, not a kernel's inefficiency
that tuning could remove; the stem's batch norms and GELUs, which the count leaves out, add to
that fixed side.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from juicer_pipeline.training.config import student_config
from juicer_pipeline.training.loss import _CLIP_LOSS, clip_loss
from juicer_pipeline.training.trainer import Optimizers
from juicer_pipeline.governance.images import normalise_batch
from juicer_pipeline.training.runtime import attention_kernels, autocast
from juicer_pipeline.governance.pruning import kept_count
from juicer_pipeline.models.kept_tokens import install_kept_tokens
from juicer_pipeline.models.world_clip import build_clip
from juicer_pipeline.settings import JuicerSettings, TrainingSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--student", nargs="+", default=None,
                    help="one or more student configs, timed interleaved in one run (default: the settings')")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the settings' batch size")
    a = ap.parse_args()

    dev = torch.device(a.device)
    students = a.student or [TrainingSettings().student]
    runs = [_StepRun(student, a, dev) for student in students]
    first = runs[0]
    b, n = first.cfg.batch_size, first.cfg.arch.grid ** 2
    k = kept_count(n, a.rho)
    images_u8 = torch.randint(0, 256, (b, 3, first.cfg.arch.image_size, first.cfg.arch.image_size), dtype=torch.uint8)
    idx = torch.rand(b, n).argsort(1)[:, :k].sort(1).values.to(dev)
    for run in runs[1:]:
        if (run.cfg.arch.image_size, run.cfg.arch.grid) != (first.cfg.arch.image_size, first.cfg.arch.grid):
            raise SystemExit("students compared in one run need the same image size and patch grid")

    with attention_kernels(dev, a.precision):  # as training runs: on CPU, the math kernel for bf16
        for run in runs:
            for _ in range(3):
                run.step(images_u8, None), run.step(images_u8, idx)  # warm-up
        for _ in range(a.steps):  # interleaved, so that a drift in the machine's speed hits every student alike
            for run in runs:
                for name, indices in (("full", None), ("kept", idx)):
                    run.times[name].append(run.step(images_u8, indices))
        print(f"batch {b}, {n} patches, device {_device_name(dev)}, {a.precision}, {torch.get_num_threads()} threads, "
              f"{a.steps} interleaved steps each (median)")
        for run in runs:
            full, pruned = (statistics.median(run.times[x]) for x in ("full", "kept"))
            arch = run.cfg.arch
            print(f"student {run.student} ({arch.vision_width}w/{arch.vision_layers}L vision, {arch.stem} stem, "
                  f"{arch.text_layers}L text)")
            print(f"  full-patch step      : {full:.4f} s")
            print(f"  kept-token step (ρ={a.rho}, {k} tokens): {pruned:.4f} s")
            print(f"  ratio kept/full      : {pruned / full:.3f}   (target ≤ 0.55)")
        for run in runs:
            profile = {"full": {}, "kept": {}}
            for _ in range(a.steps):
                for name, indices in (("full", None), ("kept", idx)):
                    run.step(images_u8, indices, profile[name])
            print(f"{run.student}: where a step's time goes (s per step; backward covers both towers):")
            for part in profile["full"]:
                f, p = profile["full"][part] / a.steps, profile["kept"][part] / a.steps
                print(f"  {part:15s} full {f:.4f}   kept {p:.4f}")
        for run in runs:
            print_flops(run, images_u8, idx)


def print_flops(run: "_StepRun", images_u8, idx) -> None:
    """Matmul and convolution FLOPs of a whole step (forward and backward) and of each part's forward."""
    full, kept = (run.flops(images_u8, indices) for indices in (None, idx))
    print(f"{run.student}: GFLOPs per step (matmuls and convolutions), full / kept:")
    print(f"  whole step (fwd+bwd) {full['step'] / 1e9:7.2f} / {kept['step'] / 1e9:7.2f}   "
          f"ratio {kept['step'] / full['step']:.3f}   (the time ratio if every FLOP cost the same)")
    for part in ("stem fwd", "vision fwd", "text fwd"):
        print(f"  {part:20s} {full[part] / 1e9:7.2f} / {kept[part] / 1e9:7.2f}")


class _StepRun:
    """One student's model, optimizers and step times."""

    def __init__(self, student: str, a, dev):
        overrides = {k: v for k, v in (("student", student), ("batch_size", a.batch_size)) if v is not None}
        self.student = student
        self.cfg = student_config(JuicerSettings(training=TrainingSettings(**overrides)))
        self.dev, self.precision = dev, a.precision
        torch.manual_seed(0)
        torch.set_num_threads(self.cfg.threads)
        self.model = build_clip(self.cfg.arch).to(dev).train()
        self.kept = install_kept_tokens(self.model)
        self.opts = Optimizers(self.model, self.cfg)
        self.tokens = torch.randint(1, 49000, (self.cfg.batch_size, self.cfg.arch.context_length), device=dev)
        self.times = {"full": [], "kept": []}

    def flops(self, images_u8, indices) -> dict[str, int]:
        """FLOPs of one training step and of the stem's, vision tower's and text tower's forward.
        Attention runs on the math kernel here, whose matmuls the counter sees."""
        self.kept.indices = indices
        images = normalise_batch(images_u8.to(self.dev))
        parts = {"step": lambda: self.step(images_u8, indices), "stem fwd": lambda: self.model.visual.conv1(images),
                 "vision fwd": lambda: self.model.encode_image(images),
                 "text fwd": lambda: self.model.encode_text(self.tokens)}
        counted = {}
        for name, run in parts.items():
            with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
                with torch.no_grad() if name != "step" else contextlib.nullcontext():
                    run()
            counted[name] = counter.get_total_flops()
        return counted

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def step(self, images_u8, indices, parts=None) -> float:
        marks = [time.perf_counter()]

        def mark():
            self.sync()
            marks.append(time.perf_counter())

        model, tokens = self.model, self.tokens
        self.kept.indices = indices
        images = normalise_batch(images_u8.to(self.dev))
        mark()
        with autocast(self.dev, self.precision):
            if parts is None:
                loss = clip_loss(model, images, tokens)
            else:  # the same computation, split so that each part is timed
                img = F.normalize(model.encode_image(images), dim=-1)
                mark()
                txt = F.normalize(model.encode_text(tokens), dim=-1)
                mark()
                loss = _CLIP_LOSS(img, txt, model.logit_scale.exp().clamp(max=100))
                mark()
        self.opts.zero_grad()
        loss.backward()
        mark()
        self.opts.step()
        mark()
        if parts is not None:
            names = ["data", "vision fwd", "text fwd", "loss", "backward (all)", "optimizer"]
            for name, t0, t1 in zip(names, marks, marks[1:]):
                parts[name] = parts.get(name, 0.0) + t1 - t0
        return marks[-1] - marks[0]


def _device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
