"""Small helpers that turn results into Dagster UI metadata (tables, inline pictures)."""
from __future__ import annotations

import base64
import io

from PIL import Image


def png_markdown(image: Image.Image, alt: str = "preview") -> str:
    """Dagster has no image metadata type: embed a small PNG as base64 in markdown."""
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def image_strip(images: list[Image.Image], height: int = 64) -> Image.Image:
    thumbs = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    strip = Image.new("RGB", (sum(t.width for t in thumbs) + 2 * max(len(thumbs) - 1, 0), height), "white")
    x = 0
    for t in thumbs:
        strip.paste(t, (x, 0))
        x += t.width + 2
    return strip


def markdown_table(rows: list[dict], max_chars: int = 80) -> str:
    if not rows:
        return "_(none)_"
    cols = list(rows[0])

    def cell(v) -> str:
        text = "" if v is None else str(v)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
