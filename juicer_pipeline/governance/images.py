"""Decoding and verifying images: one place, so ingestion and every later stage agree."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# What a drop may hold. Multi-frame files (animated GIF, multi-page TIFF) count by their first
# frame. Anything else PIL happens to open is quarantined: later stages and docs/drops.md promise these.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 16
    max_side: int = 8192
    max_pixels: int = 40_000_000
    max_file_bytes: int = 50_000_000  # checked by the drop readers before a file is read


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, fully loaded
    width: int
    height: int
    mode: str  # the file's own mode, before conversion
    format: str


class ImageRejected(ValueError):
    """An image that cannot enter the dataset; `reason` is a short quarantine code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # rebuilt from (reason, detail) when it crosses a process boundary
        return type(self), (self.reason, self.detail)


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode and verify one image file; raise ImageRejected with a precise reason."""
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    with warnings.catch_warnings():
        # PIL only *warns* between its bomb limit and twice that; treat both as rejections.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("decompression_bomb", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageRejected("not_an_image", "no known image format") from exc
        except Exception as exc:  # noqa: BLE001 - any parser failure is a corrupt file
            raise _parse_failure(exc) from exc
        _check_format(img)
        w, h = img.size
        if w * h > limits.max_pixels or max(w, h) > limits.max_side:
            raise ImageRejected("too_large", f"{w}x{h} exceeds max_side={limits.max_side}/max_pixels={limits.max_pixels}")
        if min(w, h) < limits.min_side:
            raise ImageRejected("too_small", f"{w}x{h} below min_side={limits.min_side}")
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001
            raise _parse_failure(exc) from exc
    mode, fmt = img.mode, img.format or "unknown"
    return DecodedImage(image=to_rgb(img), width=w, height=h, mode=mode, format=fmt)


def _check_format(img: Image.Image) -> None:
    if img.format not in SUPPORTED_FORMATS:
        raise ImageRejected("unsupported_format",
                            f"{img.format or 'unknown'} is not one of {', '.join(sorted(SUPPORTED_FORMATS))}")


def _parse_failure(exc: Exception) -> ImageRejected:
    message = str(exc).lower()
    if "not available" in message or "unsupported" in message:  # e.g. a TIFF codec PIL was built without
        return ImageRejected("unsupported_format", f"{type(exc).__name__}: {exc}")
    reason = "truncated_image" if "truncated" in message else "corrupt_image"
    return ImageRejected(reason, f"{type(exc).__name__}: {exc}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to RGB; transparent pixels become white rather than an arbitrary colour."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth grey: scale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else arr * 0
        return Image.fromarray(arr.astype("uint8"), "L").convert("RGB")
    return img.convert("RGB")


def load_rgb(data: bytes) -> Image.Image:
    """Decode bytes already verified at ingestion (no limits re-checked)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def to_uint8_chw(img: Image.Image, size: int | None = None):
    """A PIL image as a uint8 [3, H, W] tensor (resized to size×size when given): the compact form
    in which training and evaluation keep decoded images in memory."""
    import numpy as np
    import torch

    img = to_rgb(img)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalise_batch(images_u8):
    """uint8 [B, 3, H, W] -> float, normalised as every model here was trained (OpenAI statistics),
    on the batch's own device (moving uint8 to a GPU first moves a quarter of the bytes)."""
    import torch

    from ..models.loader import OPENAI_MEAN, OPENAI_STD

    mean = torch.tensor(OPENAI_MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std
