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


def line_chart(values: list[float], width: int = 360, height: int = 140, title: str = "") -> Image.Image:
    """A plain PIL line chart (no plotting dependency) with min/max labels."""
    from PIL import ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((6, 4), title, fill="black")
    if len(values) >= 2:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        pts = [(30 + i * (width - 40) / (len(values) - 1), 20 + (hi - v) / span * (height - 35))
               for i, v in enumerate(values)]
        d.line(pts, fill=(31, 119, 180), width=2)
        d.text((2, 16), f"{hi:.2f}", fill="gray")
        d.text((2, height - 16), f"{lo:.2f}", fill="gray")
    return img


def bar_chart(labels: list[str], values: list[float], width: int = 420, bar_h: int = 14, title: str = "") -> Image.Image:
    from PIL import ImageDraw

    top = 18 if title else 4
    img = Image.new("RGB", (width, top + len(labels) * (bar_h + 4) + 4), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((6, 3), title, fill="black")
    vmax = max(values, default=0) or 1
    for i, (label, v) in enumerate(zip(labels, values)):
        y = top + i * (bar_h + 4)
        d.text((4, y + 1), str(label)[:14], fill="black")
        d.rectangle([100, y, 100 + (width - 160) * v / vmax, y + bar_h], fill=(44, 160, 44))
        d.text((104 + (width - 160) * v / vmax, y + 1), f"{v:g}", fill="black")
    return img


def prune_preview(image: Image.Image, saliency, kept, grid: tuple[int, int], scale: int = 2) -> Image.Image:
    """original | saliency heat-map | pruned (dropped patches greyed), side by side."""
    import numpy as np

    w, h = image.size
    sal = np.asarray(saliency, dtype=np.float32).reshape(grid)
    sal = (sal - sal.min()) / (np.ptp(sal) or 1.0)
    heat = np.stack([sal, np.zeros_like(sal), 1 - sal], -1)  # red = salient, blue = not
    heat_img = Image.fromarray((heat * 255).astype("uint8")).resize((w, h), Image.NEAREST)
    heat_img = Image.blend(image, heat_img, 0.55)
    arr = np.asarray(image).copy()
    keep = np.zeros(grid[0] * grid[1], bool)
    keep[np.asarray(kept, dtype=int)] = True
    ph, pw = h // grid[0], w // grid[1]
    for idx in np.where(~keep)[0]:
        r, c = divmod(int(idx), grid[1])
        arr[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 128
    panel = image_strip([image, heat_img, Image.fromarray(arr)], height=h)
    return panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST)
