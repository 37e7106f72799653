"""The lineage row an asset body records: one helper, so every asset names its inputs and nothing else."""
from ..storage import LineageRow, lineage_op
from .resources import StorageResource


def asset_version(context) -> str:
    """The code version of the asset being materialised, as its decorator declared it (typed once)."""
    return context.assets_def.code_versions_by_key[context.asset_key]


def commit_lineage(context, storage: StorageResource, inputs: list[str], config_hash: str,
                   governor_id: str | None) -> None:
    """Record that this run wrote the asset's partition from `inputs`, at its code version."""
    row = LineageRow(context.asset_key.to_user_string(), context.partition_key, inputs, context.run.run_id,
                     asset_version(context), config_hash, governor_id)
    storage.commit([lineage_op(row)])
