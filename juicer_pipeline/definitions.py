"""The one Definitions object of the code location: assets, jobs, sensors and resources."""
from __future__ import annotations

from pathlib import Path

from dagster import AssetSelection, Definitions, define_asset_job

from .assets.ingest import build_ingest_assets
from .assets.text import build_text_assets
from .assets.vision import build_vision_assets
from .assets.resources import StorageResource
from .automation.sensors import build_drop_sensor
from .settings import JuicerSettings, load_settings
from .storage import default_data_dir

DROP_JOB_NAME = "juice_drop"
GOVERNOR_JOB_NAME = "refresh_governor"


def build_assets(settings: JuicerSettings) -> tuple[list, list]:
    """(all assets, the per-drop ones that the drop job materialises)."""
    everything = [*build_ingest_assets(settings), *build_vision_assets(settings), *build_text_assets(settings)]
    per_drop = [a for a in everything if a.partitions_def is not None]
    return everything, per_drop


def build_definitions(settings: JuicerSettings | None = None, data_dir: Path | None = None) -> Definitions:
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    settings = settings or load_settings(data_dir=data_dir)
    all_assets, drop_assets = build_assets(settings)
    drop_job = define_asset_job(DROP_JOB_NAME, selection=AssetSelection.assets(*drop_assets),
                                description="Juice one drop: every per-drop asset for one partition.")
    governor_job = define_asset_job(GOVERNOR_JOB_NAME, selection=AssetSelection.assets("governor"),
                                    description="Resolve the governor, calibrate τ and record it in the catalog.")
    return Definitions(
        assets=all_assets,
        jobs=[drop_job, governor_job],
        sensors=[build_drop_sensor(drop_job)],
        resources={"storage": StorageResource(data_dir=str(data_dir))},
    )


defs = build_definitions()
