"""Retrieval and zero-shot classification metrics (held-out sets only)."""
from __future__ import annotations

import numpy as np
import torch


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5, 10),
                     keys: list | None = None) -> dict[str, float]:
    """Image→text and text→image recall@k for paired, normalised embeddings (row i ↔ row i).

    With `keys`, a retrieved item also counts as a hit when its key equals the query's key: in
    the synthetic world two images with the same objects have captions that no model could tell
    apart ("a red star." matches every red-star image), so instance-level recall has a ceiling
    far below 1. Both variants are reported by callers.
    """
    sims = image_emb.float() @ text_emb.float().T
    n = sims.shape[0]
    if keys is None:
        same = torch.eye(n, dtype=torch.bool)
    else:
        codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        ids = torch.tensor([codes[k] for k in keys])
        same = ids[:, None] == ids[None, :]
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        order = s.argsort(dim=1, descending=True)
        hits = torch.gather(same, 1, order)  # hits[q, r]: rank r item matches query q
        for k in ks:
            out[f"{name}_r@{k}"] = float(hits[:, :k].any(dim=1).float().mean())
    return out


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: np.ndarray | list[int],
                       ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy of classifying normalised image embeddings against class embeddings."""
    logits = image_emb.float() @ class_emb.float().T
    labels = torch.as_tensor(np.asarray(labels))
    top = logits.topk(max(ks), dim=1).indices
    return {f"top{k}": float((top[:, :k] == labels[:, None]).any(dim=1).float().mean()) for k in ks}


def per_class_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: np.ndarray | list[int],
                       class_names: list[str]) -> dict[str, float]:
    """Zero-shot top-1 of each class on its own (NaN for a class with no image): which classes a
    student has learned, where the mean hides it."""
    pred = (image_emb.float() @ class_emb.float().T).argmax(dim=1)
    labels = torch.as_tensor(np.asarray(labels))
    return {name: float((pred[labels == i] == i).float().mean()) if (labels == i).any() else float("nan")
            for i, name in enumerate(class_names)}


class LinearProbe:
    """A multinomial logistic regression on standardised frozen features (`fit_linear_probe`)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., features] -> [..., classes]."""
        x = x.to(self.weight.device).float()
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def fit_linear_probe(train_emb: torch.Tensor, train_labels, n_classes: int, l2: float = 1e-4,
                     max_iter: int = 300, balanced: bool = False) -> LinearProbe:
    """Fitted by L-BFGS from zeros, so the result is deterministic. `balanced` weighs each class's
    loss by its inverse frequency: where one class (a background) holds most examples, so that
    the rare classes are not given up for it."""
    with torch.inference_mode(False), torch.enable_grad():  # callers may evaluate under inference mode
        y = torch.as_tensor(np.asarray(train_labels)).long().clone().to(train_emb.device)
        x = train_emb.detach().float().clone()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardised: one l2 fits any tower's scale
        x = (x - mean) / std
        weight = None
        if balanced:
            counts = torch.bincount(y, minlength=n_classes).float()
            weight = torch.where(counts > 0, len(y) / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
        # [classes, features]: the weight's gradient is then (dlogits)ᵀ x, a product MKL runs about
        # ten times faster on a tall x than the xᵀ (dlogits) a [features, classes] weight needs
        w = torch.zeros(n_classes, x.shape[1], requires_grad=True, device=x.device)
        b = torch.zeros(n_classes, requires_grad=True, device=x.device)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w.T + b, y, weight=weight) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return LinearProbe(mean, std, w.detach().T, b.detach())


def linear_probe_accuracy(train_emb: torch.Tensor, train_labels, test_emb: torch.Tensor, test_labels,
                          l2: float = 1e-4, max_iter: int = 300) -> float:
    """Top-1 of a multinomial logistic regression fitted on frozen embeddings: what an image tower
    encodes about the labels, whether or not its text side can name it. Far above zero-shot, the
    gap lies in the image-text alignment."""
    y_test = torch.as_tensor(np.asarray(test_labels)).long()
    n_classes = int(max(torch.as_tensor(np.asarray(train_labels)).max(), y_test.max())) + 1
    probe = fit_linear_probe(train_emb, train_labels, n_classes, l2, max_iter)
    pred = probe.logits(test_emb).argmax(dim=1).cpu()
    return float((pred == y_test).float().mean())


def caption_percentiles(image_emb: np.ndarray, text_emb: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Per image, the share of the set's other captions that the model scores below the image's own
    caption (ties count half), in [0, 1]: near 1 for a caption that fits its image, spread evenly
    over [0, 1] for one that belongs to another image. NaN for a set of under 2. In row chunks, so
    memory stays at chunk × N."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    n = len(image_emb)
    if n < 2:
        return np.full(n, np.nan)
    out = np.empty(n)
    for start in range(0, n, chunk):
        sims = image_emb[start:start + chunk] @ text_emb.T
        own = sims[np.arange(len(sims)), np.arange(start, start + len(sims))][:, None]
        tied = np.isclose(sims, own, rtol=1e-5, atol=1e-6)  # equal captions: equal up to the matmul's rounding
        below, ties = ((sims < own) & ~tied).sum(1), tied.sum(1) - 1
        out[start:start + len(sims)] = (below + 0.5 * ties) / (n - 1)
    return out


def matched_caption_percentile(image_emb: np.ndarray, text_emb: np.ndarray, max_samples: int = 1000) -> float:
    """Where a model ranks each image's own caption among the other captions of the set, as a
    mean percentile in [0, 1] (`caption_percentiles`): near 1 when the model tells matching pairs
    from shuffled ones, about 0.5 when it cannot, i.e. when it does not know the data's domain. At
    most `max_samples` pairs, spread evenly over the set, so the cost is bounded. NaN below 2."""
    n = len(image_emb)
    if n < 2:
        return float("nan")
    idx = np.unique(np.linspace(0, n - 1, min(n, max_samples)).round().astype(int))
    return float(np.mean(caption_percentiles(np.asarray(image_emb)[idx], np.asarray(text_emb)[idx])))
