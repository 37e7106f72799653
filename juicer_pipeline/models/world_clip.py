"""Small open_clip CLIPs built from config (no download): the world governor and test models."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

# open_clip's SimpleTokenizer ships this vocabulary; every model here shares it.
VOCAB_SIZE = 49408


@dataclass(frozen=True)
class ClipArch:
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 24
    embed_dim: int = 128
    conv_stem: bool = True
    # A hierarchical-MLP stem (instead of the conv stem): each patch is embedded on its own, in
    # 2×2 stride-2 stages, so a pruned step embeds only the kept patches.
    hmlp_stem: bool = False
    # Convolutions per stride-2 stage of the conv stem: more local shape features per token.
    stem_depth: int = 1
    # The conv stem's first stage: 2 (a 3×3 stride-2 convolution, the stem of "Early Convolutions
    # Help Transformers See Better") or a larger power of two s, a non-overlapping s×s patchify.
    # A larger first stride skips the stem's widest feature maps, which cost a pruned step as much
    # as a full one because the stem runs on whole images; the later 3×3 stages still reach across
    # patch borders.
    stem_first_stride: int = 2
    # Run the conv stem on each patch alone (zero padding at patch borders) instead of on the
    # whole image: a pruned step then embeds only the kept patches.
    patch_local_stem: bool = False
    # How the image embedding pools the tokens: "tok" (the CLS token) or "avg" (mean of the patches).
    pool_type: str = "tok"
    # open_clip's transformer block: "default" (torch's nn.MultiheadAttention) or "custom" (open_clip's
    # own Attention, one qkv projection split by chunk; same parameters, a cheaper backward on CPU).
    block_type: str = "default"

    def __post_init__(self):
        if self.pool_type not in ("tok", "avg"):
            raise ValueError(f"pool_type must be 'tok' or 'avg', not {self.pool_type!r}")
        if self.block_type not in ("default", "custom"):
            raise ValueError(f"block_type must be 'default' or 'custom', not {self.block_type!r}")
        if self.stem_depth < 1:
            raise ValueError(f"stem_depth must be at least 1, not {self.stem_depth}")
        s = self.stem_first_stride
        if s < 2 or s & (s - 1) or s > self.patch_size:
            raise ValueError(f"stem_first_stride must be a power of two from 2 to the patch size "
                             f"({self.patch_size}), not {s}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClipArch":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def stem(self) -> str:
        if self.conv_stem:
            s = self.stem_first_stride
            conv = "conv" if s == 2 else f"conv ({s}×{s} first stage)"
            return f"patch-local {conv}" if self.patch_local_stem else conv
        return "hMLP" if self.hmlp_stem else "patchify"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class ConvStem(nn.Module):
    """Stride-2 3×3 convolutions down to the patch grid, replacing the ViT's patchify conv.

    A plain 8×8 patchify sees each patch as one linear projection; on this world it learns colour
    far faster than shape. A few small convolutions give the tokens local shape features
    (as in "Early Convolutions Help Transformers See Better").
    """

    def __init__(self, width: int, patch_size: int, depth: int = 1, first_stride: int = 2):
        super().__init__()
        stages = int(math.log2(patch_size)) - int(math.log2(first_stride)) + 1
        if 2 ** int(math.log2(patch_size)) != patch_size:
            raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
        chans = [3] + [max(16, width // 2 ** (stages - i)) for i in range(1, stages + 1)]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            if i == 0 and first_stride > 2:  # a non-overlapping first_stride × first_stride patchify
                conv = nn.Conv2d(cin, cout, first_stride, stride=first_stride, bias=False)
            else:
                conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(cout), nn.GELU()]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]
        layers.append(nn.Conv2d(chans[-1], width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last: oneDNN's convolutions and batch norms run on it natively, and the default
        # layout costs a reorder before and after each layer (about 40 % of the stem's step on CPU).
        return self.net(x.contiguous(memory_format=torch.channels_last))


class PatchLocalStem(nn.Module):
    """A stem that embeds each p×p patch on its own, so that, with `kept_source` (the model's
    `KeptTokens`) holding indices, only the kept patches are embedded; the others stay zero and
    `KeptTokens` drops them after the positional embedding. Subclasses define `embed`."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        if 2 ** int(math.log2(patch_size)) != patch_size:
            raise ValueError(f"{type(self).__name__} needs a power-of-two patch size, got {patch_size}")
        self.patch_size, self.width = patch_size, width
        self.kept_source = None

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """[M, 3, p, p] pixel patches -> [M, width] patch embeddings."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, p, p)
        indices = None if self.kept_source is None else self.kept_source.indices
        if indices is None:
            out = self.embed(patches)
        else:
            rows = (indices.to(x.device).long() + torch.arange(b, device=x.device)[:, None] * gh * gw).reshape(-1)
            embedded = self.embed(patches[rows])
            out = embedded.new_zeros(b * gh * gw, self.width).index_copy(0, rows, embedded)
        return out.reshape(b, gh, gw, self.width).permute(0, 3, 1, 2)


class HMLPStem(PatchLocalStem):
    """A patch-local stem ("hMLP", Touvron et al. 2022, built for masked patch dropping): each
    p×p patch is embedded by log2(p) stages, each a linear map over 2×2 neighbouring cells, then
    LayerNorm and GELU. On full images it sees what a conv stem sees inside each patch, at matmul
    speed."""

    def __init__(self, width: int, patch_size: int):
        super().__init__(width, patch_size)
        stages = int(math.log2(patch_size))
        chans = [3] + [max(16, width // 2 ** (stages - i)) for i in range(1, stages)] + [width]
        self.stages = nn.ModuleList(nn.Linear(4 * cin, cout) for cin, cout in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in chans[1:-1])

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.permute(0, 2, 3, 1)  # M, p, p, C
        for i, stage in enumerate(self.stages):
            m, h, w, c = x.shape
            x = x.reshape(m, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(m, h // 2, w // 2, 4 * c)
            x = stage(x)
            if i < len(self.norms):
                x = F.gelu(self.norms[i](x))
        return x.reshape(len(patches), self.width)


class PatchConvStem(PatchLocalStem):
    """The conv stem run on each patch as a small image of its own. Its 3×3 convolutions overlap
    inside a patch but see zeros past its border, where the whole-image conv stem sees the
    neighbours; in exchange a pruned step embeds only the kept patches."""

    def __init__(self, width: int, patch_size: int, depth: int = 1, first_stride: int = 2):
        super().__init__(width, patch_size)
        self.conv = ConvStem(width, patch_size, depth, first_stride)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        return self.conv(patches).reshape(len(patches), self.width)


def build_clip(arch: ClipArch) -> open_clip.CLIP:
    model = _open_clip(arch, "default")
    if arch.block_type == "custom":
        # open_clip's own attention draws q/k/v weights from a wider distribution than
        # nn.MultiheadAttention (in the world's student that cost 10 points of zero-shot in a 600-step
        # run). Start from the default block's weights, with the random stream left as the
        # default build leaves it, so a seed gives the same initial model in either block type.
        with torch.random.fork_rng(devices=[]):
            custom = _open_clip(arch, "custom")
        custom.load_state_dict(model.state_dict())
        model = custom
    if arch.conv_stem and arch.hmlp_stem:
        raise ValueError("choose one stem: conv_stem or hmlp_stem")
    if arch.patch_local_stem and not arch.conv_stem:
        raise ValueError("patch_local_stem runs the conv stem per patch: it needs conv_stem")
    if arch.conv_stem:
        stem = PatchConvStem if arch.patch_local_stem else ConvStem
        model.visual.conv1 = stem(arch.vision_width, arch.patch_size, arch.stem_depth, arch.stem_first_stride)
    elif arch.hmlp_stem:
        model.visual.conv1 = HMLPStem(arch.vision_width, arch.patch_size)
    return model


def _open_clip(arch: ClipArch, block_type: str) -> open_clip.CLIP:
    return open_clip.CLIP(
        embed_dim=arch.embed_dim,
        vision_cfg=dict(image_size=arch.image_size, patch_size=arch.patch_size, width=arch.vision_width,
                        layers=arch.vision_layers, head_width=arch.vision_width // arch.vision_heads, mlp_ratio=4,
                        pool_type=arch.pool_type, block_type=block_type),
        text_cfg=dict(context_length=arch.context_length, vocab_size=VOCAB_SIZE, width=arch.text_width,
                      heads=arch.text_heads, layers=arch.text_layers, block_type=block_type),
    )


def tiny_arch(**overrides) -> ClipArch:
    """A very small CLIP for tests: builds and runs in milliseconds."""
    base = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
                text_layers=1, text_heads=2, context_length=16, embed_dim=32, conv_stem=False)
    return ClipArch(**{**base, **overrides})
