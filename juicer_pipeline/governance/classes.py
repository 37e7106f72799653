"""Object classes from salient regions: crops around connected salient patches, classified zero-shot.

A softmax over one pooled embedding is not a calibrated multi-label score for images holding
several objects, so each connected region of highly salient patches is cropped and classified on
its own (a second, small FM pass on the crops, counted separately from the full-image pass). Each
region is seen in several *views* (margins around it and, for a vocabulary drawn at any rotation,
quarter turns); its probability for a class is the mean over its views, so a class counts only
where every view shows it: a crop that cuts an object in half, or two objects, or clutter, looks
different at each margin, a whole object does not. An image's score for a class is its best
region's probability; classes with score ≥ τ are kept, at most k. τ is calibrated on the
governor's own corpus, never on drop truth.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Quarter turns in the order views take them: with 2 turns a crop is also seen upside down.
_TURNS = (None, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)


NEVER = 1.01  # a threshold no probability reaches
# Fine steps near 1: a confident classifier's useful thresholds sit there.
TAU_GRID = np.round(np.concatenate([np.arange(0.05, 0.99, 0.01), [0.99, 0.995, 0.998, 0.999]]), 3)


@dataclass(frozen=True)
class CropPlan:
    """Where class extraction crops: connected regions among the top `fractions` of patches by
    saliency (each share in turn, repeats removed), at most `max_regions` per share, each cut as a
    square with each of `margins` (share of its longer side) around it and seen at `turns`
    quarter turns (1, 2 or 4): `views` = margins × turns crops per region, averaged."""

    fractions: tuple[float, ...] = (0.15, 0.25)
    max_regions: int = 4
    margins: tuple[float, ...] = (0.3,)
    turns: int = 1

    def __post_init__(self):
        if self.turns not in (1, 2, 4):
            raise ValueError(f"turns must be 1, 2 or 4 quarter turns, got {self.turns}")

    @property
    def views(self) -> int:
        return len(self.margins) * self.turns


@dataclass(frozen=True)
class Region:
    r0: int
    c0: int
    r1: int  # exclusive
    c1: int
    size: int  # patches


def salient_regions(mask: np.ndarray, max_regions: int = 4, min_size: int = 2) -> list[Region]:
    """4-connected components of a boolean patch grid, largest first."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for r in range(h):
        for c in range(w):
            if not mask[r, c] or seen[r, c]:
                continue
            queue, cells = deque([(r, c)]), []
            seen[r, c] = True
            while queue:
                y, x = queue.popleft()
                cells.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            ys, xs = zip(*cells)
            regions.append(Region(min(ys), min(xs), max(ys) + 1, max(xs) + 1, len(cells)))
    regions = [g for g in regions if g.size >= min_size] or regions[:1]
    return sorted(regions, key=lambda g: -g.size)[:max_regions]


def region_mask(saliency: np.ndarray, grid: tuple[int, int], fraction: float) -> np.ndarray:
    """The top `fraction` of patches by saliency, as a grid mask."""
    flat = np.asarray(saliency, dtype=np.float64)
    k = max(1, int(round(fraction * flat.size)))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(grid)


def square_box(box: tuple[float, float, float, float], width: int, height: int, margin: float,
               shift: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int, int]:
    """A square around a box, `margin` of its longer side added on each side, moved inside the image
    where it fits. Square, so resizing to the model's input never stretches the object: the crop
    keeps the aspect ratio the governor was trained on (a stretched star is not a star)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2 + shift[0] * side, (y0 + y1) / 2 + shift[1] * side

    def place(centre: float, extent: int) -> float:
        lo = centre - side / 2
        return min(max(lo, 0.0), extent - side) if side <= extent else (extent - side) / 2

    left, top = place(cx, width), place(cy, height)
    return tuple(int(round(v)) for v in (left, top, left + side, top + side))


def square_crop(image: Image.Image, box, margin: float, shift=(0.0, 0.0)) -> Image.Image:
    """The square crop of `square_box`; outside the image (only when the square is larger than it)
    PIL pads with black."""
    return image.crop(square_box(box, image.width, image.height, margin, shift))


def region_box(region: Region, grid: tuple[int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """A region's pixel box."""
    ph, pw = height / grid[0], width / grid[1]
    return region.c0 * pw, region.r0 * ph, region.c1 * pw, region.r1 * ph


