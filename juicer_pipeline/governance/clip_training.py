"""Training student CLIPs on a recipe's training set at a fixed budget of vision tokens.

Every recipe sees the same number of patch tokens. Pruned recipes (kept or random patches) feed
the vision tower only ⌈ρN⌉ tokens per image, so the same budget buys more steps and more samples;
they end with a short full-patch tuning phase (counted in the budget) so that evaluating on full
images is not a train/test mismatch. Batch size is fixed, so tokens seen agree across recipes to
within one batch.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..models.kept_tokens import install_kept_tokens
from ..models.world_clip import ClipArch, build_clip
from .governor_training import normalise_batch
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
    budget_tokens: int = 64 * 128 * 300  # = 300 full-patch steps
    rho: float = 0.5
    full_tune_fraction: float = 0.1
    eval_points: int = 3  # learning curve: evaluations spread over the budget
    device: str = "cpu"
    threads: int = 2


@dataclass
class TrainData:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    tokens: torch.Tensor  # int [N, L]
    kept: torch.Tensor | None  # int16 [N, K] for saliency recipes
    patches: str  # 'all' | 'random' | 'saliency'


@dataclass
class Phase:
    name: str
    steps: int
    tokens_per_image: int


def plan(cfg: StudentConfig, patches: str, n_patches: int) -> list[Phase]:
    """Steps per phase so that tokens seen = budget (to within one batch) for any recipe."""
    per_full = cfg.batch_size * n_patches
    if patches == "all":
        return [Phase("full", max(1, round(cfg.budget_tokens / per_full)), n_patches)]
    k = kept_count(n_patches, cfg.rho)
    tune_steps = max(1, round(cfg.full_tune_fraction * cfg.budget_tokens / per_full))
    pruned_budget = cfg.budget_tokens - tune_steps * per_full
    return [Phase(f"{patches}_tokens", max(1, round(pruned_budget / (cfg.batch_size * k))), k),
            Phase("full_tune", tune_steps, n_patches)]


def _clip_loss(model, images, tokens):
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    labels = torch.arange(len(images), device=images.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def train_student(data: TrainData, cfg: StudentConfig, seed: int, evaluate=None, progress=None):
    """Train one student; return (model, record). `evaluate(model) -> dict` gives the learning curve."""
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model = build_clip(cfg.arch).to(device)
    kept_module = install_kept_tokens(model)
    n_patches = model.visual.grid_size[0] * model.visual.grid_size[1]
    phases = plan(cfg, data.patches, n_patches)
    total_steps = sum(p.steps for p in phases)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total_steps))))
    gen = torch.Generator().manual_seed(seed)
    n = len(data.images)
    if n < cfg.batch_size:
        raise ValueError(f"training set has {n} samples, fewer than one batch ({cfg.batch_size})")
    order, cursor = torch.randperm(n, generator=gen), 0
    eval_at = {round(total_steps * (i + 1) / cfg.eval_points) for i in range(cfg.eval_points)}
    curve, evals, phase_stats = [], [], []
    tokens_seen = samples_seen = step = 0
    model.train()
    for phase in phases:
        t_phase, eval_seconds = time.perf_counter(), 0.0
        for _ in range(phase.steps):
            if cursor + cfg.batch_size > n:  # epochs without replacement
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            kept_module.indices = _indices(data, idx, phase, n_patches, gen)
            images = normalise_batch(data.images[idx]).to(device)
            loss = _clip_loss(model, images, data.tokens[idx].long().to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tokens_seen += len(idx) * phase.tokens_per_image
            samples_seen += len(idx)
            curve.append(loss.item())
            if step in eval_at and evaluate is not None:
                t_eval = time.perf_counter()
                kept_module.indices = None
                evals.append({"step": step, "tokens_seen": tokens_seen, **evaluate(model)})
                model.train()
                eval_seconds += time.perf_counter() - t_eval
            if progress and step % 50 == 0:
                progress(f"step {step}/{total_steps} ({phase.name}) loss {np.mean(curve[-50:]):.3f}")
        train_seconds = time.perf_counter() - t_phase - eval_seconds  # evaluation is not training cost
        phase_stats.append({"phase": phase.name, "steps": phase.steps, "tokens_per_image": phase.tokens_per_image,
                            "seconds": train_seconds, "step_seconds": train_seconds / max(phase.steps, 1)})
    kept_module.indices = None
    model.eval()
    record = {"seed": seed, "config": {**asdict(cfg), "arch": cfg.arch.to_dict()}, "patches": data.patches,
              "tokens_seen": tokens_seen, "samples_seen": samples_seen, "steps": step,
              "wall_seconds": sum(p["seconds"] for p in phase_stats), "final_loss": float(np.mean(curve[-20:])),
              "phases": phase_stats, "loss_curve": [float(np.mean(curve[i:i + 10])) for i in range(0, len(curve), 10)],
              "learning_curve": evals, "train_samples": n}
    return model, record


def _indices(data: TrainData, idx: torch.Tensor, phase: Phase, n_patches: int, gen) -> torch.Tensor | None:
    if phase.tokens_per_image == n_patches:
        return None
    if data.patches == "saliency":
        return data.kept[idx].long()
    # FLIP: a fresh random subset per image and step, same K within the batch
    noise = torch.rand(len(idx), n_patches, generator=gen)
    return noise.argsort(dim=1)[:, :phase.tokens_per_image].sort(dim=1).values


@dataclass
class EvalSet:
    retrieval_images: torch.Tensor
    retrieval_tokens: torch.Tensor
    retrieval_keys: list
    class_images: torch.Tensor
    class_labels: np.ndarray
    class_names: list[str]
    class_attributes: tuple[str, ...]


@torch.inference_mode()
def evaluate_student(model, tokenizer, ev: EvalSet, device: str = "cpu") -> dict[str, float]:
    from .prompts import class_embeddings

    model.eval()
    dev = torch.device(device)

    def images(u8):
        return torch.cat([F.normalize(model.encode_image(normalise_batch(u8[i:i + 512]).to(dev)), dim=-1).cpu()
                          for i in range(0, len(u8), 512)])

    img = images(ev.retrieval_images)
    txt = torch.cat([F.normalize(model.encode_text(ev.retrieval_tokens[i:i + 512].long().to(dev)), dim=-1).cpu()
                     for i in range(0, len(ev.retrieval_tokens), 512)])
    scores = retrieval_recall(img, txt, keys=ev.retrieval_keys)
    encode = lambda t: F.normalize(model.encode_text(tokenizer(t).to(dev)), dim=-1).cpu()  # noqa: E731
    classes = class_embeddings(encode, ev.class_names, ev.class_attributes)
    scores.update(zero_shot_accuracy(images(ev.class_images), classes, ev.class_labels))
    return scores
