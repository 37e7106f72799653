"""Pretraining the world governor: a small open_clip CLIP on the world's clean corpus.

The corpus comes from a distribution disjoint from the drops (other backgrounds, object sizes and
seeds). What makes the governor competent here, each measured when it was chosen:
- a convolutional stem before the patch grid (shape features, not only colour);
- text hard negatives: each image's caption with one shape (or one colour) swapped, added as extra
  negatives for the image→text loss, so colour alone cannot solve the batch;
- single-object images mixed into the corpus and caption variants that name shapes without
  colours, so prompts like "a photo of a star." are in distribution;
- warmup + cosine learning rate, AdamW, horizontal flips.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from ..models.loader import OPENAI_MEAN, OPENAI_STD
from ..models.world_clip import ClipArch, build_clip
from ..world.captions import join_phrases, object_phrases, plural
from ..world.generate import (SPLIT_CORPUS, SPLIT_CORPUS_SINGLE, corpus_spec, eval_spec, iter_clean_samples)
from ..world.vocabulary import Vocabulary, load_vocabulary
from .images import to_uint8_chw
from .metrics import retrieval_recall, zero_shot_accuracy
from .prompts import class_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GovernorTrainConfig:
    arch: ClipArch = field(default_factory=ClipArch)
    seed: int = 0
    corpus_multi: int = 48000
    corpus_single: int = 16000
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 200
    eval_every: int = 500
    eval_samples: int = 2000
    threads: int = 2
    shape_only_caption_rate: float = 0.2


@dataclass
class CorpusTensors:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    positives: torch.Tensor  # int32 [N, V, L] caption variants
    shape_negatives: torch.Tensor  # int32 [N, L]
    colour_negatives: torch.Tensor  # int32 [N, L]


def _caption(objects, rng, shape_only: bool) -> str:
    if shape_only:
        shapes = [o.shape for o in objects]
        phrases = [("an " if s[0] in "aeiou" else "a ") + s if shapes.count(s) == 1 else f"two {plural(s)}"
                   for s in dict.fromkeys(shapes)]
    else:
        phrases = object_phrases(objects)
    text = join_phrases(phrases)
    template = ("{}.", "a photo of {}.", "an image showing {}.", "a picture of {}.")[int(rng.integers(4))]
    return template.format(text)


def _swap(objects, rng, vocab: Vocabulary, what: str):
    """The same objects with one object's shape (or colour) changed: a hard negative caption."""
    objs = list(objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if what == "shape":
        choices = [s for s in vocab.shapes if s != o.shape]
        objs[i] = type(o)(**{**o.__dict__, "shape": choices[int(rng.integers(len(choices)))]})
    else:
        choices = [c for c in vocab.colour_names if c != o.colour]
        objs[i] = type(o)(**{**o.__dict__, "colour": choices[int(rng.integers(len(choices)))]})
    return objs


def build_corpus(cfg: GovernorTrainConfig, vocab: Vocabulary, variants: int = 3) -> CorpusTensors:
    tok = SimpleTokenizer(context_length=cfg.arch.context_length)
    rng = np.random.default_rng([cfg.seed, 99])
    images, pos, neg_s, neg_c = [], [], [], []
    sources = [(SPLIT_CORPUS, corpus_spec(cfg.arch.image_size), cfg.corpus_multi),
               (SPLIT_CORPUS_SINGLE, corpus_spec(cfg.arch.image_size, single_object=True), cfg.corpus_single)]
    t0 = time.perf_counter()
    for split, spec, n in sources:
        for scene, rendered, _ in iter_clean_samples(split, spec, n, cfg.seed, vocab):
            images.append(to_uint8_chw(rendered.image))
            objs = scene.objects
            pos.append([_caption(objs, rng, rng.random() < cfg.shape_only_caption_rate) for _ in range(variants)])
            neg_s.append(_caption(_swap(objs, rng, vocab, "shape"), rng, False))
            neg_c.append(_caption(_swap(objs, rng, vocab, "colour"), rng, False))
    log.info("corpus: %d images rendered in %.0fs; tokenising captions", len(images), time.perf_counter() - t0)
    flat = [c for v in pos for c in v]
    positives = tok(flat).to(torch.int32).view(len(pos), variants, -1)
    return CorpusTensors(torch.stack(images), positives, tok(neg_s).to(torch.int32), tok(neg_c).to(torch.int32))


def normalise_batch(images_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


@dataclass
class HeldOut:
    retrieval_images: torch.Tensor
    retrieval_captions: list[str]
    retrieval_keys: list
    class_images: torch.Tensor
    class_labels: np.ndarray


def build_held_out(cfg: GovernorTrainConfig, vocab: Vocabulary, seed: int = 0) -> HeldOut:
    """The world's clean held-out sets, rendered in memory (identical pixels to `juicer world evalsets`)."""
    ims, caps, keys = [], [], []
    split, spec = eval_spec("retrieval", cfg.arch.image_size)
    for scene, rendered, caption in iter_clean_samples(split, spec, cfg.eval_samples, seed, vocab):
        ims.append(to_uint8_chw(rendered.image))
        caps.append(caption)
        keys.append(tuple(sorted((o.colour, o.shape) for o in scene.objects)))
    cims, labels = [], []
    split, spec = eval_spec("classification", cfg.arch.image_size)
    for scene, rendered, _ in iter_clean_samples(split, spec, cfg.eval_samples, seed, vocab):
        cims.append(to_uint8_chw(rendered.image))
        labels.append(vocab.shapes.index(scene.objects[0].shape))
    return HeldOut(torch.stack(ims), caps, keys, torch.stack(cims), np.array(labels))


@torch.inference_mode()
def encode_images(model, images_u8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    out = [F.normalize(model.encode_image(normalise_batch(images_u8[i:i + batch_size])), dim=-1)
           for i in range(0, len(images_u8), batch_size)]
    return torch.cat(out)


@torch.inference_mode()
def evaluate_clip(model, tokenizer, held: HeldOut, vocab: Vocabulary) -> dict[str, float]:
    was_training = model.training
    model.eval()
    img = encode_images(model, held.retrieval_images)
    txt = torch.cat([F.normalize(model.encode_text(tokenizer(held.retrieval_captions[i:i + 512])), dim=-1)
                     for i in range(0, len(held.retrieval_captions), 512)])
    scores = {f"semantic_{k}": v for k, v in retrieval_recall(img, txt, keys=held.retrieval_keys).items()}
    scores.update({f"instance_{k}": v for k, v in retrieval_recall(img, txt).items()})
    encode = lambda texts: F.normalize(model.encode_text(tokenizer(texts)), dim=-1)  # noqa: E731
    classes = class_embeddings(encode, list(vocab.shapes), vocab.colour_names)
    scores.update({f"zeroshot_{k}": v for k, v in
                   zero_shot_accuracy(encode_images(model, held.class_images), classes, held.class_labels).items()})
    model.train(was_training)
    return scores


def clip_loss(model, images: torch.Tensor, texts: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Symmetric ITC loss; the hard-negative captions join the image→text softmax only.

    Negatives are encoded without gradient: they push images away from wrong shapes and colours
    (the point of them) at a third of the cost of back-propagating through them as well.
    """
    img = F.normalize(model.encode_image(images), dim=-1)
    with torch.no_grad():
        neg = F.normalize(model.encode_text(negatives), dim=-1)
    txt = torch.cat([F.normalize(model.encode_text(texts), dim=-1), neg])
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T  # [B, B + negatives]
    labels = torch.arange(len(images))
    b = len(images)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :b].T, labels))


def train_governor(cfg: GovernorTrainConfig, progress=None, checkpoint=None) -> tuple[torch.nn.Module, dict]:
    """Train and evaluate; return the model and a record (config, curve, scores, wall time)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    vocab = load_vocabulary()
    t0 = time.perf_counter()
    corpus = build_corpus(cfg, vocab)
    held = build_held_out(cfg, vocab)
    tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
    model = build_clip(cfg.arch)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(corpus.images)
    curve, evals = [], []
    t_train = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        images = corpus.images[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        images[flip] = images[flip].flip(-1)
        variant = torch.randint(0, corpus.positives.shape[1], (len(idx),), generator=gen)
        texts = corpus.positives[idx, variant].long()
        negatives = torch.cat([corpus.shape_negatives[idx], corpus.colour_negatives[idx]]).long()
        loss = clip_loss(model, normalise_batch(images), texts, negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            scores = evaluate_clip(model, tokenizer, held, vocab)
            evals.append({"step": step + 1, **scores})
            msg = (f"step {step + 1}/{cfg.steps} loss {np.mean(curve[-50:]):.3f} "
                   f"R@1 semantic i2t {scores['semantic_i2t_r@1']:.3f} t2i {scores['semantic_t2i_r@1']:.3f} "
                   f"zero-shot top1 {scores['zeroshot_top1']:.3f} ({time.perf_counter() - t_train:.0f}s)")
            log.info(msg)
            if progress:
                progress(msg)
            if checkpoint:  # a long run that is cut off keeps its latest state
                checkpoint(model, _record(cfg, curve, evals, t0, t_train, n))
    model.eval()
    return model, _record(cfg, curve, evals, t0, t_train, n)


def _record(cfg, curve, evals, t0, t_train, n) -> dict:
    return {
        "config": {**asdict(cfg), "arch": cfg.arch.to_dict()},
        "loss_curve": [round(float(np.mean(curve[i:i + 25])), 4) for i in range(0, len(curve), 25)],
        "evals": evals,
        "scores": evals[-1] if evals else {},
        "train_seconds": round(time.perf_counter() - t_train, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "corpus_images": n,
        "steps_done": len(curve),
    }
