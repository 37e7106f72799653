"""The executor every job runs on, chosen by settings (`[execution]`), never by code changes.

The executor's own config block (`[execution.config]`) is validated against the executor's schema
when the code location loads, so a typo in a broker URL key fails there with the schema's message,
not at the first run.
"""
from __future__ import annotations

from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor
from dagster._config import process_config

from .settings import ExecutionSettings, SettingsError


def _executor_def(name: str) -> ExecutorDefinition:
    if name == "in_process":
        return in_process_executor
    if name == "multiprocess":
        return multiprocess_executor
    # imported only when chosen: a machine running the default needs neither package's servers
    if name == "celery":
        from dagster_celery import celery_executor
        return celery_executor
    if name == "k8s":
        from dagster_k8s import k8s_job_executor
        return k8s_job_executor
    raise SettingsError(f"unknown executor {name!r}")


def check_executor_config(executor_def: ExecutorDefinition, config: dict) -> dict:
    """The config with the executor's defaults filled in; a clear SettingsError if it does not fit."""
    result = process_config(executor_def.config_schema.config_type, config)
    if not result.success:
        problems = "\n".join(f"  - {e.message}" for e in result.errors or [])
        raise SettingsError(f"[execution.config] does not fit the {executor_def.name} executor:\n{problems}")
    return result.value


def build_executor(settings: ExecutionSettings) -> ExecutorDefinition | None:
    """None keeps Dagster's default (multiprocess, or in-process for in-process runs)."""
    if settings.executor == "multiprocess" and not settings.config:
        return None
    executor_def = _executor_def(settings.executor)
    check_executor_config(executor_def, settings.config)
    return executor_def.configured(settings.config) if settings.config else executor_def
