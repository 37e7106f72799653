"""The juiced dataset leaves the pipeline: WebDataset shards in img2dataset's layout (no Dagster import)."""
from .webdataset_export import (SCHEMA_VERSION, ExportError, ExportRequest, ExportResult, GovernorInfo,
                                ImageGeometry, export_training_set, governor_geometry, parse_grid, uid_for,
                                uids_array)

__all__ = ["SCHEMA_VERSION", "ExportError", "ExportRequest", "ExportResult", "GovernorInfo", "ImageGeometry",
           "export_training_set", "governor_geometry", "parse_grid", "uid_for", "uids_array"]
