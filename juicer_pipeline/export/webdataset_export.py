"""A recipe's training set as WebDataset shards that open_clip_train and DataComp-style tools read.

The layout is img2dataset's, plus the juice (no Dagster import; the asset and `juicer export`
both call `export_training_set`)::

    DIR/shards/00000.tar        KEY.jpg (or .png), KEY.txt, KEY.json, KEY.saliency.npy, KEY.kept.<h>x<w>.npy
    DIR/shards/00000.parquet    the KEY.json fields, one row per sample
    DIR/shards/00000_stats.json
    DIR/shards/sizes.json       samples per shard (open_clip_train looks for it beside the shards)
    DIR/uids.npy                DataComp's subset format: the sorted uids as a structured (u8, u8) array
    DIR/excluded.parquet        the samples the recipe left out, with the reason
    DIR/open_clip_model/open_clip_config.json   a stock open_clip ViT on the export's patch grid
    DIR/manifest.json           what the export is and where it came from (written last)

A key is the sample's uid (32 hex digits, no dot: open_clip_train's webdataset splits the member
name at the first dot). Images are written as the governor saw them (its preprocess up to the
tensor conversion), so the stored patch indices line up with the image's own patch grid.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from ..governance.images import load_rgb
from ..governance.parquet_batches import iter_parquet_batches
from ..governance.pruning import kept_on_grid
from ..storage.warehouse import sha256_file

SCHEMA_VERSION = 1
UID_DTYPE = np.dtype("u8,u8")  # DataComp's subset files: np.load(f).dtype == np.dtype("u8,u8")
MANIFEST = "manifest.json"
PREVIEWS = 4
# Each image reaches the model whole, at the export's size, only under augmentations that keep
# the full frame: open_clip_train's RandomResizedCrop at scale (1, 1) on a square image falls
# back to the whole image; any smaller scale, a flip or a non-square resize moves the patch grid.
AUGMENTATION_NOTE = ("the kept indices address the exported image's patch grid: train on whole, unflipped images "
                     "at the exported size (open_clip_train: --aug-cfg scale='(1.0,1.0)', no flips)")

# the fields of KEY.json and of the per-shard Parquet file
SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("sample_id", pa.string()), ("drop", pa.string()),
    ("content_hash", pa.string()), ("caption", pa.string()), ("caption_version", pa.string()),
    ("original_caption", pa.string()), ("classes", pa.list_(pa.string())), ("class_probs", pa.list_(pa.float32())),
    ("rho", pa.float32()), ("saliency_method", pa.string()), ("governor_id", pa.string()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("url", pa.string()), ("status", pa.string()),
])


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


# --- the output folder: staged, then published whole ---------------------------------------------

class _Stage:
    """Files of an export being written. Locally they are written into a hidden sibling folder that
    is renamed into place at the end; on object storage each file is uploaded whole, and the
    manifest, uploaded last, is what makes the export visible (readers start from it)."""

    def __init__(self, out: str, storage_options: dict | None):
        self.out = out
        self.fs, self.path = fsspec.core.url_to_fs(out, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.written: dict[str, int] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None

    def file(self, rel: str) -> Path:
        """A local path to write `rel` to; `publish(rel)` then makes it part of the export."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, rel: str) -> None:
        local = self.root / rel
        self.written[rel] = local.stat().st_size
        if not self.local:  # uploaded whole: an object appears complete or not at all
            self.fs.put_file(str(local), f"{self.path}/{rel}")
            local.unlink()

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.file(rel).write_bytes(data)
        self.publish(rel)

    @contextlib.contextmanager
    def open(self) -> Iterator["_Stage"]:
        if self.local:
            with self._local_stage():
                yield self
        else:
            with self._remote_stage():
                yield self

    @contextlib.contextmanager
    def _local_stage(self):
        final = Path(self.path)
        if final.exists() and not final.is_dir():
            raise ExportError(f"{self.out} exists and is not a folder: choose a folder for the export")
        _refuse_foreign_folder(self.out, final.is_dir() and any(final.iterdir()), (final / MANIFEST).exists())
        started = time.time()
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.root = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
            self.root.mkdir()
        except OSError as exc:
            raise ExportError(f"cannot write an export at {self.out}: {exc}") from exc
        try:
            yield
            _swap_into_place(self.root, final)
            _remove_leftovers(final, started)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def _remote_stage(self):
        exists = self.fs.exists(self.path)
        has_manifest = self.fs.exists(f"{self.path}/{MANIFEST}")
        _refuse_foreign_folder(self.out, exists and bool(self.fs.ls(self.path)), has_manifest)
        if has_manifest:  # from here on the old export is no longer a whole one
            self.fs.rm(f"{self.path}/{MANIFEST}")
        with tempfile.TemporaryDirectory(prefix="juicer-export-") as scratch:
            self.root = Path(scratch)
            yield
        # objects of an earlier, larger export that this one did not rewrite
        for stale in set(self._listed()) - set(self.written):
            self.fs.rm(f"{self.path}/{stale}")

    def _listed(self) -> list[str]:
        base = self.path.rstrip("/") + "/"
        return [p[len(base):] for p in self.fs.find(self.path) if p.startswith(base)]


