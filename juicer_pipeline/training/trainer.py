"""Training student CLIPs on a recipe's training set at a fixed budget (see `config.py`).

Tokens are counted where they enter the vision transformer (`KeptTokens`), never from the plan.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..governance.images import normalise_batch
from ..governance.pruning import kept_count
from ..models.kept_tokens import install_kept_tokens
from ..models.world_clip import build_clip
from .config import Phase, StudentConfig, plan, with_native_precision
from .loss import clip_loss
from .runtime import attention_kernels, autocast, torch_threads
from .schedule import student_schedule, tune_schedule


@dataclass
class TrainData:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    tokens: torch.Tensor  # int [N, L]
    kept: torch.Tensor | None  # int16 [N, K] for saliency recipes
    patches: str  # 'all' | 'random' | 'saliency'
    # Vocabulary-swap hard negatives (hard_negatives.py), one per caption: int [N, L], and which
    # rows have one (a caption naming no class has none). None: in-batch negatives only.
    negatives: torch.Tensor | None = None
    has_negative: torch.Tensor | None = None  # bool [N]


class TrainClock:
    """Seconds of training so far: evaluation is paused out, so it is never training cost."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def pause(self):
        return _Paused(self)


class _Paused:
    def __init__(self, clock: TrainClock):
        self.clock = clock

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.clock.paused += time.perf_counter() - self.t0


class Optimizers:
    """AdamW for the model, and lazy (sparse) Adam for the text token embedding.

    The token table is most of a small student's parameters (49,408 rows), yet a batch of captions
    touches a few hundred rows. A dense gradient and a dense AdamW update over all of it cost a
    pruned step much of what pruning saved in the vision tower; a sparse gradient and SparseAdam
    update only the rows the batch used (no weight decay on them)."""

    def __init__(self, model, cfg: StudentConfig):
        emb = model.token_embedding
        emb.sparse = True
        rest = [p for p in model.parameters() if p is not emb.weight]
        # fused: one kernel over all tensors instead of a Python loop of small ops per tensor
        # (a world-s AdamW step 1.69 → 0.39 ms on 2 CPU cores); it matters because the step is short.
        self.all = [torch.optim.AdamW(rest, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98), fused=True),
                    torch.optim.SparseAdam([emb.weight], lr=cfg.lr, betas=(0.9, 0.98))]

    def zero_grad(self):
        for o in self.all:
            o.zero_grad(set_to_none=True)

    def step(self):
        for o in self.all:
            o.step()


def check_kept(data: TrainData, n_patches: int, rho: float) -> None:
    """Stored kept sets must have exactly the K this run's ρ and patch grid expect."""
    if data.patches != "saliency":
        return
    want = kept_count(n_patches, rho)
    if data.kept is None or data.kept.shape[1] != want:
        got = None if data.kept is None else data.kept.shape[1]
        raise ValueError(f"stored kept sets have K={got} patches per image, but ρ={rho} of the student's "
                         f"{n_patches} patches expects K={want}: ρ or the patch grid changed since pruned_images "
                         f"was materialised; re-materialise pruned_images for every drop")
    if int(data.kept.max()) >= n_patches or int(data.kept.min()) < 0:
        raise ValueError(f"stored kept indices reach {int(data.kept.max())}, outside the student's {n_patches} patches")


def train_student(data: TrainData, cfg: StudentConfig, seed: int, evaluate=None, progress=None, on_step=None):
    """Train one student; return (model, record). `evaluate(model) -> dict` gives the learning curve;
    `on_step(step, loss)` sees every step's loss."""
    return train(data, with_native_precision(cfg, progress), seed, evaluate, progress, on_step, replicas=None)


def train(data: TrainData, cfg: StudentConfig, seed: int, evaluate, progress, on_step, replicas):
    """The training loop. `replicas` (distributed.py) is None in one process; in a data-parallel
    run every process draws the same global batches, patch sets and schedule from the same seed,
    trains on its share of each batch, and `replicas` does the exchanges."""
    if replicas is not None and data.negatives is not None:
        raise ValueError("hard negatives are not supported in data-parallel training (processes > 1)")
    device = torch.device(cfg.device) if replicas is None else replicas.device
    with torch_threads(cfg.threads), attention_kernels(device, cfg.precision):
        run = _Run(data, cfg, seed, replicas, device)
        for phase in run.phases:
            run.train_phase(phase, evaluate, progress, on_step)
        if evaluate is not None and run.eval_marks:  # a wall-clock run can end between marks
            run.evaluation(evaluate)
        run.kept_module.indices = None
        run.model.eval()
        return run.model, run.record()


