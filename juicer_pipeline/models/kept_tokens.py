"""Feeding a ViT only the kept patch tokens.

open_clip's `VisionTransformer._embeds` applies `self.patch_dropout` right after adding positional
embeddings, so a module in that slot that keeps CLS and gathers the given patch indices gives the
transformer only those tokens, each with its own position. A step then really costs less.
"""
from __future__ import annotations

import torch
from torch import nn


class KeptTokens(nn.Module):
    """Drop-in for `visual.patch_dropout`: identity until `indices` [B, K] are set.

    In training mode it also counts the tokens it passes on (CLS included): the budget a run
    reports is what the vision transformer was fed, not what a plan said."""

    def __init__(self):
        super().__init__()
        self.indices: torch.Tensor | None = None
        self.tokens_fed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.indices is not None:
            idx = self.indices.to(x.device).long()
            if idx.shape[0] != x.shape[0]:
                raise ValueError(f"kept indices for {idx.shape[0]} images, batch has {x.shape[0]}")
            patches = x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        if self.training:
            self.tokens_fed += x.shape[0] * x.shape[1]
        return x


def install_kept_tokens(model) -> KeptTokens:
    module = KeptTokens()
    model.visual.patch_dropout = module
    if hasattr(model.visual.conv1, "kept_source"):  # a patch-local stem embeds only the kept patches
        model.visual.conv1.kept_source = module
    return module