def _refuse_foreign_folder(where, non_empty: bool, is_export: bool) -> None:
    """Replacing an earlier export is fine; replacing someone's folder of other files is not."""
    if non_empty and not is_export:
        raise ExportError(f"{where} exists and is not a juicer export (no {MANIFEST}): refusing to replace it; "
                          f"choose a new or empty folder")


def _swap_into_place(staged: Path, final: Path) -> None:
    """Rename the finished folder to `final`; an earlier export there is moved aside first and
    removed after, so a reader finds the old export, then the new one (never a mix)."""
    if not final.exists():
        os.replace(staged, final)
        return
    old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(final: Path, before: float) -> None:
    """Hidden staging folders of `final` begun before this export: left by a killed export."""
    for old in final.parent.glob(f".{final.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if old.stat().st_mtime < before:
                shutil.rmtree(old, ignore_errors=True)


# --- reading the juice ----------------------------------------------------------------------------

def _read_members(wh, recipe: str):
    if not wh.exists(wh.partition_path("training_set", recipe)):
        raise ExportError(f"recipe {recipe!r} has no training set yet: materialise training_set[{recipe}] first")
    members = wh.read_table("training_set", recipe).to_pandas()
    if members.empty:
        raise ExportError(f"the training set of recipe {recipe!r} has no members: nothing to export "
                          f"(see training_set_excluded for why)")
    return members


def _read_excluded(wh, recipe: str) -> pa.Table:
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
class _Sample:
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


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class _Plan:
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


def _samples(wh, members, plan: _Plan) -> Iterator[_Sample]:
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


def _sample(raw: tuple, cls: tuple, member, saliency: np.ndarray, kept: dict, plan: _Plan) -> _Sample:
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
    return _Sample(uid, _encode_image(picture, request.lossless, request.jpeg_quality), fields,
                   saliency.reshape(plan.gov_grid), kept, picture)


# --- writing shards -------------------------------------------------------------------------------

class _Shards:
    """Tar shards of at most `samples_per_shard` samples, each with its Parquet table and stats,
    published as soon as it is complete (one shard's rows in memory at a time)."""

    def __init__(self, stage: _Stage, plan: _Plan):
        self.stage, self.plan = stage, plan
        self.image_ext = "png" if plan.request.lossless else "jpg"
        self.done: list[dict] = []
        self.members = {"uid": [], "key": [], "shard": [], "sample_id": []}
        self._writer, self._rows = None, []

    def add(self, sample: _Sample) -> None:
        if self._writer is None:
            self._name = f"{len(self.done):05d}"
            self._path = self.stage.file(f"shards/{self._name}.tar")
            self._writer = wds.TarWriter(str(self._path), encoder=False, mtime=0)  # reproducible bytes
        record = {"__key__": sample.key, self.image_ext: sample.image, "txt": sample.fields["caption"].encode(),
                  "json": json.dumps(sample.fields, sort_keys=True).encode(), "saliency.npy": _npy(sample.saliency)}
        record.update({f"kept.{g}.npy": _npy(k) for g, k in sample.kept.items()})
        self._writer.write(record)
        self._rows.append(sample.fields)
        for col, value in (("uid", sample.fields["uid"]), ("key", sample.key), ("shard", f"{self._name}.tar"),
                           ("sample_id", sample.fields["sample_id"])):
            self.members[col].append(value)
        if len(self._rows) == self.plan.request.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        digest, size = sha256_file(self._path), self._path.stat().st_size
        self.stage.publish(f"shards/{self._name}.tar")
        pq.write_table(pa.Table.from_pylist(self._rows, SAMPLE_SCHEMA), self.stage.file(f"shards/{self._name}.parquet"))
        self.stage.publish(f"shards/{self._name}.parquet")
        stats = {"count": len(self._rows), "successes": len(self._rows), "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": len(self._rows)}, "tar_bytes": size,
                 "sha256": digest}
        self.stage.write_bytes(f"shards/{self._name}_stats.json", json.dumps(stats, indent=1).encode())
        self.done.append({"name": f"{self._name}.tar", "samples": len(self._rows), "bytes": size, "sha256": digest})
        self._writer, self._rows = None, []


