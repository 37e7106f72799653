"""The output folder of an export: staged, then published whole (locally or on object storage)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .request import MANIFEST, ExportError


class Stage:
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
    def open(self) -> Iterator["Stage"]:
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

