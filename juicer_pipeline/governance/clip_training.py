"""Training student CLIPs on a recipe's training set at a fixed budget.

Two budgets, one per fair comparison:
- **vision tokens** (`budget_tokens`): every recipe feeds the vision tower the same number of
  tokens, CLS included. Pruned recipes (kept or random patches) feed only ⌈ρN⌉ patches per image,
  so the same budget buys more steps and more samples; they end with a short full-patch tuning
  phase (counted in the budget) so that evaluating on full images is not a train/test mismatch.
- **wall-clock** (`wallclock_s`): every recipe trains for the same measured seconds (evaluation
  excluded), whatever a step costs; the learning-rate schedule follows elapsed time.

Tokens are counted where they enter the vision transformer (`KeptTokens`), never from the plan.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from ..models.kept_tokens import install_kept_tokens
from ..models.students import load_student_arch
from ..models.world_clip import ClipArch, build_clip
from .images import attention_kernels, autocast, normalise_batch, torch_threads
from .metrics import retrieval_recall, zero_shot_accuracy
from .pruning import kept_count

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
class TrainData:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    tokens: torch.Tensor  # int [N, L]
    kept: torch.Tensor | None  # int16 [N, K] for saliency recipes
    patches: str  # 'all' | 'random' | 'saliency'
    # Vocabulary-swap hard negatives (hard_negatives.py), one per caption: int [N, L], and which
    # rows have one (a caption naming no class has none). None: in-batch negatives only.
    negatives: torch.Tensor | None = None
    has_negative: torch.Tensor | None = None  # bool [N]


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


_CLIP_LOSS = ClipLoss()


def clip_loss(model, images, tokens, negatives=None):
    """Symmetric InfoNCE (open_clip's ClipLoss) with the logit scale capped at 100, as CLIP does.

    `negatives` (hard-negative captions, any number): they join the image→text softmax as extra
    texts no image matches (as NegCLIP adds them); text→image is unchanged."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    if negatives is None or len(negatives) == 0:
        return _CLIP_LOSS(img, txt, scale)
    neg = F.normalize(model.encode_text(negatives), dim=-1)
    labels = torch.arange(len(img), device=img.device)
    image_to_text = scale * img @ torch.cat([txt, neg]).T
    text_to_image = scale * txt @ img.T
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


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


def _cosine(done: float) -> float:
    """Cosine decay from 1 to 0 as `done` (a share of a schedule's steps or seconds) goes 0 → 1."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def _scheduler(opt, cfg: StudentConfig, total_steps: int, clock: TrainClock):
    if cfg.wallclock_s is not None:  # cosine over elapsed training time, after a warm-up in steps
        def factor(step: int) -> float:
            warm = min(1.0, step / max(1, cfg.warmup_steps))
            decay = 1.0 if cfg.schedule == "constant" else _cosine(clock.elapsed() / cfg.wallclock_s)
            return warm * decay
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    return get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, total_steps)


def _tune_scheduler(opt, cfg: StudentConfig, phase: Phase, clock: TrainClock, t_phase: float):
    """The full-patch tuning phase's own schedule: `tune_lr_scale` × lr after a warm-up of a tenth
    of the phase, then cosine to zero over its steps (or, under a wall-clock budget, its seconds)."""
    warmup = max(1, phase.steps // 10) if phase.steps else max(1, cfg.warmup_steps // 5)
    for group in opt.param_groups:  # the factor scales the configured rate, not where the decay left it
        group["initial_lr"] = cfg.lr

    def factor(step: int) -> float:
        done = step / phase.steps if phase.steps else (clock.elapsed() - t_phase) / max(phase.seconds, 1e-9)
        return cfg.tune_lr_scale * min(1.0, (step + 1) / warmup) * _cosine(done)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
    return _train(data, with_native_precision(cfg, progress), seed, evaluate, progress, on_step, replicas=None)


def _train(data: TrainData, cfg: StudentConfig, seed: int, evaluate, progress, on_step, replicas):
    device = torch.device(cfg.device) if replicas is None else replicas.device
    with torch_threads(cfg.threads), attention_kernels(device, cfg.precision):
        return _train_loop(data, cfg, seed, evaluate, progress, on_step, replicas, device)


def _train_loop(data: TrainData, cfg: StudentConfig, seed: int, evaluate, progress, on_step, replicas, device):
    """The training loop. `replicas` (governance/distributed_training.py) is None in one process; in
    a data-parallel run every process draws the same global batches, patch sets and schedule from
    the same seed, trains on its share of each batch, and `replicas` does the exchanges."""
    if replicas is not None and data.negatives is not None:
        raise ValueError("hard negatives are not supported in data-parallel training (processes > 1)")
    torch.manual_seed(seed)
    model = build_clip(cfg.arch).to(device)
    kept_module = install_kept_tokens(model)
    n_patches = model.visual.grid_size[0] * model.visual.grid_size[1]
    check_kept(data, n_patches, cfg.rho)
    phases = plan(cfg, data.patches, n_patches)
    total_steps = sum(p.steps for p in phases)
    clock = TrainClock() if replicas is None else replicas.clock()
    opts = Optimizers(model, cfg)
    scheds = [_scheduler(o, cfg, total_steps, clock) for o in opts.all]
    gen = torch.Generator().manual_seed(seed)
    n = len(data.images)
    if n < cfg.batch_size:
        raise ValueError(f"training set has {n} samples, fewer than one batch ({cfg.batch_size})")
    step_model = model if replicas is None else replicas.wrap(model, cfg.batch_size)
    order, cursor = torch.randperm(n, generator=gen), 0
    eval_marks = [(i + 1) / cfg.eval_points for i in range(cfg.eval_points)]  # shares of the budget
    curve, evals, phase_stats = [], [], []
    samples_seen = step = 0

    def tokens_fed() -> int:  # over all processes
        return kept_module.tokens_fed if replicas is None else replicas.sum(kept_module.tokens_fed)

    def evaluation():
        kept_module.indices = None
        point = {"step": step, "tokens_seen": tokens_fed(), "train_seconds": round(clock.elapsed(), 2)}
        if replicas is None or replicas.rank == 0:
            point.update(evaluate(model))
        if replicas is not None:
            replicas.barrier()  # the others wait while the first evaluates
        evals.append(point)

    model.train()
    for phase in phases:
        t_phase, steps = clock.elapsed(), 0
        if phase.name == "full_tune" and cfg.tune_lr_scale > 0:
            scheds = [_tune_scheduler(o, cfg, phase, clock, t_phase) for o in opts.all]
        while _phase_left(phase, steps, clock.elapsed() - t_phase):
            if cursor + cfg.batch_size > n:  # epochs without replacement
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            kept = _indices(data, idx, phase, n_patches, gen)
            if replicas is not None:  # this process's share of the global batch and of its patch sets
                idx, kept = replicas.share(idx), None if kept is None else replicas.share(kept)
            kept_module.indices = kept
            images = normalise_batch(data.images[idx].to(device))
            tokens = data.tokens[idx].long().to(device)
            negatives = _negatives(data, idx, device)
            with autocast(device, cfg.precision):
                if replicas is None:
                    loss = clip_loss(model, images, tokens, negatives)
                else:
                    loss = replicas.loss(step_model, images, tokens)
            opts.zero_grad()
            loss.backward()
            if replicas is not None:
                replicas.average_sparse_grad(model.token_embedding.weight, tokens)
            opts.step()
            for sched in scheds:
                sched.step()
            step, steps = step + 1, steps + 1
            samples_seen += cfg.batch_size
            curve.append(loss.item())
            if on_step is not None:
                on_step(step, curve[-1])
            done = step / total_steps if cfg.wallclock_s is None else clock.elapsed() / cfg.wallclock_s
            if evaluate is not None and eval_marks and done >= eval_marks[0] - 1e-9:
                eval_marks = [m for m in eval_marks if m > done + 1e-9]
                with clock.pause():
                    evaluation()
                    model.train()
            if progress and step % 50 == 0:
                progress(f"step {step}{'' if not total_steps else f'/{total_steps}'} ({phase.name}) "
                         f"loss {np.mean(curve[-50:]):.3f}")
        seconds = clock.elapsed() - t_phase
        phase_stats.append({"phase": phase.name, "steps": steps, "tokens_per_image": phase.tokens_per_image,
                            "seconds": seconds, "step_seconds": seconds / max(steps, 1)})
    if evaluate is not None and eval_marks:  # a wall-clock run can end between marks
        evaluation()
    kept_module.indices = None
    model.eval()
    record = {"seed": seed, "config": {**asdict(cfg), "arch": cfg.arch.to_dict()}, "patches": data.patches,
              "budget": cfg.budget, "tokens_seen": tokens_fed(), "samples_seen": samples_seen,
              "steps": step, "wall_seconds": sum(p["seconds"] for p in phase_stats),
              "final_loss": float(np.mean(curve[-20:])), "phases": phase_stats,
              "loss_curve": [float(np.mean(curve[i:i + 10])) for i in range(0, len(curve), 10)],
              "learning_curve": evals, "train_samples": n}
    if replicas is not None:
        record.update(processes=replicas.world, tokens_fed_per_process=replicas.gather(kept_module.tokens_fed))
    return model, record


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


@dataclass
class EvalSet:
    retrieval_images: torch.Tensor
    retrieval_tokens: torch.Tensor
    retrieval_keys: list
    class_images: torch.Tensor
    class_labels: np.ndarray
    class_names: list[str]
    class_attributes: tuple[str, ...]
    class_templates: tuple[str, ...] | None = None  # zero-shot prompt templates (None: the built-in ones)
    # Optional, for salient-token inference: the governor-salient ⌈ρN⌉ patches of every image
    retrieval_kept: torch.Tensor | None = None
    class_kept: torch.Tensor | None = None


def zero_shot_classifier(model, tokenizer, ev: EvalSet, device="cpu") -> torch.Tensor:
    """[classes, dim] prompt-ensembled class embeddings of `ev`'s classes (open_clip's builder), on the CPU."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from .prompts import TEMPLATES, zero_shot_templates

    templates = zero_shot_templates(ev.class_attributes, ev.class_templates or TEMPLATES)
    return build_zero_shot_classifier(model, tokenizer, ev.class_names, templates, num_classes_per_batch=None,
                                      device=torch.device(device)).T.cpu()


