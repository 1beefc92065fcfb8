"""Shared fixtures: a real embedded cluster per test, small chunks, small datasets."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from multicloud import (
    Cluster,
    PipelineConfig,
    PipelineOrchestrator,
    create_local_cluster,
    load_config,
)
from multicloud.datagen import generate_dataset

# Small chunks keep the suite fast while still giving every file several chunks.
CHUNK_MB = 0.0625  # 64 KiB
CHUNK_BYTES = int(CHUNK_MB * 1024 * 1024)


def small_config(**sections: dict[str, object]) -> PipelineConfig:
    """The shipped defaults with 64 KiB chunks, plus any section overrides."""
    config = load_config(None).replace(ingestion={"chunk_size_mb": CHUNK_MB})
    return config.replace(**sections) if sections else config


@pytest.fixture(autouse=True)
def _multicloud_log_level() -> Iterator[None]:
    """The CLI's main() quiets the multicloud logger; give the next test its level back."""
    logger = logging.getLogger("multicloud")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture
def config() -> PipelineConfig:
    """Default config with 64 KiB chunks."""
    return small_config()


@pytest.fixture
async def setup_test_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """An embedded cluster of 3 AWS and 3 GCP nodes under tmp_path (the request's name)."""
    registry = create_local_cluster(tmp_path / "cluster", {"aws": 3, "gcp": 3})
    yield registry
    await registry.close()


@pytest.fixture
def node_registry(setup_test_cluster: Cluster) -> Cluster:
    """Alias of setup_test_cluster."""
    return setup_test_cluster


@pytest.fixture
async def orchestrator(setup_test_cluster: Cluster,
                       config: PipelineConfig) -> AsyncIterator[PipelineOrchestrator]:
    """An orchestrator with 64 KiB chunks on the test cluster."""
    orch = PipelineOrchestrator(setup_test_cluster, config=config)
    yield orch
    await orch.close()


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Write a generated dataset under tmp_path/test_data/<name>; returns its path."""
    def make(name: str = "aws_s3_simulation", size: int = 2 * 1024 * 1024,
             seed: int = 0) -> Path:
        root = tmp_path / "test_data" / name
        generate_dataset(root, size, seed=seed, chunk_hint_bytes=CHUNK_BYTES)
        return root
    return make
