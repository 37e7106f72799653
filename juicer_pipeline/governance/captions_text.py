"""Turning whatever a manifest holds in its caption field into text, or a quarantine reason."""
from __future__ import annotations

import math
import re
import unicodedata

_WS = re.compile(r"\s+")


class CaptionRejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def storable_text(text: str) -> str:
    """`text` as valid UTF-8, which Parquet and DuckDB require: bytes that were not UTF-8 (kept as
    surrogate escapes by the readers) and lone surrogates become visible backslash escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the original bytes of undecodable input
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")  # surrogates that stand for no byte
    return raw.decode("utf-8", "backslashreplace")


def raw_caption_text(value) -> str | None:
    """The caption as stored verbatim (undecodable bytes kept visible as escapes)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return storable_text(str(value))


def normalise_caption(value, max_chars: int = 4000) -> str:
    """Unicode-normalised text with collapsed whitespace; raise CaptionRejected if unusable.

    Cleaning boilerplate is *not* done here: that is the text branch's job, and the raw caption
    must stay comparable with the enriched one.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise CaptionRejected("missing_caption")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CaptionRejected("binary_caption", "not valid UTF-8") from exc
    text = str(value)
    if storable_text(text) is not text:
        raise CaptionRejected("binary_caption", "not valid Unicode (undecodable bytes or lone surrogates)")
    text = unicodedata.normalize("NFC", text)
    if _looks_binary(text):
        raise CaptionRejected("binary_caption", "control characters")
    text = _WS.sub(" ", text).strip()
    if not text:
        raise CaptionRejected("empty_caption")
    if len(text) > max_chars:
        raise CaptionRejected("caption_too_long", f"{len(text)} > {max_chars} characters")
    return text


def _looks_binary(text: str) -> bool:
    if "\x00" in text or "\ufffd" in text:
        return True
    if text.isprintable():  # no control, surrogate or private-use character: skip the per-character scan
        return False
    control = sum(1 for ch in text if unicodedata.category(ch) in ("Cc", "Cs", "Co") and ch not in "\t\n\r")
    return control > max(1, len(text) // 20)