def crop(image: Image.Image, region: Region, grid: tuple[int, int], margin: float) -> Image.Image:
    return square_crop(image, region_box(region, grid, image.width, image.height), margin)


def zero_shot_probs(embeddings: torch.Tensor, class_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Softmax over classes at the model's own temperature (`scale` = exp(logit_scale))."""
    return torch.softmax(scale * embeddings.float() @ class_emb.float().T, dim=-1)


def model_temperature(fm) -> float:
    """The CLIP's learned logit scale: its probabilities are calibrated at that temperature, not at
    an arbitrary 100 (measured on the world governor: precision at the best τ 0.87 vs 0.75)."""
    scale = getattr(fm.model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else 100.0


def decide_classes(scores: np.ndarray, names: list[str], k: int, tau) -> list[tuple[str, float]]:
    """At most k classes whose score is ≥ τ (one τ, or one per class), best first."""
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), np.shape(scores))
    order = np.argsort(-scores, kind="stable")[:k]
    return [(names[i], float(scores[i])) for i in order if scores[i] >= tau[i]]


@dataclass(frozen=True)
class AdditionRule:
    """`caption_additions` by class name: what a caption naming `named` gains from an image's regions."""

    names: tuple[str, ...]
    tau: float | tuple[float, ...]  # one τ, or one per class (`calibrate_addition_tau`)
    claim: float
    k: int

    def classes(self, region_probs, named: set[str]) -> list[str]:
        ids = {self.names.index(n) for n in named if n in self.names}
        return [self.names[c] for c, _ in caption_additions(region_probs, ids, self.tau, self.claim, self.k)]


def calibrate_tau(scores: np.ndarray, truth: list[set[int]], target_precision: float,
                  grid=TAU_GRID, k: int = 3) -> dict:
    """Smallest τ whose predictions reach the target precision on labelled validation images.

    scores: [N, C] per-image class scores; truth: the true class ids of each image.
    Returns τ with the precision and recall it reaches there. When no τ reaches the target, τ is
    set above any probability (no class is ever extracted: a wrong class in a caption hurts more
    than a missing one) and the best precision seen is reported with `reached: False`.
    """
    best = None
    for tau in grid:
        tp = fp = fn = 0
        for s, true in zip(scores, truth):
            pred = {int(i) for i in np.argsort(-s, kind="stable")[:k] if s[i] >= tau}
            tp += len(pred & true)
            fp += len(pred - true)
            fn += len(true - pred)
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        row = {"tau": float(tau), "precision": precision, "recall": recall, "reached": precision >= target_precision}
        if row["reached"] and tp > 0:
            return row
        if tp > 0 and (best is None or precision > best["precision"]):
            best = row
    # a τ that predicts nothing has vacuous precision 1.0: never report it as the target reached
    best = best or {"precision": float("nan"), "recall": 0.0, "tau": NEVER}
    return {**best, "best_tau_seen": best["tau"], "tau": NEVER, "reached": False}


def simulated_named(truth: list[set[int]], seed: int = 0) -> list[set[int]]:
    """What web captions of labelled calibration images name, for calibrating what enrichment adds:
    every true class, except one left out of every image holding several (a caption that omits an
    object, the case enrichment exists for, here in every image where it can happen)."""
    rng = np.random.default_rng(seed)
    named = []
    for true in truth:
        true = sorted(true)
        named.append(set(true) - {true[int(rng.integers(len(true)))]} if len(true) > 1 else set(true))
    return named


# Equal shares of the false-addition budget tried per class, as fractions of the whole budget (the
# smallest, 1 / classes, can never exceed it in total; the largest that does not is taken).
_BUDGET_SHARES = 40


