"""What one record's image bytes are, found without looking at any other record.

This is the work ingestion hands to its worker processes, so the module imports only PIL,
NumPy and hashlib: a spawned worker imports it in about a tenth of a second, where the
ingestion module (pandas and PyArrow for manifests and Parquet) takes three quarters of one, a
delay every worker would pay before its first image.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .images import ImageLimits, ImageRejected, decode_image
from .near_duplicates import thumbprint


@dataclass(frozen=True)
class Inspection:
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    thumbprint: bytes | None = None
    rejected: ImageRejected | None = None


def inspect_image(data: bytes | None, limits: ImageLimits) -> Inspection:
    digest = hashlib.sha256(data).hexdigest() if data is not None else None
    try:
        decoded = decode_image(data, limits)
    except ImageRejected as exc:
        return Inspection(content_hash=digest, rejected=exc)
    return Inspection(digest, decoded.width, decoded.height, decoded.mode, decoded.format,
                      thumbprint(decoded.image))


def inspect_chunk(images: list[bytes | None], limits: ImageLimits) -> list[Inspection]:
    return [inspect_image(data, limits) for data in images]
