"""Shared fixtures: a temporary data root, tiny drops, and a Dagster instance to run jobs in."""
from __future__ import annotations

from pathlib import Path

import pytest
from dagster import instance_for_test

from juicer_pipeline.world import DropConfig, generate_drop


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    (root / "drops").mkdir(parents=True)
    monkeypatch.setenv("JUICER_DATA_DIR", str(root))
    monkeypatch.delenv("JUICER_CONFIG", raising=False)
    return root


@pytest.fixture
def instance():
    # A real (temporary, on-disk) instance: sensors need an instance ref to resolve partitions.
    with instance_for_test() as inst:
        yield inst


@pytest.fixture
def world_drop(data_dir) -> Path:
    return generate_drop(data_dir / "drops" / "w1", DropConfig(n_samples=120, broken_rate=0.05, seed=3)).path
