"""Storage: the Parquet warehouse (atomic writes) and the DuckDB catalog (schema, lineage)."""
from .catalog import Catalog, CatalogLocked, LineageRow, replace_drop, upsert_model, write_lineage
from .warehouse import DATA_DIR_ENV, Warehouse, atomic_path, default_data_dir

__all__ = ["Catalog", "CatalogLocked", "DATA_DIR_ENV", "LineageRow", "Warehouse", "atomic_path",
           "default_data_dir", "replace_drop", "upsert_model", "write_lineage"]
