"""Storage: the Parquet warehouse (atomic writes) and the DuckDB catalog (schema, lineage)."""
from .catalog import (Catalog, CatalogLocked, LineageRow, replace_checkpoints, replace_drop, replace_training_set,
                      upsert_model, write_lineage)
from .commits import CommitLog, apply_ops, drop_op, drop_status_op, lineage_op
from .warehouse import DATA_DIR_ENV, Warehouse, atomic_path, default_data_dir

__all__ = ["Catalog", "CatalogLocked", "CommitLog", "apply_ops", "drop_op", "drop_status_op", "lineage_op", "DATA_DIR_ENV", "LineageRow", "Warehouse", "atomic_path",
           "default_data_dir", "replace_checkpoints", "replace_drop", "replace_training_set", "upsert_model",
           "write_lineage"]
