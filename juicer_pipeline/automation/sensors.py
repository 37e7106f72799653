"""The drop sensor: each new complete folder under drops/ becomes a partition and one run."""

from dagster import (DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason,
                     sensor)

from ..assets.partitions import drops_partitions
from ..assets.resources import StorageResource
from .drops import scan_drops


def build_drop_sensor(job):
    @sensor(job=job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
            description="Adds a `drops` partition and requests one run for every new complete folder "
                        "under the drops directory (a _READY marker, a manifest, or .tar shards).")
    def drop_sensor(context: SensorEvaluationContext, storage: StorageResource):
        known = set(context.instance.get_dynamic_partitions(drops_partitions.name))
        scan = scan_drops(storage.warehouse.drops_dir, known)
        for name in scan.invalid_names:
            context.log.warning(f"ignoring drop folder {name!r}: use letters, digits, '_', '.', '-' only")
        if scan.incomplete:
            context.log.info(f"waiting for incomplete drops: {', '.join(scan.incomplete)}")
        if not scan.new:
            return SkipReason(f"no new complete drop in {storage.warehouse.drops_dir}")
        return SensorResult(
            run_requests=[RunRequest(partition_key=k, run_key=f"drop:{k}") for k in scan.new],
            dynamic_partitions_requests=[drops_partitions.build_add_request(scan.new)],
        )

    return drop_sensor


def build_commit_sensor(interval_s: int, enabled: bool):
    """The one catalog writer when workers write commit records (`[catalog] writes`): the daemon
    evaluates a sensor in one process at a time, so folds are serial by construction."""
    @sensor(minimum_interval_seconds=interval_s,
            default_status=DefaultSensorStatus.RUNNING if enabled else DefaultSensorStatus.STOPPED,
            description="Folds the commit records that per-drop steps write (with `[catalog] writes = "
                        "\"commit_records\"`) into the DuckDB catalog, oldest first, one transaction each.")
    def catalog_committer(context: SensorEvaluationContext, storage: StorageResource):
        if not storage.uses_commit_records:
            return SkipReason("[catalog] writes = 'direct': steps write the catalog themselves")
        report = storage.fold_commits()
        return SkipReason(str(report))

    return catalog_committer
