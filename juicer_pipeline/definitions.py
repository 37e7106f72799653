"""The one Definitions object of the code location: assets, jobs, sensors and resources."""
from __future__ import annotations

from pathlib import Path

from dagster import (AssetSelection, AssetsDefinition, AutomationConditionSensorDefinition, DefaultSensorStatus, Definitions,
                     define_asset_job)

from .assets.checks import build_checks
from .assets.evaluation import build_eval_sets_asset, build_evaluation_assets
from .assets.export import build_export_assets
from .assets.ingest import build_ingest_assets
from .assets.text import build_text_assets
from .assets.training import build_training_assets
from .assets.vision import build_vision_assets
from .assets.partitions import drops_partitions
from .assets.resources import StorageResource
from .automation.schedules import build_retrain_schedule
from .automation.sensors import build_commit_sensor, build_drop_sensor
from .execution import build_executor
from .settings import JuicerSettings, load_settings
from .storage import default_data_dir

DROP_JOB_NAME = "juice_drop"
GOVERNOR_JOB_NAME = "prepare_shared"
RECIPES_JOB_NAME = "train_recipe"
COMPARE_JOB_NAME = "compare_recipes"
EXPORT_JOB_NAME = "export_recipe"


def build_assets(settings: JuicerSettings) -> tuple[list, list]:
    """(all assets, the per-drop ones that the drop job materialises)."""
    everything = [*build_ingest_assets(settings), *build_vision_assets(settings), *build_text_assets(settings),
                  *_across_drops(settings), *build_export_assets(settings)]
    per_drop = [a for a in everything if a.partitions_def is drops_partitions and isinstance(a, AssetsDefinition)]
    return everything, per_drop


def _across_drops(settings: JuicerSettings) -> list:
    """eval_sets, then per recipe: training_set → clip_checkpoint → benchmark_scores, and recipe_comparison."""
    eval_sets = build_eval_sets_asset(settings)
    training_set, clip_checkpoint = build_training_assets(settings, eval_sets)
    return [eval_sets, training_set, clip_checkpoint, *build_evaluation_assets(settings, clip_checkpoint, eval_sets)]


def build_definitions(settings: JuicerSettings | None = None, data_dir: Path | None = None) -> Definitions:
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    settings = settings or load_settings(data_dir=data_dir)
    all_assets, drop_assets = build_assets(settings)
    drop_job = define_asset_job(DROP_JOB_NAME, selection=AssetSelection.assets(*drop_assets),
                                description="Juice one drop: every per-drop asset for one partition.")
    recipes_job = define_asset_job(RECIPES_JOB_NAME, selection=AssetSelection.assets(
        "training_set", "clip_checkpoint", "benchmark_scores"),
        description="Assemble, train and score one recipe (one run per recipe partition).")
    compare_job = define_asset_job(COMPARE_JOB_NAME, selection=AssetSelection.assets("recipe_comparison"),
                                   description="Compare every scored recipe: table and chart.")
    governor_job = define_asset_job(GOVERNOR_JOB_NAME, selection=AssetSelection.assets("governor", "eval_sets"),
                                    description="Resolve the governor (calibrate τ, record it in the catalog) and "
                                                "ingest the held-out evaluation sets.")
    export_job = define_asset_job(EXPORT_JOB_NAME, selection=AssetSelection.assets("juiced_dataset"),
                                  description="Export one recipe's training set as WebDataset shards (juiced_dataset).")
    return Definitions(
        assets=all_assets,
        asset_checks=build_checks(settings),
        jobs=[drop_job, governor_job, recipes_job, compare_job, export_job],
        sensors=[build_drop_sensor(drop_job),
                 build_commit_sensor(settings.catalog.commit_interval_s, settings.catalog.writes == "commit_records"),
                 AutomationConditionSensorDefinition(
                     "automation", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING,
                     description="Re-materialises stale or missing per-drop partitions and shared assets "
                                 "(see juicer_pipeline/automation/conditions.py).")],
        schedules=[build_retrain_schedule(recipes_job, settings.training.schedule_cron)],
        resources={"storage": StorageResource.from_settings(data_dir, settings)},
        executor=build_executor(settings.execution),
    )


defs = build_definitions()
