"""Pretraining the world governor: a small open_clip CLIP on the world's clean corpus.

World-specific (it renders the world's corpus), so it lives beside the world and calls into the
method (`governance/`), never the other way round.

The corpus comes from a distribution disjoint from the drops (other backgrounds, object sizes and
seeds). What makes the governor competent here, each measured when it was chosen:
- a convolutional stem before the patch grid (shape features, not only colour);
- text hard negatives: each image's caption with one shape (or one colour) swapped, added as extra
  negatives for the image→text loss, so colour alone cannot solve the batch;
- single-object images mixed into the corpus and caption variants that name shapes without
  colours, so prompts like "a photo of a star." are in distribution;
- warmup + cosine learning rate, AdamW, horizontal flips;
- object crops: square, aspect-preserving crops around each object of drop-like corpus scenes
  (the drops' object sizes, the corpus's backgrounds), captioned with that one object, plus
  crops of bare background captioned as the `background` class. Class extraction classifies
  exactly such crops, so the governor learns to name a shape from a crop and to abstain on
  clutter. Measured on the corpus validation split (never on the drops or the students'
  held-out sets): the model card records it;
- on whole drop-like scenes, two terms from the render's own masks: an objectness term pulls the
  CLS attention rollout (what pruning keeps by) onto the object patches, and a dense word-patch
  term keeps each patch's MaskCLIP reading on the class that fills it. The first alone left the
  value path pointing at no shape; together both hold (the model card's last two columns).

The governor is chosen on a validation split of its own corpus (`corpus_validation`); the world's
held-out sets, which score the students, are only reported.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from ..governance.classes import square_crop
from ..governance.images import normalise_batch, to_uint8_chw
from ..training.dense_evaluation import PURE_PATCH_SHARE, patch_class_shares, pointing_score
from ..training.dense_features import value_path_embeddings
from ..training.loss import MAX_LOGIT_SCALE, clip_loss, dense_word_patch_loss, objectness_loss
from ..training.runtime import torch_threads
from ..training.schedule import warmup_cosine
from ..governance.metrics import retrieval_recall, zero_shot_accuracy
from ..governance.pruning import kept_count
from ..governance.saliency import AttentionCapture, rollout, smooth
from ..governance.prompts import BACKGROUND_CLASS, TEMPLATES, class_embeddings, with_article
from ..models.world_clip import ClipArch, build_clip
from .captions import join_phrases, object_phrases, plural
from .generate import (SPLIT_CORPUS, SPLIT_CORPUS_CROPS, SPLIT_CORPUS_SINGLE, SPLIT_CORPUS_VALIDATION,
                       VALIDATION_JPEG_QUALITY, corpus_spec, drop_like_corpus_spec, eval_spec,
                       iter_clean_samples, jpeg_roundtrip)
from .scenes import OBJECT_PATCH_COVER, patch_coverage, pixel_classes  # the truth metrics' cover
from .vocabulary import Vocabulary, load_vocabulary

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
    crop_scenes: int = 0  # drop-like scenes whose object crops join the corpus (0: none)
    background_crop_rate: float = 0.25  # background crops per crop scene
    crop_margin: tuple[float, float] = (0.1, 0.5)  # margin around the object, share of its longer side
    init: str | None = None  # warm start from these weights (a world CLIP safetensors file)
    jpeg_rate: float = 0.0  # share of corpus images and crop scenes re-encoded as JPEG
    jpeg_quality: tuple[int, int] = (60, 95)
    validation_samples: int = 1000
    # Weight of the objectness term: the CLS attention rollout (the pipeline's saliency) is pulled
    # towards the patches the corpus scene's objects cover. 0: contrastive loss only.
    saliency_weight: float = 0.0
    whole_crop_scenes: bool = False  # the drop-like crop scenes also join the corpus whole
    # how the crop scenes size objects: 0 shares the coverage among a scene's objects (as drops did
    # when stage 2 was trained), 2 sizes them as today's drops do (`DropConfig.coverage_shared_by`)
    crop_coverage_shared_by: int = 0
    # Weight of the dense word-patch term: each whole scene's patches, read the MaskCLIP way (the
    # last block's value path), are pulled onto the class text of what fills them (a shape or the
    # background prompt). 0: off. It keeps patch embeddings in the text's space while the
    # objectness term reshapes attention (without it, the value path lost every shape).
    dense_weight: float = 0.0


@dataclass
class CorpusTensors:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    positives: torch.Tensor  # int32 [N, V, L] caption variants
    shape_negatives: torch.Tensor  # int32 [N, L]
    colour_negatives: torch.Tensor  # int32 [N, L]
    object_patches: torch.Tensor | None = None  # bool [N, grid patches]: patches an object covers
    has_scene: torch.Tensor | None = None  # bool [N]: a whole scene (its object_patches are known)
    patch_classes: torch.Tensor | None = None  # int8 [N, grid patches]: `scene_patch_classes`, -1 for crops


def scene_patch_shares(scene, rendered, vocab: Vocabulary, patch_size: int) -> np.ndarray:
    """float [grid patches, 1 + shapes]: each class's share of each patch (0 the background)."""
    s = rendered.mask.shape[0]
    grid = (s // patch_size, s // patch_size)
    return patch_class_shares(pixel_classes(scene, rendered, vocab.shapes)[None], grid, 1 + len(vocab.shapes))[0]


def scene_patch_classes(scene, rendered, vocab: Vocabulary, patch_size: int) -> np.ndarray:
    """int8 [grid patches]: the class filling a patch (as the dense evaluation's probes take it), -1
    where none fills `PURE_PATCH_SHARE` of it (an object's edge, two objects)."""
    shares = scene_patch_shares(scene, rendered, vocab, patch_size)
    return np.where(shares.max(-1) >= PURE_PATCH_SHARE, shares.argmax(-1), -1).astype(np.int8)


def scene_object_patches(rendered, patch_size: int) -> np.ndarray:
    s = rendered.mask.shape[0]
    return patch_coverage(rendered.mask, (s // patch_size, s // patch_size)) >= OBJECT_PATCH_COVER


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


def _add_texts(objs, rng, vocab: Vocabulary, cfg: GovernorTrainConfig, variants: int, pos, neg_s, neg_c) -> None:
    """Caption variants and shape-/colour-swap negatives of one image's objects (rng order fixed)."""
    pos.append([_caption(objs, rng, rng.random() < cfg.shape_only_caption_rate) for _ in range(variants)])
    neg_s.append(_caption(_swap(objs, rng, vocab, "shape"), rng, False))
    neg_c.append(_caption(_swap(objs, rng, vocab, "colour"), rng, False))


def build_corpus(cfg: GovernorTrainConfig, vocab: Vocabulary, variants: int = 3) -> CorpusTensors:
    tok = SimpleTokenizer(context_length=cfg.arch.context_length)
    rng = np.random.default_rng([cfg.seed, 99])
    images, pos, neg_s, neg_c, patches, classes = [], [], [], [], [], []
    sources = [(SPLIT_CORPUS, corpus_spec(cfg.arch.image_size), cfg.corpus_multi),
               (SPLIT_CORPUS_SINGLE, corpus_spec(cfg.arch.image_size, single_object=True), cfg.corpus_single)]
    t0 = time.perf_counter()
    for split, spec, n in sources:
        for scene, rendered, _ in iter_clean_samples(split, spec, n, cfg.seed, vocab):
            images.append(to_uint8_chw(maybe_jpeg(rendered.image, cfg, rng)))
            patches.append(scene_object_patches(rendered, cfg.arch.patch_size))
            classes.append(scene_patch_classes(scene, rendered, vocab, cfg.arch.patch_size))
            _add_texts(scene.objects, rng, vocab, cfg, variants, pos, neg_s, neg_c)
    crops, wholes = object_crops(cfg, vocab, rng)
    for image, objs, object_patches, object_classes in wholes:
        images.append(to_uint8_chw(image))
        patches.append(object_patches)
        classes.append(object_classes)
        _add_texts(objs, rng, vocab, cfg, variants, pos, neg_s, neg_c)
    n_scenes = len(images)
    for image, objs in crops:
        images.append(to_uint8_chw(image, cfg.arch.image_size))
        if objs is None:  # bare background: the abstain class; its "negatives" name an object
            pos.append([_background_caption(rng) for _ in range(variants)])
            o = _random_object(rng, vocab)
            neg_s.append(_caption([o], rng, False))
            neg_c.append(_caption([o], rng, True))
        else:
            _add_texts(objs, rng, vocab, cfg, variants, pos, neg_s, neg_c)
    log.info("corpus: %d images (%d crops) rendered in %.0fs; tokenising captions", len(images), len(crops),
             time.perf_counter() - t0)
    flat = [c for v in pos for c in v]
    positives = tok(flat).to(torch.int32).view(len(pos), variants, -1)
    object_patches = torch.zeros(len(images), len(patches[0]), dtype=torch.bool)
    object_patches[:n_scenes] = torch.from_numpy(np.stack(patches))
    has_scene = torch.arange(len(images)) < n_scenes
    labels = torch.full(object_patches.shape, -1, dtype=torch.int8)
    labels[:n_scenes] = torch.from_numpy(np.stack(classes))
    return CorpusTensors(torch.stack(images), positives, tok(neg_s).to(torch.int32), tok(neg_c).to(torch.int32),
                         object_patches, has_scene, labels)


CROP_COVERAGES = (0.15, 0.25, 0.35)  # object coverage of the scenes crops are cut from: drops span this


def object_crops(cfg: GovernorTrainConfig, vocab: Vocabulary, rng: np.random.Generator):
    """(crop, [object]) for every object of `cfg.crop_scenes` drop-like corpus scenes, and
    (crop, None) for crops of bare background, cut as class extraction cuts them (square, with a
    random margin and a small off-centre shift); with `cfg.whole_crop_scenes`, also the scenes
    themselves as (image, objects, object patches, patch classes)."""
    out, wholes = [], []
    for c, coverage in enumerate(CROP_COVERAGES):
        spec = drop_like_corpus_spec(cfg.arch.image_size, coverage, cfg.crop_coverage_shared_by)
        n = cfg.crop_scenes // len(CROP_COVERAGES)
        for scene, rendered, _ in iter_clean_samples(SPLIT_CORPUS_CROPS, spec, n, cfg.seed * 10 + c, vocab):
            image = maybe_jpeg(rendered.image, cfg, rng)  # the whole scene, then the crop: as drops are cut
            if cfg.whole_crop_scenes:
                wholes.append((image, scene.objects, scene_object_patches(rendered, cfg.arch.patch_size),
                               scene_patch_classes(scene, rendered, vocab, cfg.arch.patch_size)))
            for obj, box in zip(scene.objects, rendered.boxes):
                if rng.random() < 0.5:  # as class extraction cuts them: a box on the patch grid
                    box = patch_aligned(box, cfg.arch.patch_size, rng)
                    margin = rng.uniform(0.05, 0.4)
                else:
                    margin = rng.uniform(*cfg.crop_margin)
                shift = tuple(rng.uniform(-0.1, 0.1, 2))
                out.append((square_crop(image, box, margin, shift), [obj]))
            if rng.random() < cfg.background_crop_rate:
                bg = background_crop(rendered, rng, image)
                if bg is not None:
                    out.append((bg, None))
    return out, wholes


def patch_aligned(box, patch: int, rng: np.random.Generator):
    """The object's box widened to the patch grid, sometimes by one more patch on a side: the boxes
    of salient regions look like this, and a governor trained only on tight boxes names shapes in
    them far less reliably (measured: recall 0.09 at margin 0 vs 0.57 at margin 0.3)."""
    x0, y0, x1, y1 = (np.floor(box[0] / patch), np.floor(box[1] / patch), np.ceil(box[2] / patch), np.ceil(box[3] / patch))
    grow = rng.random(4) < 0.2
    return tuple(float(v * patch) for v in (x0 - grow[0], y0 - grow[1], x1 + grow[2], y1 + grow[3]))


def background_crop(rendered, rng: np.random.Generator, image=None, tries: int = 20):
    """A square of the image that touches no object (None when the scene leaves no room)."""
    image = rendered.image if image is None else image
    s = image.width
    for _ in range(tries):
        side = int(rng.integers(12, max(13, s // 2)))
        x, y = (int(v) for v in rng.integers(0, s - side + 1, 2))
        if not rendered.mask[y:y + side, x:x + side].any():
            return image.crop((x, y, x + side, y + side))
    return None


def maybe_jpeg(image, cfg: GovernorTrainConfig, rng: np.random.Generator):
    """A JPEG round trip at a random quality for `cfg.jpeg_rate` of the images: web data is JPEG, and
    without it the governor names shapes from JPEG crops far worse (measured 0.89 → 0.66 top-1)."""
    if cfg.jpeg_rate and rng.random() < cfg.jpeg_rate:
        return jpeg_roundtrip(image, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return image


def _background_caption(rng) -> str:
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(with_article(BACKGROUND_CLASS))


def _random_object(rng, vocab: Vocabulary):
    from .scenes import SceneObject

    return SceneObject(shape=str(rng.choice(vocab.shapes)), colour=str(rng.choice(vocab.colour_names)),
                       cx=0.0, cy=0.0, size=1.0, rotation=0.0)


@dataclass
class HeldOut:
    retrieval_images: torch.Tensor
    retrieval_captions: list[str]
    retrieval_keys: list
    class_images: torch.Tensor
    class_labels: np.ndarray
    crop_images: torch.Tensor | None = None  # object crops (drop-like), labelled by shape
    crop_labels: np.ndarray | None = None
    background_crops: torch.Tensor | None = None
    object_patches: np.ndarray | None = None  # bool [retrieval images, patches]: for saliency recall
    patch_shares: np.ndarray | None = None  # float [retrieval images, patches, 1 + shapes]: for pointing


def build_held_out(cfg: GovernorTrainConfig, vocab: Vocabulary, seed: int = 0) -> HeldOut:
    """The world's clean held-out sets, rendered in memory (identical pixels to `juicer world evalsets`)."""
    ims, caps, keys, patches, shares = [], [], [], [], []
    split, spec = eval_spec("retrieval", cfg.arch.image_size)
    for scene, rendered, caption in iter_clean_samples(split, spec, cfg.eval_samples, seed, vocab):
        ims.append(to_uint8_chw(rendered.image))
        patches.append(scene_object_patches(rendered, cfg.arch.patch_size))
        shares.append(scene_patch_shares(scene, rendered, vocab, cfg.arch.patch_size))
        caps.append(caption)
        keys.append(tuple(sorted((o.colour, o.shape) for o in scene.objects)))
    cims, labels = [], []
    split, spec = eval_spec("classification", cfg.arch.image_size)
    for scene, rendered, _ in iter_clean_samples(split, spec, cfg.eval_samples, seed, vocab):
        cims.append(to_uint8_chw(rendered.image))
        labels.append(vocab.shapes.index(scene.objects[0].shape))
    return HeldOut(torch.stack(ims), caps, keys, torch.stack(cims), np.array(labels), object_patches=np.stack(patches),
                   patch_shares=np.stack(shares))


def build_corpus_validation(cfg: GovernorTrainConfig, vocab: Vocabulary, seed: int = 1) -> HeldOut:
    """The split the governor is chosen on: its own corpus generator, validation seeds (τ calibration
    uses seed 0 of the same split, this seed 1), drop-like JPEG scenes for retrieval and object
    crops, single corpus objects for zero-shot."""
    n = cfg.validation_samples
    ims, caps, keys, crops, labels, backgrounds, patches, shares = [], [], [], [], [], [], [], []
    rng = np.random.default_rng([seed, 7])
    spec = drop_like_corpus_spec(cfg.arch.image_size)
    for scene, rendered, caption in iter_clean_samples(SPLIT_CORPUS_VALIDATION, spec, n, seed, vocab):
        image = jpeg_roundtrip(rendered.image, VALIDATION_JPEG_QUALITY)
        ims.append(to_uint8_chw(image))
        patches.append(scene_object_patches(rendered, cfg.arch.patch_size))
        shares.append(scene_patch_shares(scene, rendered, vocab, cfg.arch.patch_size))
        caps.append(caption)
        keys.append(tuple(sorted((o.colour, o.shape) for o in scene.objects)))
        for obj, box in zip(scene.objects, rendered.boxes):
            crops.append(to_uint8_chw(square_crop(image, box, 0.25), cfg.arch.image_size))
            labels.append(vocab.shapes.index(obj.shape))
        bg = background_crop(rendered, rng, image)
        if bg is not None:
            backgrounds.append(to_uint8_chw(bg, cfg.arch.image_size))
    cims, clabels = [], []
    single = corpus_spec(cfg.arch.image_size, single_object=True)
    for scene, rendered, _ in iter_clean_samples(SPLIT_CORPUS_VALIDATION, single, n, seed + 1000, vocab):
        cims.append(to_uint8_chw(rendered.image))
        clabels.append(vocab.shapes.index(scene.objects[0].shape))
    return HeldOut(torch.stack(ims), caps, keys, torch.stack(cims), np.array(clabels), torch.stack(crops),
                   np.array(labels), torch.stack(backgrounds), np.stack(patches), np.stack(shares))


@torch.inference_mode()
def encode_images(model, images_u8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    out = [F.normalize(model.encode_image(normalise_batch(images_u8[i:i + batch_size])), dim=-1)
           for i in range(0, len(images_u8), batch_size)]
    return torch.cat(out)


@torch.inference_mode()
def saliency_recall(model, capture: AttentionCapture, images_u8: torch.Tensor, object_patches: np.ndarray,
                    rho: float = 0.5, batch_size: int = 512) -> float:
    """Object-patch recall of the smoothed CLS rollout's top ⌈ρN⌉ patches (what pruning keeps), as
    the truth metrics count it on drops; `capture` hooks `model`'s vision tower."""
    grid = tuple(model.visual.grid_size)
    k = kept_count(object_patches.shape[1], rho)
    kept = 0
    for i in range(0, len(images_u8), batch_size):
        model.encode_image(normalise_batch(images_u8[i:i + batch_size]))
        scores = smooth(rollout([w.float() for w in capture.weights]), grid)
        top = scores.topk(k, dim=-1).indices.numpy()
        kept += int(np.take_along_axis(object_patches[i:i + batch_size], top, axis=1).sum())
    return kept / max(int(object_patches.sum()), 1)


def maskclip_pointing(model, images_u8: torch.Tensor, patch_shares: np.ndarray, shape_embeddings: torch.Tensor,
                      batch_size: int = 512) -> float:
    """The dense evaluation's pointing score (`pointing_score`) of the MaskCLIP value path on these
    scenes: is the patch most like each present shape's embedding on that shape."""
    caught = []
    handle = model.visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: caught.append(args[0]))
    try:
        values = []
        for i in range(0, len(images_u8), batch_size):
            caught.clear()
            model.encode_image(normalise_batch(images_u8[i:i + batch_size]))
            values.append(value_path_embeddings(model.visual, caught[0]).float())
    finally:
        handle.remove()
    return pointing_score(torch.cat(values), shape_embeddings, patch_shares)


@torch.inference_mode()
def evaluate_clip(model, tokenizer, held: HeldOut, vocab: Vocabulary,
                  capture: AttentionCapture | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    scores_saliency = {}
    if held.object_patches is not None:
        # the training loop's capture when it has one; else a temporary one, so that training without
        # the objectness term keeps the fused attention kernel (and its numerics)
        own = capture is None
        capture = AttentionCapture(model) if own else capture
        try:
            scores_saliency["saliency_recall@0.5"] = saliency_recall(model, capture, held.retrieval_images,
                                                                     held.object_patches)
        finally:
            if own:
                capture.close()
    img = encode_images(model, held.retrieval_images)
    txt = torch.cat([F.normalize(model.encode_text(tokenizer(held.retrieval_captions[i:i + 512])), dim=-1)
                     for i in range(0, len(held.retrieval_captions), 512)])
    scores = {f"semantic_{k}": v for k, v in retrieval_recall(img, txt, keys=held.retrieval_keys).items()}
    scores.update({f"instance_{k}": v for k, v in retrieval_recall(img, txt).items()})
    encode = lambda texts: F.normalize(model.encode_text(tokenizer(texts)), dim=-1)  # noqa: E731
    classes = class_embeddings(encode, list(vocab.shapes), vocab.colour_names)
    scores.update({f"zeroshot_{k}": v for k, v in
                   zero_shot_accuracy(encode_images(model, held.class_images), classes, held.class_labels).items()})
    if held.patch_shares is not None:
        scores["maskclip_pointing"] = maskclip_pointing(model, held.retrieval_images, held.patch_shares, classes)
    if held.crop_images is not None:
        scores.update(_crop_scores(model, held, classes, F.normalize(encode([with_article(BACKGROUND_CLASS)]), dim=-1)))
    scores.update(scores_saliency)
    model.train(was_training)
    return scores


def _crop_scores(model, held: HeldOut, classes: torch.Tensor, background: torch.Tensor) -> dict[str, float]:
    """Shape accuracy on object crops (shapes only), and how often the background class wins on
    object crops (wrongly) and on bare-background crops (rightly)."""
    crops = encode_images(model, held.crop_images)
    with_bg = torch.cat([classes, background])
    out = {"crop_shape_top1": zero_shot_accuracy(crops, classes, held.crop_labels, ks=(1,))["top1"],
           "object_crop_abstain": float(((crops @ with_bg.T).argmax(1) == len(classes)).float().mean())}
    if held.background_crops is not None and len(held.background_crops):
        bg = encode_images(model, held.background_crops)
        out["background_crop_abstain"] = float(((bg @ with_bg.T).argmax(1) == len(classes)).float().mean())
    return out


def train_governor(cfg: GovernorTrainConfig, progress=None, checkpoint=None) -> tuple[torch.nn.Module, dict]:
    """Train and evaluate; return the model and a record (config, curve, scores, wall time)."""
    with torch_threads(cfg.threads):
        return _train_governor(cfg, progress, checkpoint)


def _train_governor(cfg: GovernorTrainConfig, progress, checkpoint) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    vocab = load_vocabulary()
    t0 = time.perf_counter()
    corpus = build_corpus(cfg, vocab)
    validation = build_corpus_validation(cfg, vocab)
    held = build_held_out(cfg, vocab)
    tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
    model = build_clip(cfg.arch)
    if cfg.init:
        model.load_state_dict(_load_weights(cfg.init))
        log.info("warm start from %s", cfg.init)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, cfg.warmup, lambda s: s / cfg.steps, ramp_includes_step=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(corpus.images)
    curve, evals = [], []
    # the saliency the pipeline uses, for the objectness term (hooked only when it is on)
    capture = AttentionCapture(model) if cfg.saliency_weight else None
    dense = DenseTerm(model, tokenizer, vocab) if cfg.dense_weight else None
    grid = tuple(model.visual.grid_size)
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
        loss = clip_loss(model, normalise_batch(images), texts, negatives, grad_through_negatives=False)
        if cfg.saliency_weight:
            patches = flipped_patches(corpus.object_patches[idx], flip, grid)
            patches[~corpus.has_scene[idx]] = False  # crops: no target
            loss = loss + cfg.saliency_weight * objectness_loss(rollout(capture.weights), patches)
        if dense is not None:  # crops carry -1 everywhere: no target
            loss = loss + cfg.dense_weight * dense.loss(flipped_patches(corpus.patch_classes[idx], flip, grid))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            scores = evaluate_clip(model, tokenizer, validation, vocab, capture)
            evals.append({"step": step + 1, **scores})
            msg = (f"step {step + 1}/{cfg.steps} loss {np.mean(curve[-50:]):.3f} corpus validation: "
                   f"R@1 semantic i2t {scores['semantic_i2t_r@1']:.3f} t2i {scores['semantic_t2i_r@1']:.3f} "
                   f"zero-shot top1 {scores['zeroshot_top1']:.3f} crop shape top1 {scores['crop_shape_top1']:.3f} "
                   f"background abstain {scores.get('background_crop_abstain', 0):.3f} "
                   f"saliency recall {scores.get('saliency_recall@0.5', float('nan')):.3f} "
                   f"MaskCLIP pointing {scores.get('maskclip_pointing', float('nan')):.3f} "
                   f"({time.perf_counter() - t_train:.0f}s)")
            log.info(msg)
            if progress:
                progress(msg)
            if checkpoint:  # a long run that is cut off keeps its latest state
                checkpoint(model, _record(cfg, curve, evals, t0, t_train, n))
    model.eval()
    held_out = evaluate_clip(model, tokenizer, held, vocab, capture)  # reported only: never used to choose
    for hook in (capture, dense):
        if hook is not None:
            hook.close()
    log.info("held-out (reported, not used for selection): %s", held_out)
    return model, {**_record(cfg, curve, evals, t0, t_train, n), "held_out_scores": held_out}


class DenseTerm:
    """The dense word-patch term of one training step: it catches the last block's input tokens
    during the step's image forward pass, reads them the MaskCLIP way (`value_path_embeddings`, as
    the dense evaluation does) and scores each labelled patch against the class prompts (the
    background prompt as class 0, then the shapes, prompt-ensembled), at the model's temperature."""

    def __init__(self, model, tokenizer, vocab: Vocabulary):
        self.model, self.tokenizer = model, tokenizer
        self.names = [BACKGROUND_CLASS, *vocab.shapes]
        self.last_input: torch.Tensor | None = None
        self._handle = model.visual.transformer.resblocks[-1].register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.last_input = args[0]

    def loss(self, patch_classes: torch.Tensor) -> torch.Tensor:
        patches = value_path_embeddings(self.model.visual, self.last_input)
        classes = class_embeddings(lambda prompts: self.model.encode_text(self.tokenizer(prompts)), self.names)
        scale = self.model.logit_scale.exp().detach().clamp(max=MAX_LOGIT_SCALE)
        return dense_word_patch_loss(patches, classes, patch_classes, scale)

    def close(self):
        self._handle.remove()
        self.last_input = None


def flipped_patches(object_patches: torch.Tensor, flip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N] patch flags (or labels) with the rows of horizontally flipped images mirrored as their images were."""
    out = object_patches.clone()
    out[flip] = out[flip].view(-1, *grid).flip(-1).reshape(-1, grid[0] * grid[1])
    return out


def _load_weights(path: str) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}


def _record(cfg, curve, evals, t0, t_train, n) -> dict:
    return {
        "config": {**asdict(cfg), "arch": cfg.arch.to_dict()},
        "loss_curve": [round(float(np.mean(curve[i:i + 25])), 4) for i in range(0, len(curve), 25)],
        "evals": evals,
        "scores": evals[-1] if evals else {},  # corpus validation
        "train_seconds": round(time.perf_counter() - t_train, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "corpus_images": n,
        "steps_done": len(curve),
    }
