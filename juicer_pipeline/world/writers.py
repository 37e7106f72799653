"""Write samples in the real drop formats: a folder with a manifest, or WebDataset shards.

Both writers build the drop under a hidden temporary folder and rename it into place at the
end, so a half-written drop is never visible to the drop sensor.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd

READY_MARKER = "_READY"
TRUTH_FILE = "_truth.parquet"


class _DropWriter:
    def __init__(self, final_dir: Path):
        self.final_dir = Path(final_dir)
        self.tmp_dir = self.final_dir.parent / f".{self.final_dir.name}.partial"
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self.truth_rows: list[dict] = []

    def add_truth(self, row: dict) -> None:
        self.truth_rows.append(row)

    def finish(self) -> Path:
        self._finish_format()
        if self.truth_rows:
            pd.DataFrame(self.truth_rows).to_parquet(self.tmp_dir / TRUTH_FILE, index=False)
        (self.tmp_dir / READY_MARKER).write_text("complete\n")
        if self.final_dir.exists():
            shutil.rmtree(self.final_dir)
        self.tmp_dir.rename(self.final_dir)
        return self.final_dir

    def _finish_format(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class FolderDropWriter(_DropWriter):
    """images/<file> plus captions.<parquet|csv|jsonl> with columns image, caption, sample_id, url[, label]."""

    def __init__(self, final_dir: Path, manifest_format: str = "parquet"):
        if manifest_format not in ("parquet", "csv", "jsonl"):
            raise ValueError(f"manifest_format must be parquet, csv or jsonl, not {manifest_format!r}")
        super().__init__(final_dir)
        self.manifest_format = manifest_format
        (self.tmp_dir / "images").mkdir()
        self.rows: list[dict] = []

    def add(self, sample_id: str, image_name: str, image_bytes: bytes | None, caption: str,
            url: str = "", label: str | None = None) -> None:
        if image_bytes is not None:  # None: a manifest row whose file is missing
            (self.tmp_dir / "images" / image_name).write_bytes(image_bytes)
        row = {"sample_id": sample_id, "image": f"images/{image_name}", "caption": caption, "url": url}
        if label is not None:
            row["label"] = label
        self.rows.append(row)

    def _finish_format(self) -> None:
        df = pd.DataFrame(self.rows)
        path = self.tmp_dir / f"captions.{self.manifest_format}"
        if self.manifest_format == "parquet":
            df.to_parquet(path, index=False)
        elif self.manifest_format == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_json(path, orient="records", lines=True, force_ascii=False)


class WebDatasetDropWriter(_DropWriter):
    """shard-NNNNN.tar files with KEY.<ext>, KEY.txt and KEY.json members, as img2dataset writes them."""

    def __init__(self, final_dir: Path, shard_size: int = 1000):
        super().__init__(final_dir)
        self.shard_size = shard_size
        self._count = 0
        self._tar: tarfile.TarFile | None = None

    def add(self, sample_id: str, image_name: str, image_bytes: bytes | None, caption: str,
            url: str = "", label: str | None = None) -> None:
        if self._count % self.shard_size == 0:
            self._close_shard()
            self._tar = tarfile.open(self.tmp_dir / f"shard-{self._count // self.shard_size:05d}.tar", "w")
        key = f"{self._count:09d}"
        ext = image_name.rsplit(".", 1)[-1]
        if image_bytes is not None:
            self._member(f"{key}.{ext}", image_bytes)
        self._member(f"{key}.txt", caption.encode("utf-8"))
        meta = {"sample_id": sample_id, "url": url, "key": key}
        if label is not None:
            meta["label"] = label
        self._member(f"{key}.json", json.dumps(meta).encode())
        self._count += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # deterministic bytes for a given seed
        self._tar.addfile(info, io.BytesIO(data))

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def _finish_format(self) -> None:
        self._close_shard()


def make_writer(final_dir: Path, fmt: str, manifest_format: str = "parquet", shard_size: int = 1000):
    if fmt == "folder":
        return FolderDropWriter(final_dir, manifest_format)
    if fmt == "wds":
        return WebDatasetDropWriter(final_dir, shard_size)
    raise ValueError(f"format must be 'folder' or 'wds', not {fmt!r}")
