"""The drop sensor (each new complete folder under drops/ becomes a partition and one run; each
drop's content is versioned) and the catalog committer."""
import json

from dagster import (AssetKey, AssetObservation, AssetRecordsFilter, DefaultSensorStatus, RunRequest,
                     SensorEvaluationContext, SensorResult, SkipReason, sensor)
# The tag under which Dagster keeps an observation's data version (what observable source assets write).
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from ..assets.ingest import DROP_VERSION_KEY
from ..assets.partitions import drops_partitions
from ..assets.resources import StorageResource
from ..governance.drop_fingerprint import DELETED_VERSION, DropFingerprint
from ..storage import drop_status_op
from .drops import DropVersions, look_at_drops, scan_drops


def build_drop_sensor(job):
    @sensor(job=job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
            description="Adds a `drops` partition and requests one run for every new complete folder under the "
                        "drops directory (a _READY marker, a manifest, or .tar shards); observes every drop's "
                        "content version (drop_files), re-juices a drop whose files changed, and marks a drop "
                        "whose folder was deleted.")
    def drop_sensor(context: SensorEvaluationContext, storage: StorageResource):
        drops_dir = storage.warehouse.drops_dir
        known = set(context.instance.get_dynamic_partitions(drops_partitions.name))
        scan = scan_drops(drops_dir, known)
        for name in scan.invalid_names:
            context.log.warning(f"ignoring drop folder {name!r}: use letters, digits, '_', '.', '-' only")
        if scan.incomplete:
            context.log.info(f"waiting for incomplete drops: {', '.join(scan.incomplete)}")
        look = look_at_drops(drops_dir, sorted(known | set(scan.new)), json.loads(context.cursor or "{}"))
        runs = [RunRequest(partition_key=k, run_key=f"drop:{k}") for k in scan.new]
        runs += [RunRequest(partition_key=k, tags={"juicer/drop_version": fp.version})
                 for k, fp in look.changed.items() if k not in scan.new and _needs_juicing(context, k, fp, look)]
        if look.deleted:
            context.log.warning(f"drop folder(s) deleted: {', '.join(look.deleted)}; their catalog rows are marked "
                                f"'deleted' and new training sets leave them out")
        marks = [drop_status_op(k, "deleted") for k in look.deleted]
        if marks:
            storage.commit(marks)
        events = [_observation(k, fp) for k, fp in look.changed.items()] + [_observation(k, None) for k in look.deleted]
        if not events and not scan.new:
            return SkipReason(f"no new or changed drop in {drops_dir}")
        return SensorResult(
            run_requests=runs, asset_events=events, cursor=json.dumps(look.seen, sort_keys=True),
            dynamic_partitions_requests=[drops_partitions.build_add_request(scan.new)] if scan.new else [],
        )

    return drop_sensor


def _observation(drop: str, fingerprint: DropFingerprint | None) -> AssetObservation:
    """drop_files[drop] at its current version (data versions travel as this tag, as observable
    source assets record them)."""
    if fingerprint is None:
        return AssetObservation("drop_files", partition=drop, tags={DATA_VERSION_TAG: DELETED_VERSION},
                                metadata={"status": "deleted"})
    return AssetObservation("drop_files", partition=drop, tags={DATA_VERSION_TAG: fingerprint.version},
                            metadata={"status": "present", "files": fingerprint.n_files, "bytes": fingerprint.n_bytes})


def _needs_juicing(context: SensorEvaluationContext, drop: str, fingerprint: DropFingerprint,
                   look: DropVersions) -> bool:
    """Whether a known drop whose version differs from the last look must be ingested again: it
    came back after a deletion, or raw_samples last ingested another version of it. (Without a
    cursor, after a reset, every drop differs from the last look; most were ingested as they are.)"""
    if drop in look.restored:
        return True
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("raw_samples"), asset_partitions=[drop]), limit=1).records
    if not records:
        return True  # never ingested (its first run failed): try again
    ingested = records[0].asset_materialization.metadata.get(DROP_VERSION_KEY)
    if ingested is None:  # ingested before drops had versions: observed as it is now, not re-juiced
        return False
    changed = ingested.value != fingerprint.version
    if changed:
        context.log.info(f"drop {drop} changed since it was ingested ({ingested.value[:12]} -> "
                         f"{fingerprint.version[:12]}, {fingerprint.n_files} files): re-juicing it")
    return changed


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
