"""The samples an export writes: a recipe's training set members, read side by side with their juice
(raw image and caption, saliency, classes), as the governor saw them."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..governance.images import load_rgb
from ..governance.parquet_batches import iter_parquet_batches
from ..governance.pruning import kept_on_grid
from .request import ExportError, ExportRequest, GovernorInfo, grid_name, uid_for


def read_members(wh, recipe: str):
    if not wh.exists(wh.partition_path("training_set", recipe)):
        raise ExportError(f"recipe {recipe!r} has no training set yet: materialise training_set[{recipe}] first")
    members = wh.read_table("training_set", recipe).to_pandas()
    if members.empty:
        raise ExportError(f"the training set of recipe {recipe!r} has no members: nothing to export "
                          f"(see training_set_excluded for why)")
    return members


def read_excluded(wh, recipe: str) -> pa.Table:
    if not wh.exists(wh.partition_path("training_set_excluded", recipe)):
        return pa.table({"sample_id": pa.array([], pa.string()), "drop_id": pa.array([], pa.string()),
                         "reason": pa.array([], pa.string())})
    return wh.read_table("training_set_excluded", recipe, columns=["sample_id", "drop_id", "reason"])


def _rows(pf: pq.ParquetFile, columns: list[str], batch_rows: int = 256) -> Iterator[tuple]:
    for batch in iter_parquet_batches(pf, batch_rows, columns):
        yield from zip(*(batch.column(i).to_pylist() for i in range(len(columns))))


RAW_COLUMNS = ["sample_id", "status", "image", "caption", "width", "height", "url"]


def _juiced_batches(wh, drop: str, method: str, batch_rows: int = 256) -> Iterator[list[tuple]]:
    """(raw row, saliency row, classes row) of a drop's valid samples, in batches.

    patch_saliency and extracted_classes hold one row per valid raw sample, in raw row order (the
    governor scores them in that order), so the three files are read side by side, a row group at
    a time, instead of being joined in memory."""
    for asset in ("patch_saliency", "extracted_classes"):
        if not wh.exists(wh.partition_path(asset, drop)):
            raise ExportError(f"{asset} has no partition {drop!r}: juice the drop (job juice_drop) first")
    saliency = _rows(wh.parquet_file("patch_saliency", drop), ["sample_id", "grid_h", "grid_w", method])
    classes = _rows(wh.parquet_file("extracted_classes", drop), ["sample_id", "classes", "probs"])
    batch = []
    for raw in _rows(wh.parquet_file("raw_samples", drop), RAW_COLUMNS, batch_rows):
        if raw[1] != "valid":
            continue
        sal, cls = next(saliency, None), next(classes, None)
        if sal is None or cls is None or sal[0] != raw[0] or cls[0] != raw[0]:
            raise ExportError(f"patch_saliency or extracted_classes of drop {drop!r} is out of step with its "
                              f"raw_samples at {raw[0]!r}: re-materialise the drop's assets (job juice_drop)")
        batch.append((raw, sal, cls))
        if len(batch) == batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class Sample:
    key: str
    image: bytes
    fields: dict
    saliency: np.ndarray  # [gh, gw] float32
    kept: dict[str, np.ndarray]  # grid name -> 0-based row-major patch indices, no CLS
    picture: Image.Image | None = None  # kept for previews only


def _encode_image(image: Image.Image, lossless: bool, quality: int) -> bytes:
    buf = io.BytesIO()
    if lossless:
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class ExportPlan:
    """What every sample of one export shares: grids, K, image geometry."""

    def __init__(self, request: ExportRequest, governor: GovernorInfo, gov_grid: tuple[int, int]):
        self.request, self.governor, self.gov_grid = request, governor, gov_grid
        h, w = governor.geometry.size
        if h % gov_grid[0] or w % gov_grid[1]:
            raise ExportError(f"the governor's {w}x{h} images do not split into its {grid_name(gov_grid)} patch grid")
        self.patch = (h // gov_grid[0], w // gov_grid[1])
        self.has_kept = request.patches == "saliency"
        if request.grids and not self.has_kept:
            raise ExportError(f"recipe {request.recipe!r} trains on {request.patches} patches: it has no kept "
                              f"tokens to write on other grids (--grid applies to saliency recipes)")
        self.grids = [gov_grid] + [g for g in dict.fromkeys(request.grids) if g != gov_grid] if self.has_kept else []

    def kept_for_batch(self, maps: np.ndarray, stored: list) -> dict[str, list[np.ndarray]]:
        """Per grid, the kept indices of a batch: the training set's own on the governor's grid,
        on other grids the top ⌈ρN⌉ of the saliency map resampled as training resamples it."""
        out = {grid_name(self.gov_grid): [np.asarray(k, dtype=np.int16) for k in stored]}
        for grid in self.grids[1:]:
            out[grid_name(grid)] = kept_on_grid(maps, self.gov_grid, grid, self.request.rho)
        return out


def juiced_samples(wh, members, plan: ExportPlan) -> Iterator[Sample]:
    request = plan.request
    by_drop = {d: g.set_index("sample_id") for d, g in members.groupby("drop_id", sort=True)}
    for drop, wanted in by_drop.items():
        found = 0
        for batch in _juiced_batches(wh, drop, request.saliency_method):
            chosen = [(raw, sal, cls) for raw, sal, cls in batch if raw[0] in wanted.index]
            if not chosen:
                continue
            grid = (int(chosen[0][1][1]), int(chosen[0][1][2]))
            if grid != plan.gov_grid:
                raise ExportError(f"drop {drop!r} was scored on a {grid_name(grid)} grid, not the "
                                  f"{grid_name(plan.gov_grid)} of the other drops: re-juice it with one governor")
            maps = np.asarray([sal[3] for _, sal, _ in chosen], dtype=np.float32)
            rows = wanted.loc[[raw[0] for raw, _, _ in chosen]]
            kept = plan.kept_for_batch(maps, list(rows.kept)) if plan.has_kept else {}
            for i, ((raw, _, cls), member) in enumerate(zip(chosen, rows.itertuples())):
                yield _sample(raw, cls, member, maps[i], {g: k[i] for g, k in kept.items()}, plan)
            found += len(chosen)
        if found != len(wanted):
            raise ExportError(f"{len(wanted) - found} members of the training set of {request.recipe!r} are not "
                              f"valid samples of raw_samples/{drop}: re-materialise training_set[{request.recipe}]")


def _sample(raw: tuple, cls: tuple, member, saliency: np.ndarray, kept: dict, plan: ExportPlan) -> Sample:
    request = plan.request
    sid, _, data, original_caption, width, height, url = raw
    picture = plan.governor.geometry.apply(load_rgb(data))
    uid = uid_for(sid)
    fields = {"key": uid, "uid": uid, "sample_id": sid, "drop": member.drop_id, "content_hash": member.content_hash,
              "caption": member.train_caption, "caption_version": member.caption_version,
              "original_caption": original_caption, "classes": list(cls[1] or []),
              "class_probs": [float(p) for p in (cls[2] or [])], "rho": request.rho,
              "saliency_method": request.saliency_method, "governor_id": plan.governor.model_id,
              "original_width": width, "original_height": height, "width": picture.width, "height": picture.height,
              "url": url, "status": "success"}
    return Sample(uid, _encode_image(picture, request.lossless, request.jpeg_quality), fields,
                   saliency.reshape(plan.gov_grid), kept, picture)


def governor_grid(wh, members) -> tuple[int, int]:
    drop = sorted(set(members.drop_id))[0]
    if not wh.exists(wh.partition_path("patch_saliency", drop)):
        raise ExportError(f"patch_saliency has no partition {drop!r}: juice the drop (job juice_drop) first")
    first = wh.parquet_file("patch_saliency", drop).read_row_group(0, columns=["grid_h", "grid_w"])
    return int(first.column(0)[0].as_py()), int(first.column(1)[0].as_py())

