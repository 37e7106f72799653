"""Thin Dagster wrappers: read inputs, call governance/, write through storage/, emit metadata."""