class _Run:
    """One run's state: the model, its optimizers and schedules, the batch order and the records."""

    def __init__(self, data: TrainData, cfg: StudentConfig, seed: int, replicas, device):
        torch.manual_seed(seed)
        self.data, self.cfg, self.seed, self.replicas, self.device = data, cfg, seed, replicas, device
        self.model = build_clip(cfg.arch).to(device)
        self.kept_module = install_kept_tokens(self.model)
        self.n_patches = self.model.visual.grid_size[0] * self.model.visual.grid_size[1]
        check_kept(data, self.n_patches, cfg.rho)
        self.phases = plan(cfg, data.patches, self.n_patches)
        self.total_steps = sum(p.steps for p in self.phases)
        self.clock = TrainClock() if replicas is None else replicas.clock()
        self.opts = Optimizers(self.model, cfg)
        self.scheds = [student_schedule(o, cfg, self.total_steps, self.clock) for o in self.opts.all]
        self.gen = torch.Generator().manual_seed(seed)
        self.n = len(data.images)
        if self.n < cfg.batch_size:
            raise ValueError(f"training set has {self.n} samples, fewer than one batch ({cfg.batch_size})")
        self.step_model = self.model if replicas is None else replicas.wrap(self.model, cfg.batch_size)
        self.order, self.cursor = torch.randperm(self.n, generator=self.gen), 0
        self.eval_marks = [(i + 1) / cfg.eval_points for i in range(cfg.eval_points)]  # shares of the budget
        self.curve, self.evals, self.phase_stats = [], [], []
        self.samples_seen = self.step = 0

    def tokens_fed(self) -> int:  # over all processes
        fed = self.kept_module.tokens_fed
        return fed if self.replicas is None else self.replicas.sum(fed)

    def evaluation(self, evaluate) -> None:
        self.kept_module.indices = None
        point = {"step": self.step, "tokens_seen": self.tokens_fed(), "train_seconds": round(self.clock.elapsed(), 2)}
        if self.replicas is None or self.replicas.rank == 0:
            point.update(evaluate(self.model))
        if self.replicas is not None:
            self.replicas.barrier()  # the others wait while the first evaluates
        self.evals.append(point)

    def train_phase(self, phase: Phase, evaluate, progress, on_step) -> None:
        cfg, clock = self.cfg, self.clock
        t_phase, steps = clock.elapsed(), 0
        if phase.name == "full_tune" and cfg.tune_lr_scale > 0:
            self.scheds = [tune_schedule(o, cfg, phase, clock, t_phase) for o in self.opts.all]
        self.model.train()
        while _phase_left(phase, steps, clock.elapsed() - t_phase):
            loss = self.train_step(phase)
            steps += 1
            if on_step is not None:
                on_step(self.step, loss)
            done = self.step / self.total_steps if cfg.wallclock_s is None else clock.elapsed() / cfg.wallclock_s
            if evaluate is not None and self.eval_marks and done >= self.eval_marks[0] - 1e-9:
                self.eval_marks = [m for m in self.eval_marks if m > done + 1e-9]
                with clock.pause():
                    self.evaluation(evaluate)
                    self.model.train()
            if progress and self.step % 50 == 0:
                progress(f"step {self.step}{'' if not self.total_steps else f'/{self.total_steps}'} ({phase.name}) "
                         f"loss {np.mean(self.curve[-50:]):.3f}")
        seconds = clock.elapsed() - t_phase
        self.phase_stats.append({"phase": phase.name, "steps": steps, "tokens_per_image": phase.tokens_per_image,
                                 "seconds": seconds, "step_seconds": seconds / max(steps, 1)})

    def next_batch(self) -> torch.Tensor:
        if self.cursor + self.cfg.batch_size > self.n:  # epochs without replacement
            self.order, self.cursor = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.cursor:self.cursor + self.cfg.batch_size]
        self.cursor += self.cfg.batch_size
        return idx

    def train_step(self, phase: Phase) -> float:
        """One optimizer step on the next global batch; returns its loss."""
        data, replicas, device = self.data, self.replicas, self.device
        idx = self.next_batch()
        kept = _indices(data, idx, phase, self.n_patches, self.gen)
        if replicas is not None:  # this process's share of the global batch and of its patch sets
            idx, kept = replicas.share(idx), None if kept is None else replicas.share(kept)
        self.kept_module.indices = kept
        images = normalise_batch(data.images[idx].to(device))
        tokens = data.tokens[idx].long().to(device)
        with autocast(device, self.cfg.precision):
            if replicas is None:
                loss = clip_loss(self.model, images, tokens, _negatives(data, idx, device))
            else:
                loss = replicas.loss(self.step_model, images, tokens)
        self.opts.zero_grad()
        loss.backward()
        if replicas is not None:
            replicas.average_sparse_grad(self.model.token_embedding.weight, tokens)
        self.opts.step()
        for sched in self.scheds:
            sched.step()
        self.step += 1
        self.samples_seen += self.cfg.batch_size
        self.curve.append(loss.item())
        return self.curve[-1]

    def record(self) -> dict:
        cfg, curve = self.cfg, self.curve
        record = {"seed": self.seed, "config": {**asdict(cfg), "arch": cfg.arch.to_dict()},
                  "patches": self.data.patches, "budget": cfg.budget, "tokens_seen": self.tokens_fed(),
                  "samples_seen": self.samples_seen, "steps": self.step,
                  "wall_seconds": sum(p["seconds"] for p in self.phase_stats),
                  "final_loss": float(np.mean(curve[-20:])), "phases": self.phase_stats,
                  "loss_curve": [float(np.mean(curve[i:i + 10])) for i in range(0, len(curve), 10)],
                  "learning_curve": self.evals, "train_samples": self.n}
        if self.replicas is not None:
            record.update(processes=self.replicas.world,
                          tokens_fed_per_process=self.replicas.gather(self.kept_module.tokens_fed))
        return record


def _negatives(data: TrainData, idx: torch.Tensor, device) -> torch.Tensor | None:
    if data.negatives is None:
        return None
    rows = idx[data.has_negative[idx]]
    return data.negatives[rows].long().to(device)


def _phase_left(phase: Phase, steps: int, seconds: float) -> bool:
    if phase.steps:
        return steps < phase.steps
    return steps == 0 or seconds < phase.seconds  # a wall-clock phase always takes at least one step


def _indices(data: TrainData, idx: torch.Tensor, phase: Phase, n_patches: int, gen) -> torch.Tensor | None:
    if phase.tokens_per_image == n_patches + 1:
        return None
    if data.patches == "saliency":
        return data.kept[idx].long()
    # FLIP: a fresh random subset per image and step, same K within the batch
    noise = torch.rand(len(idx), n_patches, generator=gen)
    return noise.argsort(dim=1)[:, :phase.tokens_per_image - 1].sort(dim=1).values
