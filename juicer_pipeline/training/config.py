"""What one student run is: its architecture, budget, schedule, precision and phases.

Two budgets, one per fair comparison:
- **vision tokens** (`budget_tokens`): every recipe feeds the vision tower the same number of
  tokens, CLS included. Pruned recipes (kept or random patches) feed only ⌈ρN⌉ patches per image,
  so the same budget buys more steps and more samples; they end with a short full-patch tuning
  phase (counted in the budget) so that evaluating on full images is not a train/test mismatch.
- **wall-clock** (`wallclock_s`): every recipe trains for the same measured seconds (evaluation
  excluded), whatever a step costs; the learning-rate schedule follows elapsed time.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from ..governance.pruning import kept_count
from ..models.students import load_student_arch
from ..models.world_clip import ClipArch, build_clip
from .loss import clip_loss
from .runtime import attention_kernels, autocast, torch_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentConfig:
    arch: ClipArch = field(default_factory=lambda: ClipArch(vision_width=96, vision_layers=3, vision_heads=3,
                                                            text_width=96, text_layers=2, text_heads=3,
                                                            embed_dim=96, conv_stem=False))
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up
    budget_tokens: int = 65 * 128 * 300  # vision tokens incl. CLS: 300 full-patch steps of 64 patches
    wallclock_s: float | None = None  # set: train for this many measured seconds instead of a token budget
    rho: float = 0.5
    full_tune_fraction: float = 0.1
    # Peak learning rate of the full-patch tuning phase, as a share of `lr`: the phase restarts a
    # short warm-up and its own cosine decay. 0: it continues the run's schedule, whose tail is
    # near zero, so the tuning phase barely adapts the model to full images (a student trained on
    # salient patches then scored 10 % zero-shot on full images; with 0.5, 25 %).
    tune_lr_scale: float = 0.5
    eval_points: int = 3  # learning curve: evaluations spread over the budget
    device: str = "cpu"
    # bf16: the training step runs under torch.autocast; native: whichever of the two runs this
    # student's step faster on this machine, timed when training starts (`with_native_precision`)
    precision: Literal["fp32", "bf16", "native"] = "fp32"
    threads: int = 2

    @property
    def budget(self) -> str:
        return "tokens" if self.wallclock_s is None else "wallclock"


@dataclass
class Phase:
    name: str
    steps: int  # planned steps (token budget); 0 under a wall-clock budget
    tokens_per_image: int  # CLS + patches fed
    seconds: float = 0.0  # planned training seconds (wall-clock budget)


def plan(cfg: StudentConfig, patches: str, n_patches: int) -> list[Phase]:
    """The phases of one run. Token budget: steps such that tokens fed (CLS included) = budget to
    within one batch, for any recipe. Wall-clock budget: the seconds of each phase."""
    full = n_patches + 1
    per_full = cfg.batch_size * full
    if patches == "all":
        if cfg.wallclock_s is not None:
            return [Phase("full", 0, full, cfg.wallclock_s)]
        return [Phase("full", max(1, round(cfg.budget_tokens / per_full)), full)]
    k = kept_count(n_patches, cfg.rho) + 1
    if cfg.wallclock_s is not None:
        tune = cfg.full_tune_fraction * cfg.wallclock_s
        return [Phase(f"{patches}_tokens", 0, k, cfg.wallclock_s - tune), Phase("full_tune", 0, full, tune)]
    tune_steps = max(1, round(cfg.full_tune_fraction * cfg.budget_tokens / per_full))
    pruned_budget = cfg.budget_tokens - tune_steps * per_full
    return [Phase(f"{patches}_tokens", max(1, round(pruned_budget / (cfg.batch_size * k))), k),
            Phase("full_tune", tune_steps, full)]


def student_config(settings, wallclock: bool = False) -> StudentConfig:
    """The student run that `JuicerSettings` describe: the token budget, or with `wallclock` the
    equal wall-clock budget (`training.wallclock_s`)."""
    t = settings.training
    arch = load_student_arch(t.student)
    return StudentConfig(arch=arch, batch_size=t.batch_size, lr=t.lr, warmup_steps=t.warmup_steps,
                         schedule=t.schedule, rho=settings.saliency.rho,
                         budget_tokens=t.budget_full_steps * t.batch_size * (arch.grid ** 2 + 1),
                         wallclock_s=t.wallclock_s if wallclock else None,
                         full_tune_fraction=t.full_tune_fraction, tune_lr_scale=t.tune_lr_scale,
                         eval_points=t.eval_points, device=t.device,
                         precision=t.precision, threads=t.threads)


def with_native_precision(cfg: StudentConfig, progress=None) -> StudentConfig:
    """`cfg` with `precision = "native"` resolved to "fp32" or "bf16"; other precisions as they are.

    On CPU, whichever runs a full-patch training step of the student faster here, timed once per
    process. A CPU's flags do not tell: two machines that both report AVX-512 BF16 ran the CPU
    preset's step 1.5× faster in bf16 (an AMD EPYC) and 1.5× slower (an Intel Xeon). On a GPU,
    bf16 where the GPU supports it."""
    if cfg.precision != "native":
        return cfg
    if torch.device(cfg.device).type != "cpu":
        return replace(cfg, precision="bf16" if torch.cuda.is_bf16_supported() else "fp32")
    seconds = dict(_cpu_step_seconds(cfg.arch, cfg.batch_size, cfg.threads))
    choice = min(seconds, key=seconds.get)
    (progress or log.info)(f"precision native: a training step takes fp32 {seconds['fp32']:.3f} s, bf16 "
                           f"{seconds['bf16']:.3f} s on this CPU; training runs in {choice}")
    return replace(cfg, precision=choice)


@functools.lru_cache(maxsize=None)
def _cpu_step_seconds(arch: ClipArch, batch_size: int, threads: int, steps: int = 4) -> tuple:
    """Median seconds of a full-patch forward and backward of a fresh student (no optimizer) in fp32
    and in bf16, each after a warm-up step, on random inputs. The caller's random state is left as
    it was (building a student draws from it)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, arch.image_size, arch.image_size, generator=gen)
    tokens = torch.randint(1, 49000, (batch_size, arch.context_length), generator=gen)
    seconds = []
    for precision in ("fp32", "bf16"):
        with torch.random.fork_rng(devices=[]):
            model = build_clip(arch).train()
        times = []
        with torch_threads(threads), attention_kernels(torch.device("cpu"), precision):
            for _ in range(steps + 1):
                t = time.perf_counter()
                with autocast(torch.device("cpu"), precision):
                    loss = clip_loss(model, images, tokens)
                loss.backward()
                times.append(time.perf_counter() - t)
        seconds.append((precision, float(np.median(times[1:]))))
    return tuple(seconds)