@torch.inference_mode()
def evaluate_student(model, tokenizer, ev: EvalSet, device: str = "cpu", salient_only: bool = False) -> dict[str, float]:
    """Held-out retrieval and zero-shot scores. With `salient_only`, the vision tower sees only the
    governor-salient patches of each evaluation image (faster inference); `images_per_second`
    reports the image tower's throughput either way."""
    from ..models.kept_tokens import KeptTokens

    model.eval()
    dev = torch.device(device)
    if salient_only and (ev.retrieval_kept is None or ev.class_kept is None):
        raise ValueError("salient-only evaluation needs the evaluation images' kept patches")
    kept_module = model.visual.patch_dropout
    if not isinstance(kept_module, KeptTokens):
        kept_module = install_kept_tokens(model)
    seconds = [0.0, 0]

    def images(u8, kept):
        out = []
        for i in range(0, len(u8), 512):
            kept_module.indices = kept[i:i + 512] if salient_only else None
            t0 = time.perf_counter()
            out.append(F.normalize(model.encode_image(normalise_batch(u8[i:i + 512].to(dev))), dim=-1).cpu())
            seconds[0] += time.perf_counter() - t0
            seconds[1] += len(u8[i:i + 512])
        kept_module.indices = None
        return torch.cat(out)

    img = images(ev.retrieval_images, ev.retrieval_kept)
    txt = torch.cat([F.normalize(model.encode_text(ev.retrieval_tokens[i:i + 512].long().to(dev)), dim=-1).cpu()
                     for i in range(0, len(ev.retrieval_tokens), 512)])
    scores = retrieval_recall(img, txt, keys=ev.retrieval_keys)
    classes = zero_shot_classifier(model, tokenizer, ev, dev)
    scores.update(zero_shot_accuracy(images(ev.class_images, ev.class_kept), classes, ev.class_labels))
    scores["images_per_second"] = seconds[1] / max(seconds[0], 1e-9)
    return scores
