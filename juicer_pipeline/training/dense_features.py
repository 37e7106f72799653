"""What the dense evaluation reads from a frozen student: per-block patch tokens, the MaskCLIP
value-path patch embeddings and the image embedding, from one forward pass over full images.

The tokens are caught by forward hooks on the vision transformer's blocks, so this works for
open_clip's two block types alike (`nn.MultiheadAttention` or open_clip's `Attention`: both keep
the fused q/k/v projection as `in_proj_weight`) and the pass is the model's own `encode_image`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..governance.images import normalise_batch, to_uint8_chw
from ..models.kept_tokens import KeptTokens


@dataclass
class DenseFeatures:
    image_embeddings: torch.Tensor  # [N, E], normalised: the image tower's pooled output
    blocks: list[torch.Tensor] | None = None  # per block, [N, P, width]: its output patch tokens (no CLS)
    value_embeddings: torch.Tensor | None = None  # [N, P, E], normalised: the MaskCLIP path (below)

    @property
    def last_block(self) -> torch.Tensor:
        return self.blocks[-1]

    def all_blocks(self) -> torch.Tensor:
        """[N, P, width × blocks]: every block's tokens side by side (DINOv2's multi-layer probe)."""
        return torch.cat(self.blocks, dim=-1)


def student_images(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] world images -> uint8 [N, 3, size, size], resized as the held-out sets are."""
    return torch.stack([to_uint8_chw(Image.fromarray(im), size) for im in images])


def value_path_embeddings(visual, last_block_input: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense embeddings: the last block's value projection and output projection of each
    token, with no query-key mixing, no residual and no MLP, then the tower's final norm and
    projection into the joint space. Attention pooling mixes every token into the CLS output;
    the value path keeps each patch's own content, in the space the text embeddings live in."""
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    width = last_block_input.shape[-1]
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(last_block_input), attn.in_proj_weight[2 * width:], bias)
    v = getattr(attn, "ln_inner", torch.nn.Identity())(v)  # open_clip's Attention normalises here if set
    x = block.ls_1(getattr(block, "ln_attn", torch.nn.Identity())(attn.out_proj(v)))
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    return F.normalize(x[:, 1:].float(), dim=-1)


class _BlockTaps:
    """Forward hooks that keep every block's output tokens and the last block's input."""

    def __init__(self, blocks):
        self.outputs: list[torch.Tensor] = []
        self.last_input: torch.Tensor | None = None
        self.handles = [b.register_forward_hook(self._keep_output) for b in blocks]
        self.handles.append(blocks[-1].register_forward_pre_hook(self._keep_input))

    def _keep_output(self, module, args, output):
        self.outputs.append(output)

    def _keep_input(self, module, args):
        self.last_input = args[0]

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def extract_dense_features(model, images: np.ndarray, device: str = "cpu", with_patches: bool = True,
                           batch_size: int = 256) -> DenseFeatures:
    """One pass of the frozen vision tower over full images (every patch token fed); tokens are
    kept on the CPU in fp32. Without `with_patches`, only the image embeddings."""
    model.eval()
    visual, dev = model.visual, torch.device(device)
    if not getattr(visual.transformer, "batch_first", True):
        raise ValueError("the dense evaluation reads batch-first tokens; this transformer is sequence-first")
    if isinstance(visual.patch_dropout, KeptTokens):
        visual.patch_dropout.indices = None  # full images: every patch token
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    pooled, blocks, values = [], [], []
    taps = _BlockTaps(visual.transformer.resblocks)
    try:
        for i in range(0, len(images), batch_size):
            taps.outputs.clear()
            x = normalise_batch(student_images(images[i:i + batch_size], size).to(dev))
            pooled.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
            if with_patches:
                blocks.append([out[:, 1:].float().cpu() for out in taps.outputs])
                values.append(value_path_embeddings(visual, taps.last_input).cpu())
    finally:
        taps.remove()
    if not with_patches:
        return DenseFeatures(torch.cat(pooled))
    return DenseFeatures(torch.cat(pooled), [torch.cat(per_block) for per_block in zip(*blocks)], torch.cat(values))
