"""What an export is asked for and what it returns, and the identifiers it writes (uids, grids)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
from PIL import Image

SCHEMA_VERSION = 1
UID_DTYPE = np.dtype("u8,u8")  # DataComp's subset files: np.load(f).dtype == np.dtype("u8,u8")
MANIFEST = "manifest.json"
# Each image reaches the model whole, at the export's size, only under augmentations that keep
# the full frame: open_clip_train's RandomResizedCrop at scale (1, 1) on a square image falls
# back to the whole image; any smaller scale, a flip or a non-square resize moves the patch grid.
AUGMENTATION_NOTE = ("the kept indices address the exported image's patch grid: train on whole, unflipped images "
                     "at the exported size (open_clip_train: --aug-cfg scale='(1.0,1.0)', no flips)")


class ExportError(ValueError):
    """An export that cannot be written as asked (missing inputs, an unusable output folder)."""


def uid_for(sample_id: str) -> str:
    """A sample's uid, as DataComp writes uids (128 bits, 32 hex digits): from its sample id, which
    is stable across re-ingestion, so every export of the same sample carries the same uid and a
    sieve's uids.npy selects from any export of the pool."""
    return hashlib.sha256(sample_id.encode()).hexdigest()[:32]


def uids_array(uids: list[str]) -> np.ndarray:
    """DataComp's uids.npy: each uid as two big-endian halves in a (u8, u8) record, sorted."""
    out = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], UID_DTYPE)
    out.sort()
    return out


def parse_grid(text: str) -> tuple[int, int]:
    """'8x8' -> (8, 8)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ExportError(f"grid {text!r} is not HxW (e.g. 8x8)") from None
    if h < 1 or w < 1:
        raise ExportError(f"grid {text!r} must have at least one row and one column")
    return h, w


def grid_name(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


@dataclass(frozen=True)
class ImageGeometry:
    """The governor's preprocess up to its tensor conversion: what makes a decoded image the
    picture the governor scored."""
    steps: tuple[Callable, ...]
    size: tuple[int, int]  # (height, width) of the result
    description: tuple[str, ...]

    def apply(self, image: Image.Image) -> Image.Image:
        for step in self.steps:
            image = step(image)
        return image


def governor_geometry(preprocess) -> ImageGeometry:
    """The geometric (PIL) steps of a torchvision Compose, e.g. open_clip's Resize / CenterCrop."""
    transforms = getattr(preprocess, "transforms", None)
    if transforms is None:
        raise ExportError(f"the governor's preprocess {preprocess!r} is not a torchvision Compose: its image "
                          f"geometry cannot be reproduced")
    steps = []
    for t in transforms:
        name = type(t).__name__
        if "ToTensor" in name or name in ("ToImage", "Normalize"):  # open_clip's MaybeToTensor too
            break
        steps.append(t)
    probe = Image.new("RGB", (97, 61))  # any non-square size: the result's size is the geometry's own
    for t in steps:
        probe = t(probe)
    return ImageGeometry(tuple(steps), (probe.height, probe.width), tuple(repr(t) for t in steps))


@dataclass(frozen=True)
class GovernorInfo:
    model_id: str
    source: str
    geometry: ImageGeometry
    card: str | None = None  # the model card's text, where the governor has one


@dataclass(frozen=True)
class ExportRequest:
    recipe: str
    patches: str  # the recipe's patches: 'all' | 'random' | 'saliency'
    saliency_method: str
    rho: float
    grids: tuple[tuple[int, int], ...] = ()  # grids besides the governor's to write kept indices on
    lossless: bool = False  # PNG instead of JPEG
    uids_only: bool = False  # DataComp's way for a sample filter: uids.npy (with manifest and exclusions) alone
    samples_per_shard: int = 1000
    jpeg_quality: int = 95
    provenance: dict = field(default_factory=dict)  # code version, config hash, lineage seq, ...
    open_clip_arch: object | None = None  # a ClipArch: its widths for the stock open_clip config written beside


@dataclass
class ExportResult:
    out: str
    export_id: str
    manifest: dict
    n_samples: int
    n_shards: int
    bytes: int
    members: pa.Table  # uid, key, shard, sample_id of every exported sample
    previews: list[dict]  # the first few samples: image, caption, classes, kept, grid

