"""The one storage resource every asset and sensor uses."""

from pathlib import Path

from dagster import ConfigurableResource, InitResourceContext

from ..storage import Catalog, Warehouse


class StorageResource(ConfigurableResource):
    """Data root holding the drops, the Parquet warehouse and the DuckDB catalog."""

    data_dir: str
    lock_timeout_s: float = 120.0  # settings: [catalog] lock_timeout_s

    @property
    def warehouse(self) -> Warehouse:
        return Warehouse(Path(self.data_dir))

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.warehouse.catalog_path, lock_timeout_s=self.lock_timeout_s)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self.catalog.migrate()
