"""The one learning-rate schedule: a linear warm-up, then cosine decay (or a constant rate), over
steps or over measured seconds. Students and the governor both train on it."""
from __future__ import annotations

import math
from typing import Callable

import torch


def cosine(done: float) -> float:
    """Cosine decay from 1 to 0 as `done` (a share of a schedule's steps or seconds) goes 0 → 1."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, done))))


def warmup_cosine(opt: torch.optim.Optimizer, warmup_steps: int, done: Callable[[int], float], decay: bool = True,
                  peak: float = 1.0, ramp_includes_step: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    """`peak` × a linear ramp over `warmup_steps` × cosine decay of `done(step)`, the share of the
    schedule done (by steps or by seconds). `decay=False` holds the rate after the warm-up.
    `ramp_includes_step`: the ramp counts the step being taken, so the first step already learns
    (a short phase cannot spend its first step at a zero rate)."""
    offset = 1 if ramp_includes_step else 0

    def factor(step: int) -> float:
        ramp = 1.0 if step + offset >= warmup_steps else (step + offset) / warmup_steps
        return peak * ramp * (cosine(done(step)) if decay else 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def student_schedule(opt, cfg, total_steps: int, clock) -> torch.optim.lr_scheduler.LambdaLR:
    """A student run's schedule (`cfg`: a StudentConfig). Token budget: cosine over the steps after
    the warm-up (as transformers' `get_cosine_schedule_with_warmup`). Wall-clock budget: cosine over
    the elapsed training seconds of `clock`, after a warm-up in steps."""
    if cfg.wallclock_s is not None:
        return warmup_cosine(opt, cfg.warmup_steps, lambda step: clock.elapsed() / cfg.wallclock_s,
                             decay=cfg.schedule != "constant")
    after_warmup = max(1, total_steps - cfg.warmup_steps)
    return warmup_cosine(opt, cfg.warmup_steps, lambda step: (step - cfg.warmup_steps) / after_warmup,
                         decay=cfg.schedule != "constant")


def tune_schedule(opt, cfg, phase, clock, t_phase: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The full-patch tuning phase's own schedule: `tune_lr_scale` × lr after a warm-up of a tenth
    of the phase, then cosine to zero over its steps (or, under a wall-clock budget, its seconds)."""
    warmup = max(1, phase.steps // 10) if phase.steps else max(1, cfg.warmup_steps // 5)
    for group in opt.param_groups:  # the factor scales the configured rate, not where the decay left it
        group["initial_lr"] = cfg.lr

    def done(step: int) -> float:
        return step / phase.steps if phase.steps else (clock.elapsed() - t_phase) / max(phase.seconds, 1e-9)
    return warmup_cosine(opt, warmup, done, peak=cfg.tune_lr_scale, ramp_includes_step=True)
