"""The contrastive (ITC) loss, for students and the governor alike."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

_CLIP_LOSS = ClipLoss()
MAX_LOGIT_SCALE = 100.0  # CLIP caps the learned temperature's inverse at 100


def clip_loss(model, images: torch.Tensor, tokens: torch.Tensor, negatives: torch.Tensor | None = None,
              grad_through_negatives: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip's ClipLoss) with the logit scale capped at 100.

    `negatives` (hard-negative captions, any number) join the image→text softmax as extra texts no
    image matches, as NegCLIP adds them; text→image is unchanged. `grad_through_negatives=False`
    encodes them without gradient: they still push images away from wrong shapes and colours (the
    governor's corpus trains so) at a third of the cost of back-propagating through them."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    if negatives is None or len(negatives) == 0:
        return _CLIP_LOSS(img, txt, scale)
    with torch.set_grad_enabled(grad_through_negatives and torch.is_grad_enabled()):
        neg = F.normalize(model.encode_text(negatives), dim=-1)
    labels = torch.arange(len(img), device=img.device)
    image_to_text = scale * img @ torch.cat([txt, neg]).T
    text_to_image = scale * txt @ img.T
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


def objectness_loss(patch_attention: torch.Tensor, object_patches: torch.Tensor) -> torch.Tensor:
    """KL divergence from a uniform distribution over each image's object patches to its patch
    attention (e.g. the CLS rollout, [B, N], rows renormalised here): zero when the attention sits
    evenly on every patch an object covers and nowhere else. Images without an object patch are
    left out; a batch without any gives 0 (with a graph, so backward still works)."""
    rows = object_patches.any(dim=-1)
    if not rows.any():
        return patch_attention.sum() * 0.0
    p = patch_attention[rows]
    log_p = torch.log((p / p.sum(dim=-1, keepdim=True)).clamp_min(1e-8))
    target = object_patches[rows].float()
    target = target / target.sum(dim=-1, keepdim=True)
    log_target = torch.log(target.clamp_min(1e-12))
    return (target * (log_target - log_p)).sum(dim=-1).mean()


def dense_word_patch_loss(patch_embeddings: torch.Tensor, class_embeddings: torch.Tensor,
                          patch_classes: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Cross-entropy of each labelled patch's class among the class text embeddings: the MaskCLIP
    reading of a patch ([B, N, E] normalised value-path embeddings against [C, E] normalised class
    embeddings, class 0 the background prompt) pulled onto the class that fills it. Patches labelled
    -1 (mixed, or not a whole scene) are left out; a batch without any gives 0 with a graph."""
    labels = patch_classes.long().reshape(-1)
    if not (labels >= 0).any():
        return patch_embeddings.sum() * 0.0
    logits = scale * patch_embeddings.reshape(-1, patch_embeddings.shape[-1]) @ class_embeddings.T
    return F.cross_entropy(logits, labels, ignore_index=-1)
