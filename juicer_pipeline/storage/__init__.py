"""Storage: the Parquet warehouse (atomic writes) and the DuckDB catalog (schema, records, lineage, results).

- `warehouse.py`: Parquet partitions and objects, written atomically (local or fsspec)
- `catalog.py`: the DuckDB file, short retried transactions, snapshots, views
- `schema.py`: the catalog's migrations
- `records.py`: writes of drops, models, training sets, checkpoints and lineage rows
- `commits.py`: the commit log executors append to, folded into the catalog
- `lineage.py`: tracing a score or an export back to its inputs
- `contract_queries.py`: the queries behind the asset checks
- `training_inputs.py`: the juiced samples a training set is assembled from
- `results.py`: benchmark scores and the recipe comparison (the SQL the UI, CLI and report read)
"""
from .catalog import Catalog, CatalogLocked
from .commits import CommitLog, apply_ops, drop_op, drop_status_op, lineage_op
from .records import (LineageRow, mark_drop, replace_checkpoints, replace_drop, replace_training_set, upsert_model,
                      write_lineage)
from .warehouse import DATA_DIR_ENV, Warehouse, atomic_path, default_data_dir

__all__ = ["Catalog", "CatalogLocked", "CommitLog", "apply_ops", "drop_op", "drop_status_op", "lineage_op", "DATA_DIR_ENV",
           "LineageRow", "Warehouse", "atomic_path", "default_data_dir", "mark_drop", "replace_checkpoints",
           "replace_drop", "replace_training_set", "upsert_model", "write_lineage"]