def _governor_grid(wh, members) -> tuple[int, int]:
    drop = sorted(set(members.drop_id))[0]
    if not wh.exists(wh.partition_path("patch_saliency", drop)):
        raise ExportError(f"patch_saliency has no partition {drop!r}: juice the drop (job juice_drop) first")
    first = wh.parquet_file("patch_saliency", drop).read_row_group(0, columns=["grid_h", "grid_w"])
    return int(first.column(0)[0].as_py()), int(first.column(1)[0].as_py())


def export_training_set(wh, out: str, request: ExportRequest, governor: GovernorInfo,
                        storage_options: dict | None = None, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Write `request.recipe`'s training set to `out` (a local folder or any fsspec URL) and return
    what was written. Memory holds one batch of images and one shard's table rows; the export
    becomes visible whole, replacing an earlier export at `out`, or not at all."""
    if request.samples_per_shard < 1:
        raise ExportError(f"samples_per_shard must be at least 1, got {request.samples_per_shard}")
    members = _read_members(wh, request.recipe)
    excluded = _read_excluded(wh, request.recipe)
    plan = _Plan(request, governor, _governor_grid(wh, members))
    stage = _Stage(out, storage_options)
    previews: list[dict] = []
    with stage.open():
        shards = _Shards(stage, plan)
        if request.uids_only:
            shards.members = {"uid": [uid_for(s) for s in members.sample_id], "key": [None] * len(members),
                              "shard": [None] * len(members), "sample_id": list(members.sample_id)}
        else:
            for n, sample in enumerate(_samples(wh, members, plan), 1):
                shards.add(sample)
                if len(previews) < PREVIEWS:
                    previews.append({"image": sample.picture, "caption": sample.fields["caption"],
                                     "classes": sample.fields["classes"], "sample_id": sample.fields["sample_id"],
                                     "kept": sample.kept.get(grid_name(plan.gov_grid)), "grid": plan.gov_grid})
                if progress and n % 5000 == 0:
                    progress(f"{request.recipe}: {n} of {len(members)} samples exported")
            shards.close_shard()
            stage.write_bytes("shards/sizes.json", json.dumps({s["name"]: s["samples"] for s in shards.done},
                                                               indent=1).encode())
        stage.write_bytes("uids.npy", _npy(uids_array(shards.members["uid"])))
        pq.write_table(excluded, stage.file("excluded.parquet"))
        stage.publish("excluded.parquet")
        model_config = None if request.uids_only or request.open_clip_arch is None else \
            stock_open_clip_config(request.open_clip_arch, governor.geometry.size, plan.patch)
        if model_config:
            stage.write_bytes("open_clip_model/open_clip_config.json", json.dumps(model_config, indent=1).encode())
        manifest = _manifest(request, governor, plan, members, shards.done, excluded, bool(model_config))
        stage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())  # last: it commits the export
    return ExportResult(out, manifest["export_id"], manifest, len(members), len(shards.done),
                        sum(stage.written.values()), pa.table(shards.members), previews)


def _manifest(request: ExportRequest, governor: GovernorInfo, plan: _Plan, members, shards: list[dict],
              excluded: pa.Table, has_model: bool) -> dict:
    h, w = governor.geometry.size
    ks = {grid_name(g): int(np.ceil(request.rho * g[0] * g[1] - 1e-9)) for g in plan.grids}
    stored_k = {len(k) for k in members.kept} if plan.has_kept else set()
    if plan.has_kept and stored_k != {ks[grid_name(plan.gov_grid)]}:
        raise ExportError(f"the training set's kept sets hold {sorted(stored_k)} patches, not ⌈ρN⌉ = "
                          f"{ks[grid_name(plan.gov_grid)]} at ρ = {request.rho}: re-materialise pruned_images and "
                          f"training_set[{request.recipe}] with the current settings")
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "juicer-export", "recipe": request.recipe,
        "training_set_id": str(members.training_set_id.iloc[0]), "samples": len(members),
        "uids_only": request.uids_only, "patches": request.patches,
        "caption_versions": {str(k): int(v) for k, v in members.caption_version.value_counts().sort_index().items()},
        "governor": {"model_id": governor.model_id, "source": governor.source, "card": governor.card},
        "provenance": request.provenance,
        "saliency": {"method": request.saliency_method, "rho": request.rho},
        "image": {"format": "png" if request.lossless else "jpg",
                  "jpeg_quality": None if request.lossless else request.jpeg_quality, "width": w, "height": h,
                  "patch_size": list(plan.patch), "governor_grid": list(plan.gov_grid),
                  "geometry": list(governor.geometry.description)},
        "grids": [{"name": grid_name(g), "h": g[0], "w": g[1], "k": ks[grid_name(g)], "file": f"kept.{grid_name(g)}.npy",
                   "source": "training set" if g == plan.gov_grid else "saliency resampled to this grid, top ⌈ρN⌉"}
                  for g in plan.grids],
        "augmentations": AUGMENTATION_NOTE,
        "shards": shards, "excluded": excluded.num_rows,
        "files": {"uids": "uids.npy", "excluded": "excluded.parquet",
                  **({} if request.uids_only else {"sizes": "shards/sizes.json"}),
                  **({"open_clip_model": "open_clip_model"} if has_model else {})},
        "uid": "sha256(sample_id) as 32 hex digits; uids.npy holds them as sorted (u8, u8) halves",
    }
    manifest["export_id"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return manifest


def stock_open_clip_config(arch, image_size: tuple[int, int], patch_size: tuple[int, int]) -> dict | None:
    """An open_clip_config.json for `local-dir:`: a stock ViT (patchify stem) with the student
    architecture's widths, on the export's image size and patch grid, so that the printed
    open_clip_train command trains without a download and `kept.<grid>.npy` fits its tokens."""
    from ..models.loader import OPENAI_MEAN, OPENAI_STD

    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        return None  # open_clip's ViT takes one patch size; non-square geometries need a config of one's own
    return {"model_cfg": {
        "embed_dim": arch.embed_dim,
        "vision_cfg": {"image_size": image_size[0], "patch_size": patch_size[0], "width": arch.vision_width,
                       "layers": arch.vision_layers, "head_width": arch.vision_width // arch.vision_heads},
        "text_cfg": {"context_length": arch.context_length, "vocab_size": 49408, "width": arch.text_width,
                     "heads": arch.text_heads, "layers": arch.text_layers}},
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                           "resize_mode": "squash"}}


def read_manifest(out: str, storage_options: dict | None = None) -> dict:
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    with fs.open(f"{path}/{MANIFEST}", "r") as f:
        return json.load(f)


def shard_pattern(out: str, n_shards: int) -> str:
    """The brace pattern open_clip_train's --train-data takes: DIR/shards/{00000..00003}.tar."""
    last = f"{n_shards - 1:05d}"
    return f"{out.rstrip('/')}/shards/{{00000..{last}}}.tar" if n_shards > 1 else f"{out.rstrip('/')}/shards/00000.tar"


def open_clip_train_command(out: str, manifest: dict, batch_size: int = 64, kept: bool = False) -> str:
    """The command that trains a stock open_clip CLIP on the export (with `kept`, through the
    kept-token launcher, on the governor's grid)."""
    pattern = shard_pattern(out, len(manifest["shards"]))
    model = f"local-dir:{out.rstrip('/')}/open_clip_model" if "open_clip_model" in manifest["files"] else "<model>"
    batch = min(batch_size, max(1, manifest["samples"]))
    args = (f"--train-data '{pattern}' --dataset-type webdataset --model {model} "
            f"--aug-cfg scale='(1.0,1.0)' --batch-size {batch} --epochs 1 --workers 0 --device cpu --precision fp32 "
            f"--lr 1e-3 --warmup 1 --save-frequency 0 --zeroshot-frequency 0 --report-to '' "
            f"--logs open_clip_logs")
    if kept:
        return f"python -m juicer_pipeline.export.open_clip_kept -- {args}"
    return f"python -m open_clip_train.main {args}"
