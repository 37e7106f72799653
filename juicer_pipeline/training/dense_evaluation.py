"""Dense evaluation of a frozen student (issue 34): what its patch tokens know, on the world's
held-out dense sets (`world/dense_sets.py`).

- Linear-probe segmentation (the DINOv2 / TIPS protocol): a linear layer on frozen patch tokens
  is fitted to each patch's class (background or one of the shapes) on patches that are clearly
  one class, scored on other images with its logits upsampled to pixels: mIoU over every class
  and over the shapes only. Probed on the last block's tokens and on every block's side by side.
- Zero-shot segmentation, MaskCLIP style: the value-path patch embeddings against the
  prompt-ensembled class embeddings (the background prompt for class 0); mIoU as above, and
  pointing: is the best patch for each shape in an image on that shape.
- Counting (1–3) by a linear probe on the image embeddings, plain and with the area control.
- Attribute binding, Winoground's text, image and group scores on colour-swapped pairs.

The scorers take features and labels only (tests feed them synthetic features); `evaluate_dense`
extracts a student's features and calls them.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..governance.metrics import fit_linear_probe, linear_probe_accuracy
from ..governance.prompts import BACKGROUND_CLASS, TEMPLATES
from ..world.dense_sets import FIT, SCORE, DenseSets
from .dense_features import extract_dense_features
from .evaluation import class_embedding_matrix
from .runtime import torch_threads

# A patch is "clearly one class" (a probe's training example) when that class covers this share of it.
PURE_PATCH_SHARE = 0.6
# A shape is pointed at in an image when it covers at least this many patches' worth of pixels there:
# a sliver (an occluded object, in sets where objects may overlap) has no patch to point at.
POINTING_MIN_PATCHES = 0.25
# Fitting patches kept at most (a class-stratified subsample: every shape patch, fewer background
# ones) and L-BFGS iterations: together they keep both probes near a second on two CPU cores. On
# the world governor 300 iterations gain under a point of mIoU or count accuracy over 100.
MAX_FIT_PATCHES = 4096
PROBE_ITERATIONS = 100
# Probes up to this many feature values (rows × features) are fitted on one thread: L-BFGS runs
# hundreds of small products, and on two busy cores each parallel region's synchronisation made
# them 5–10× slower than one thread, with the same result. Wider problems keep torch's threads.
ONE_THREAD_PROBE_SIZE = 8_000_000
DENSE_METRICS = ("seg_last_miou", "seg_last_miou_shapes", "seg_blocks_miou", "seg_blocks_miou_shapes",
                 "zs_seg_miou", "zs_seg_miou_shapes", "pointing", "count", "count_area_control",
                 "binding_text", "binding_image", "binding_group")


def patch_class_shares(pixel_classes: np.ndarray, grid: tuple[int, int], n_classes: int) -> np.ndarray:
    """[N, H, W] pixel classes -> [N, gh·gw, n_classes]: each class's share of each patch's pixels
    (patches in raster order, as the tower's tokens; a pixel belongs to the patch its position
    falls in, so the grid need not divide the label map)."""
    n, h, w = pixel_classes.shape
    gh, gw = grid
    patch = (np.arange(h) * gh // h)[:, None] * gw + (np.arange(w) * gw // w)[None, :]
    flat = ((np.arange(n)[:, None, None] * gh * gw + patch[None]) * n_classes + pixel_classes).ravel()
    counts = np.bincount(flat, minlength=n * gh * gw * n_classes).reshape(n, gh * gw, n_classes)
    return counts / counts.sum(-1, keepdims=True)


def pixel_predictions(patch_logits: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                      batch_size: int = 64) -> torch.Tensor:
    """[N, P, C] patch logits -> [N, H, W] predicted classes: logits bilinearly upsampled to the
    label map, then argmax (the protocol of DINOv2's linear segmentation)."""
    out = []
    for i in range(0, len(patch_logits), batch_size):
        x = patch_logits[i:i + batch_size].float()
        x = x.transpose(1, 2).reshape(len(x), x.shape[-1], *grid)
        out.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False).argmax(1).to(torch.uint8))
    return torch.cat(out)


