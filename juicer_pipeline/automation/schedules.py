"""Nightly (configurable) retraining: one run per recipe, of the stale assets only."""
from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from ..governance.recipes import RECIPE_NAMES


def build_retrain_schedule(job, cron: str):
    @schedule(job=job, cron_schedule=cron, default_status=DefaultScheduleStatus.RUNNING,
              description="Re-assemble, retrain and re-score every recipe whose inputs or settings changed "
                          "(stale assets only: nothing is recomputed when nothing changed).")
    def retrain_recipes(context: ScheduleEvaluationContext):
        day = context.scheduled_execution_time.strftime("%Y-%m-%d")
        return [RunRequest(partition_key=r, run_key=f"{r}:{day}", stale_assets_only=True) for r in RECIPE_NAMES]

    return retrain_recipes
