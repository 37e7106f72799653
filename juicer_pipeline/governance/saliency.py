"""Patch saliency and image embeddings from ONE forward pass of the governor's vision tower.

Every method is computed from what that single pass exposes, so all of them are stored and a
change of method (or ρ) never re-runs the model:
- `cls_attention`: CLS→patch attention of the last block, averaged over heads. open_clip calls
  `nn.MultiheadAttention` with `need_weights=False`, so the last block's input is captured with a
  forward pre-hook and the attention is recomputed from its `in_proj` weights.
- `attention_rollout` (Abnar & Zuidema 2020): the product over blocks of ½(A + I), heads averaged,
  row CLS — attention that reaches the output through the residual stream, not one block's view.
- `global_similarity`: cosine of each projected patch token with the pooled image embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("cls_attention", "attention_rollout", "global_similarity")


@dataclass
class VisionOutput:
    embeddings: torch.Tensor  # [B, D] normalised pooled image embeddings
    saliency: dict[str, torch.Tensor]  # method -> [B, N] scores, N = grid patches


def _block_attention(blk, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities [B, T, T] of one open_clip residual block."""
    y = blk.ln_1(x)
    attn = blk.attn
    q, k, _ = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, t, w = q.shape
    h = attn.num_heads
    q = q.view(b, t, h, w // h).transpose(1, 2)
    k = k.view(b, t, h, w // h).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / (w // h) ** 0.5, dim=-1)
    return probs.mean(dim=1)


class VisionPass:
    """Hooks a governor's open_clip ViT once; `run(images)` is one forward pass per image."""

    def __init__(self, model):
        self.visual = model.visual
        self.blocks = list(self.visual.transformer.resblocks)
        self.forward_calls = 0  # images seen by the full-image pass (tests count it)
        self._inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles = [blk.register_forward_pre_hook(self._capture(i)) for i, blk in enumerate(self.blocks)]

    def _capture(self, i: int):
        def hook(_module, args, kwargs=None):
            self._inputs[i] = args[0] if args else kwargs["q_x"]
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    @torch.inference_mode()
    def run(self, images: torch.Tensor) -> VisionOutput:
        visual = self.visual
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(images)
        finally:
            visual.output_tokens = previous
        self.forward_calls += len(images)
        emb = F.normalize(pooled.float(), dim=-1)
        attentions = [_block_attention(blk, x) for blk, x in zip(self.blocks, self._inputs)]
        patch_emb = F.normalize((tokens @ visual.proj).float() if visual.proj is not None else tokens.float(), dim=-1)
        saliency = {
            "cls_attention": attentions[-1][:, 0, 1:],
            "attention_rollout": _rollout(attentions)[:, 0, 1:],
            "global_similarity": (patch_emb * emb[:, None, :]).sum(-1),
        }
        return VisionOutput(emb, {k: v.float().cpu() for k, v in saliency.items()})


def _rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    eye = torch.eye(attentions[0].shape[-1], device=attentions[0].device)
    result = eye.expand_as(attentions[0])
    for a in attentions:
        a = 0.5 * (a + eye)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result