def mean_iou(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, float]:
    """IoU of each class over the whole set (intersections and unions summed over images), averaged
    over the classes present: `miou` over all, `miou_shapes` over classes 1.. (no background)."""
    confusion = np.bincount(truth.astype(np.int64).ravel() * n_classes + predicted.astype(np.int64).ravel(),
                            minlength=n_classes ** 2).reshape(n_classes, n_classes)
    hit = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - hit
    iou = np.where(union > 0, hit / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)), "miou_shapes": float(np.nanmean(iou[1:]))}


def segment_by_probe(fit_tokens: torch.Tensor, fit_shares: np.ndarray, score_tokens: torch.Tensor,
                     score_pixel_classes: np.ndarray, grid: tuple[int, int], seed: int = 0) -> dict[str, float]:
    """Linear-probe segmentation: fitted on the clearly-one-class patches of the fit images
    ([N, P, D] tokens, [N, P, C] shares), scored by mIoU on the pixels of the score images."""
    n_classes = fit_shares.shape[-1]
    shares, tokens = fit_shares.reshape(-1, n_classes), fit_tokens.reshape(-1, fit_tokens.shape[-1])
    pure = np.flatnonzero(shares.max(1) >= PURE_PATCH_SHARE)
    labels = shares[pure].argmax(1)
    keep = pure[_stratified_subsample(labels, MAX_FIT_PATCHES, seed)]
    with probe_threads(len(keep), tokens.shape[-1]):
        probe = fit_linear_probe(tokens[torch.from_numpy(keep)], shares[keep].argmax(1), n_classes,
                                 max_iter=PROBE_ITERATIONS, balanced=True)
        logits = torch.cat([probe.logits(score_tokens[i:i + 64]).cpu() for i in range(0, len(score_tokens), 64)])
    predicted = pixel_predictions(logits, grid, score_pixel_classes.shape[1:]).numpy()
    return mean_iou(predicted, score_pixel_classes, n_classes)


def probe_threads(rows: int, features: int):
    return torch_threads(1) if rows * features <= ONE_THREAD_PROBE_SIZE else contextlib.nullcontext()


