"""The one storage resource every asset and sensor uses."""

from pathlib import Path

from dagster import ConfigurableResource, InitResourceContext

from ..storage import Catalog, CommitLog, Warehouse, apply_ops

_MIGRATED: set[str] = set()  # catalogs this process has brought to the current schema


class StorageResource(ConfigurableResource):
    """Data root holding the drops, the Parquet warehouse and the DuckDB catalog."""

    data_dir: str
    lock_timeout_s: float = 120.0  # settings: [catalog] lock_timeout_s
    memory_limit: str = "64MB"  # settings: [catalog] memory_limit
    writes: str = "direct"  # settings: [catalog] writes ('direct' | 'commit_records')
    warehouse_url: str = ""  # settings: [warehouse] url ('' = <data dir>/warehouse)
    storage_options: dict = {}  # settings: [warehouse] storage_options (fsspec)

    @classmethod
    def from_settings(cls, data_dir: Path, settings, **override) -> "StorageResource":
        """The resource for a data root and its settings (`JuicerSettings`), as the definitions build it."""
        return cls(**{"data_dir": str(data_dir), "lock_timeout_s": settings.catalog.lock_timeout_s,
                      "memory_limit": settings.catalog.memory_limit,
                      "writes": settings.catalog.writes, "warehouse_url": settings.warehouse.url or "",
                      "storage_options": settings.warehouse.storage_options, **override})

    @property
    def warehouse(self) -> Warehouse:
        return Warehouse(Path(self.data_dir), self.warehouse_url or None, dict(self.storage_options))

    @property
    def catalog(self) -> Catalog:
        wh = self.warehouse
        catalog = Catalog(wh.catalog_path, lock_timeout_s=self.lock_timeout_s, memory_limit=self.memory_limit,
                          filesystem=None if wh.is_local else wh.filesystem)
        if self.uses_commit_records and str(catalog.path) not in _MIGRATED:
            # only shared steps (governor, training) and the committer reach the catalog in this
            # mode: they run where it lives, and migrate it on first use
            catalog.migrate()
            _MIGRATED.add(str(catalog.path))
        return catalog

    @property
    def commit_log(self) -> CommitLog:
        return CommitLog(self.warehouse.commits_dir)

    @property
    def uses_commit_records(self) -> bool:
        return self.writes == "commit_records"

    def commit(self, ops: list[dict]) -> None:
        """Record a per-drop step's catalog rows: directly in one transaction, or as a commit record
        that the catalog_committer folds (then this step never opens the catalog)."""
        if self.uses_commit_records:
            self.commit_log.submit(ops)
            return
        self.catalog.write(lambda con: apply_ops(con, ops))
        self.catalog.refresh_views(self.warehouse)

    def fold_commits(self):
        """The committer's work: fold pending records, refresh the Parquet views, and publish a
        snapshot for readers (catalog-snapshot.duckdb), so that no reader ever opens the live file
        and the committer stays its only user."""
        catalog = self.catalog
        report = self.commit_log.fold(catalog)
        if report.folded or report.already or not catalog.snapshot_path.exists():
            catalog.refresh_views(self.warehouse)
            catalog.snapshot()
        return report

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # workers that write commit records never open the catalog, not even to migrate it
        if not self.uses_commit_records:
            self.catalog.migrate()