def calibrate_addition_tau(region_probs: list[np.ndarray], truth: list[set[int]], max_false_share: float,
                           claim: float, grid=TAU_GRID, k: int = 3, seed: int = 0, floor: float = 0.0) -> dict:
    """One τ per class for what enrichment (`caption_additions`) adds, on validation images whose
    captions `simulated_named` simulates: at most `max_false_share` of them gain a class not in them.

    Precision over all predicted classes is the wrong target here: the classes a caption already
    names are the easy ones, so what enrichment adds is mostly the rest, and a caption gains a
    foreign object exactly when one of its unclaimed regions names a class outside the image.

    One τ for every class spends the budget on the classes the governor confuses (a circle beside a
    cross read as a heart) and starves the rest. So each class gets an equal share of the budget:
    its τ is the smallest (never below `floor`, the class τ: an addition is at least as sure as an
    extracted class) at which it alone would go falsely into at most that share of the images. The
    share is the largest, from budget / classes up to the whole budget, at which all classes
    together stay within it. Reported with the share of left-out classes it fills; when the target
    is out of reach, τ is NEVER and nothing is added.
    """
    named = simulated_named(truth, seed)
    lacking = sum(len(t - n) for t, n in zip(truth, named))
    n_classes = next((len(r[0]) for r in region_probs if len(r)), 0)
    grid = np.asarray([t for t in grid if t >= floor])
    unreached = {"tau": [NEVER] * n_classes, "false_share": float("nan"), "filled": 0.0,
                 "max_false_share": max_false_share, "floor": float(floor), "claim": claim, "reached": False}
    if not len(grid) or not n_classes:  # no τ at or above the floor: nothing is ever added
        return unreached
    false_by_class = _false_additions_by_class(region_probs, named, truth, claim, grid, n_classes)
    n = max(len(truth), 1)
    for share in max_false_share * np.linspace(1.0, 1.0 / n_classes, _BUDGET_SHARES):
        reachable = false_by_class <= share * n  # [C, T]
        taus = np.where(reachable.any(1), grid[reachable.argmax(1)], NEVER)
        added = [{c for c, _ in caption_additions(r, m, taus, claim, k)} for r, m in zip(region_probs, named)]
        false = sum(bool(a - t) for a, t in zip(added, truth)) / n
        if false <= max_false_share and (taus < NEVER).any():
            filled = sum(len(a & (t - m)) for a, t, m in zip(added, truth, named)) / max(lacking, 1)
            return {"tau": [float(t) for t in taus], "false_share": false, "filled": filled,
                    "max_false_share": max_false_share, "class_share": float(share / max_false_share),
                    "floor": float(floor), "claim": claim, "reached": True}
    return unreached


def _false_additions_by_class(region_probs, named, truth, claim: float, grid: np.ndarray,
                              n_classes: int) -> np.ndarray:
    """[classes, τ grid]: how many images each class would be added to, falsely, at each τ: the
    images without it where an unclaimed region's top class it is, at that probability or more."""
    best = np.zeros((len(truth), n_classes))  # per image, the best unclaimed-region probability of each class
    for i, (regions, names) in enumerate(zip(region_probs, named)):
        for top, p in unclaimed_tops(regions, names, claim):
            best[i, top] = max(best[i, top], p)
    absent = np.array([[c not in t for c in range(n_classes)] for t in truth], dtype=bool)
    absent = absent.reshape(len(truth), n_classes)  # also for no image at all
    return ((best[:, :, None] >= grid[None, None, :]) & absent[:, :, None] & (best[:, :, None] > 0)).sum(0)


def calibrate_tau_per_class(scores: np.ndarray, truth: list[set[int]], target_precision: float,
                            grid=TAU_GRID, min_support: int = 20) -> np.ndarray:
    """One τ per class: the smallest whose predictions of that class reach the target precision on
    the validation images (ignoring k). A class with too few validation positives, or that never
    reaches the target, gets NEVER."""
    taus = np.full(scores.shape[1], NEVER)
    for c in range(scores.shape[1]):
        positive = np.array([c in t for t in truth])
        if positive.sum() < min_support:
            continue
        for tau in grid:
            pred = scores[:, c] >= tau
            if pred.any() and positive[pred].mean() >= target_precision:
                taus[c] = float(tau)
                break
    return taus


def image_regions(saliency: np.ndarray, grid: tuple[int, int], region_fractions, max_regions: int) -> list[Region]:
    """Connected salient regions at each share of top patches, without repeats. A small share splits
    objects that touch at a larger one; a larger share catches objects the small one misses."""
    if isinstance(region_fractions, (int, float)):
        region_fractions = (region_fractions,)
    regions: list[Region] = []
    for fraction in region_fractions:
        for g in salient_regions(region_mask(saliency, grid, fraction), max_regions):
            if (g.r0, g.c0, g.r1, g.c1) not in {(o.r0, o.c0, o.r1, o.c1) for o in regions}:
                regions.append(g)
    return regions