def _stratified_subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` examples: every example of the rarer classes, and an even share
    of the limit for each class that has more (in practice: fewer background patches)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = limit // len(classes)
    small = counts[counts <= quota].sum()
    big_quota = (limit - small) // max(int((counts > quota).sum()), 1)
    picked = [np.flatnonzero(labels == c) if n <= quota else
              rng.choice(np.flatnonzero(labels == c), big_quota, replace=False) for c, n in zip(classes, counts)]
    return np.sort(np.concatenate(picked))


def segment_zero_shot(value_embeddings: torch.Tensor, class_embeddings: torch.Tensor,
                      pixel_classes: np.ndarray, grid: tuple[int, int]) -> dict[str, float]:
    """MaskCLIP: each patch's class is its nearest class embedding ([C, E], background first)."""
    logits = value_embeddings.float() @ class_embeddings.float().T
    predicted = pixel_predictions(logits, grid, pixel_classes.shape[1:]).numpy()
    return mean_iou(predicted, pixel_classes, class_embeddings.shape[0])


def pointing_score(value_embeddings: torch.Tensor, shape_embeddings: torch.Tensor, shares: np.ndarray) -> float:
    """Share of (image, shape in it) where the patch most like the shape's embedding ([S, E], shape
    s is class s + 1 of `shares`) holds some of that shape's pixels."""
    best = (value_embeddings.float() @ shape_embeddings.float().T).argmax(1).numpy()  # [N, S]
    object_shares = shares[..., 1:]
    present = object_shares.sum(1) >= POINTING_MIN_PATCHES  # [N, S]
    on_target = np.take_along_axis(object_shares, best[:, None, :], axis=1)[:, 0] > 0
    return float(on_target[present].mean()) if present.any() else float("nan")


def count_accuracy(fit_embeddings: torch.Tensor, fit_counts: np.ndarray, score_embeddings: torch.Tensor,
                   score_counts: np.ndarray) -> float:
    """Top-1 of a linear probe of the count (1, 2, 3 → classes 0, 1, 2) on pooled image features."""
    with probe_threads(*fit_embeddings.shape):
        return linear_probe_accuracy(fit_embeddings, np.asarray(fit_counts) - 1, score_embeddings,
                                     np.asarray(score_counts) - 1, max_iter=PROBE_ITERATIONS)


def winoground_scores(similarity: torch.Tensor) -> dict[str, float]:
    """[N, 2, 2] similarity[n, i, j] of image i and caption j of pair n (caption i is image i's).
    text: each image prefers its own caption; image: each caption prefers its own image; group:
    both. Random similarities score 1/4, 1/4 and 1/6 (Winoground's chance levels)."""
    s = similarity.float()
    text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    return {"text": float(text.float().mean()), "image": float(image.float().mean()),
            "group": float((text & image).float().mean())}


@torch.inference_mode()
def evaluate_dense(model, tokenizer, sets: DenseSets, device: str = "cpu", attributes: tuple[str, ...] = (),
                   templates: tuple[str, ...] = TEMPLATES) -> dict[str, float]:
    """Every dense metric (DENSE_METRICS, each prefixed `dense_`) of a frozen student, and
    `dense_seconds`, the time it took. `attributes` and `templates` build the zero-shot class
    embeddings as the held-out zero-shot scores do (the world's colours, the vocabulary's templates)."""
    t0 = time.perf_counter()
    grid = tuple(model.visual.grid_size)
    scenes = {p: extract_dense_features(model, sets.scenes[p].images, device) for p in (FIT, SCORE)}
    n_classes = len(sets.class_names) + 1
    shares = {p: patch_class_shares(sets.scenes[p].pixel_classes, grid, n_classes) for p in (FIT, SCORE)}
    truth = sets.scenes[SCORE].pixel_classes
    scores = {}
    for name, tokens in (("last", lambda f: f.last_block), ("blocks", lambda f: f.all_blocks())):
        probe = segment_by_probe(tokens(scenes[FIT]), shares[FIT], tokens(scenes[SCORE]), truth, grid)
        scores.update({f"seg_{name}_{k}": v for k, v in probe.items()})
    shapes = class_embedding_matrix(model, tokenizer, sets.class_names, attributes, templates, device)
    background = class_embedding_matrix(model, tokenizer, [BACKGROUND_CLASS], (), templates, device)
    zero_shot = segment_zero_shot(scenes[SCORE].value_embeddings, torch.cat([background, shapes]), truth, grid)
    scores.update({f"zs_seg_{k}": v for k, v in zero_shot.items()})
    scores["pointing"] = pointing_score(scenes[SCORE].value_embeddings, shapes, shares[SCORE])
    control = {p: extract_dense_features(model, sets.area_control[p].images, device, with_patches=False)
               for p in (FIT, SCORE)}
    for name, family, feats in (("count", sets.scenes, scenes), ("count_area_control", sets.area_control, control)):
        scores[name] = count_accuracy(feats[FIT].image_embeddings, family[FIT].counts,
                                      feats[SCORE].image_embeddings, family[SCORE].counts)
    scores.update({f"binding_{k}": v for k, v in binding_scores(model, tokenizer, sets, device).items()})
    out = {f"dense_{k}": float(v) for k, v in scores.items()}
    out["dense_seconds"] = time.perf_counter() - t0
    return out


def binding_scores(model, tokenizer, sets: DenseSets, device: str = "cpu") -> dict[str, float]:
    pairs = sets.binding.images
    images = extract_dense_features(model, pairs.reshape(-1, *pairs.shape[2:]), device, with_patches=False)
    tokens = tokenizer([c for pair in sets.binding.captions for c in pair]).to(torch.device(device))
    texts = F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()
    img, txt = images.image_embeddings.reshape(len(pairs), 2, -1), texts.reshape(len(pairs), 2, -1)
    return winoground_scores(torch.einsum("nie,nje->nij", img, txt))
