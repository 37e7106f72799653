"""Helpers for hand-made drops and running the drop job."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from PIL import Image

from dagster import AssetKey

from juicer_pipeline.definitions import DROP_JOB_NAME, GOVERNOR_JOB_NAME, build_definitions
from juicer_pipeline.settings import JuicerSettings


def png_bytes(size=(32, 32), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, "PNG")
    return buf.getvalue()


def write_folder_drop(root: Path, files: dict[str, bytes], rows: list[dict], manifest: str = "parquet") -> Path:
    """A hand-made folder drop: files relative to the drop, manifest rows as given."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    df = pd.DataFrame(rows)
    if manifest == "parquet":
        df.to_parquet(root / "captions.parquet", index=False)
    elif manifest == "csv":
        df.to_csv(root / "captions.csv", index=False)
    else:
        df.to_json(root / "captions.jsonl", orient="records", lines=True)
    return root


def run_drop(data_dir: Path, instance, drop: str, settings: JuicerSettings | None = None, raise_on_error=True,
             assets: tuple[str, ...] | None = ("raw_samples",)):
    """Run the drop job for one partition; by default only ingestion (`assets=None`: every stage)."""
    defs = build_definitions(settings=settings, data_dir=data_dir)
    if drop not in instance.get_dynamic_partitions("drops"):
        instance.add_dynamic_partitions("drops", [drop])
    selection = [AssetKey(a) for a in assets] if assets else None
    return defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(
        partition_key=drop, instance=instance, raise_on_error=raise_on_error, asset_selection=selection,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})


def run_governor(data_dir: Path, instance, settings: JuicerSettings):
    defs = build_definitions(settings=settings, data_dir=data_dir)
    return defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
        instance=instance, asset_selection=[AssetKey("governor")],
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
