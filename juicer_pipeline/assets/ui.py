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


def metadata_table(rows: list[dict]):
    """Rows as a Dagster table (rendered inline and sortable in the UI), column types from the
    first row's values."""
    from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

    def kind(v) -> str:
        return ("bool" if isinstance(v, bool) else "int" if isinstance(v, int)
                else "float" if isinstance(v, float) else "string")

    cols = [TableColumn(name, kind(v)) for name, v in (rows[0].items() if rows else [])]
    return MetadataValue.table([TableRecord(r) for r in rows], schema=TableSchema(columns=cols))


def curves_chart(series: dict[str, list[tuple[float, float]]], width: int = 520, height: int = 220,
                 title: str = "", x_label: str = "") -> Image.Image:
    """Several (x, y) curves on shared axes with a legend: learning curves of recipes."""
    from PIL import ImageDraw

    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 4), title, fill="black")
    points = [p for pts in series.values() for p in pts]
    if not points:
        return img
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    plot_w, plot_h = width - 170, height - 45
    sx = lambda x: 40 + (x - x0) / ((x1 - x0) or 1) * plot_w  # noqa: E731
    sy = lambda y: 20 + (y1 - y) / ((y1 - y0) or 1) * plot_h  # noqa: E731
    d.text((2, 16), f"{y1:.2f}", fill="gray")
    d.text((2, 20 + plot_h - 10), f"{y0:.2f}", fill="gray")
    d.text((40, height - 14), f"{x0:g} … {x1:g} {x_label}", fill="gray")
    for i, (name, pts) in enumerate(series.items()):
        colour = palette[i % len(palette)]
        xy = [(sx(x), sy(y)) for x, y in sorted(pts)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((width - 125, 20 + 13 * i), name[:20], fill=colour)
    return img


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


def kept_preview(image: Image.Image, kept, grid: tuple[int, int], scale: int = 3) -> Image.Image:
    """An exported image with its dropped patches shaded (half grey), so the kept tokens stand out."""
    import numpy as np

    arr = np.asarray(image.convert("RGB")).astype(np.float32)
    keep = np.zeros(grid[0] * grid[1], bool)
    keep[np.asarray(kept, dtype=int)] = True
    ph, pw = image.height // grid[0], image.width // grid[1]
    for idx in np.where(~keep)[0]:
        r, c = divmod(int(idx), grid[1])
        arr[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 0.35 * arr[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] + 0.65 * 128
    shaded = Image.fromarray(arr.astype("uint8"))
    return shaded.resize((shaded.width * scale, shaded.height * scale), Image.NEAREST)