def region_crops(images: list[Image.Image], saliency: np.ndarray, grid: tuple[int, int],
                 plan: CropPlan) -> tuple[list[Image.Image], list[int], list[int]]:
    """Square crops around each image's connected salient regions (`plan.views` consecutive crops
    per region: each margin at each turn), the image each crop belongs to, and the number of
    regions per image."""
    crops, owner, n_regions = [], [], []
    for i, (img, sal) in enumerate(zip(images, saliency)):
        regions = image_regions(sal, grid, plan.fractions, plan.max_regions)
        n_regions.append(len(regions))
        for g in regions:
            for margin in plan.margins:
                square = crop(img, g, grid, margin)
                for turn in _TURNS[:plan.turns]:
                    crops.append(square if turn is None else square.transpose(turn))
                    owner.append(i)
    return crops, owner, n_regions


def crop_probs(fm, crops: list[Image.Image], class_emb: torch.Tensor, abstain_emb: torch.Tensor | None = None,
               batch_size: int = 256) -> np.ndarray:
    """[n_crops, C] class probabilities of each crop (one batched FM pass). With an abstain
    embedding (the `background` prompt) the softmax runs over the classes *and* the abstain option,
    whose column is then dropped: a crop of clutter puts its mass on abstain instead of on whichever
    shape it resembles most, so it names nothing."""
    rows = class_emb if abstain_emb is None else torch.cat([class_emb, abstain_emb.reshape(1, -1)])
    out = []
    for start in range(0, len(crops), batch_size):
        x = torch.stack([fm.preprocess(c) for c in crops[start:start + batch_size]]).to(fm.device)
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(fm.model.encode_image(x).float(), dim=-1)
        out.append(zero_shot_probs(emb, rows.to(emb.device), model_temperature(fm))[:, :len(class_emb)].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(class_emb)), np.float32)


def region_class_scores(fm, images: list[Image.Image], saliency: np.ndarray, grid: tuple[int, int],
                        class_emb: torch.Tensor, plan: CropPlan, batch_size: int = 256,
                        abstain_emb: torch.Tensor | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """([N, C] class scores: each image's best region, and per image its regions' probabilities,
    [regions, C], each region's mean over its views).

    The crops go through the governor in batches: the one extra FM pass this stage makes.
    """
    crops, owner, n_regions = region_crops(images, saliency, grid, plan)
    probs = crop_probs(fm, crops, class_emb, abstain_emb, batch_size)
    per_region = probs.reshape(-1, plan.views, probs.shape[1]).mean(axis=1)
    bounds = np.cumsum([0, *n_regions])
    regions = [per_region[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    scores = np.stack([r.max(axis=0) if len(r) else np.zeros(len(class_emb), np.float32) for r in regions]) \
        if regions else np.zeros((0, len(class_emb)), np.float32)
    return scores.astype(np.float32), regions


def caption_additions(region_probs: np.ndarray, named: set[int], tau, claim: float,
                      k: int) -> list[tuple[int, float]]:
    """What enrichment adds to a caption that names the classes `named`: (class, probability), at
    most k, best first.

    A named class *claims* every region the governor gives it at least `claim` there: the caption
    already says what that region shows, so the region adds nothing (a hexagon the caption names,
    that the governor takes for a pentagon, must not gain the caption a pentagon). Every other
    region adds its top class when that clears τ (one, or that class's own), unless the caption
    names it already.
    """
    best: dict[int, float] = {}
    taus = np.asarray(tau, dtype=np.float64)
    for top, p in unclaimed_tops(region_probs, named, claim):
        if p >= (taus[top] if taus.ndim else taus):
            best[top] = max(best.get(top, 0.0), p)
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def unclaimed_tops(region_probs, named: set[int], claim: float):
    """(top class, its probability) of each region ([regions, C]) that no class of `named` claims
    (`caption_additions`), where the caption does not name that class already."""
    for p in np.asarray(region_probs, dtype=np.float64):
        if named and max(p[c] for c in named) >= claim:
            continue
        top = int(np.argmax(p))
        if top not in named:
            yield top, float(p[top])
