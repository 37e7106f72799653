"""What a drop reader yields: one `RawRecord` per sample, or a `DropError` for the whole drop."""
from __future__ import annotations

from dataclasses import dataclass, field


class DropError(ValueError):
    """The drop as a whole cannot be read (broken manifest or shard, nothing to ingest)."""


@dataclass
class RawRecord:
    local_id: str
    path: str  # where the image is, relative to the drop (shard members as 'shard.tar:member')
    image_bytes: bytes | None
    caption: object
    url: str | None = None
    label: str | None = None
    fetch_error: str | None = None  # quarantine reason found while locating the file
    fetch_detail: str | None = None  # what exactly was wrong (the path when not given)
    extra: dict = field(default_factory=dict)


def clean_str(value) -> str | None:
    """A manifest or metadata value as stripped text; None for missing, NaN or blank."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def over_cap(name: str, size: int, max_file_bytes: int) -> str:
    return f"{name} is {size} bytes, over max_file_bytes={max_file_bytes}"
