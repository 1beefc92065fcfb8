"""The four stages driven by hand, one after the other, as a library user would call them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from cluster_kinds import local_services
from multicloud import (
    DataIngestionEngine,
    DistributionCoordinator,
    NodeRegistry,
    PipelineConfig,
    ProcessedChunk,
    ProcessingWorkerPool,
    StorageManager,
)
from multicloud.blob import decode_blob
from multicloud.pipeline.ingestion import pack_bytes


@pytest.fixture
def test_config(make_dataset: Callable[..., Path]) -> dict[str, object]:
    """A batch of the generated dataset, sourced in AWS."""
    return {"batch_id": "handoff", "data_source": str(make_dataset("aws_s3_simulation",
                                                                    size=1024 * 1024))}


@pytest.fixture
async def coordinator(node_registry: NodeRegistry,
                      config: PipelineConfig) -> AsyncIterator[DistributionCoordinator]:
    coordinator = DistributionCoordinator(node_registry, config.distribution)
    yield coordinator
    await coordinator.drain()
    coordinator.close()


@pytest.fixture
def storage(node_registry: NodeRegistry, config: PipelineConfig) -> Iterator[StorageManager]:
    manager = StorageManager(node_registry, config.storage, distribution=config.distribution)
    yield manager
    manager.close()


async def processed_batch(node_registry: NodeRegistry, config: PipelineConfig,
                          test_config: dict[str, object]) -> list[ProcessedChunk]:
    chunks = await DataIngestionEngine(node_registry, config.ingestion).ingest_batch(test_config)
    return await ProcessingWorkerPool(node_registry, config.processing).process_chunks(chunks)


async def test_ingestion_to_processing_handoff(node_registry: NodeRegistry,
                                               config: PipelineConfig,
                                               test_config: dict[str, object]) -> None:
    """Test data flows correctly between stages (the request's test)."""
    ingestion = DataIngestionEngine(node_registry, config.ingestion)
    processing = ProcessingWorkerPool(node_registry, config.processing)

    # Ingest data
    chunks = await ingestion.ingest_batch(test_config)

    # Process ingested chunks
    results = await processing.process_chunks(chunks)

    # Verify no data loss
    assert len(results) == len(chunks)
    assert all(r.result is not None for r in results)

    assert chunks
    assert ingestion.stats.chunks == len(chunks)
    assert [r.chunk for r in results] == chunks  # same chunks, same order
    for result in results:
        assert result.error is None
        assert result.result is not None
        assert result.result.chunk_id == result.chunk.chunk_id
        assert result.result.raw_size == result.chunk.size_bytes
        # Data locality: an AWS source is processed on AWS nodes.
        assert node_registry.nodes[result.node_id].cloud == "aws"
        # The staged blob on that node decodes back to the chunk's bytes.
        staged = local_services(node_registry)[result.node_id].staged_blob(result.chunk.chunk_id)
        assert staged is not None
        raw = decode_blob(staged, None, result.chunk.chunk_id)
        if result.chunk.members:  # small files packed together: their bytes in turn
            assert raw == pack_bytes(result.chunk)
            continue
        assert result.chunk.path is not None
        with result.chunk.path.open("rb") as handle:
            handle.seek(result.chunk.offset)
            assert raw == handle.read(result.chunk.size_bytes)
    assert processing.metrics.stages["processing"].success_rate == 1.0


async def test_stages_by_hand_store_every_chunk_at_three_replicas(
        node_registry: NodeRegistry, config: PipelineConfig, test_config: dict[str, object],
        coordinator: DistributionCoordinator, storage: StorageManager) -> None:
    processed = await processed_batch(node_registry, config, test_config)

    distributed = await coordinator.distribute_processed_chunks(processed)
    stored = await storage.store_distributed_chunks(distributed)

    assert len(distributed) == len(stored) == len(processed)
    assert coordinator.metrics.replicas.success_rate == 1.0
    assert all(s.committed for s in stored)
    assert all(len(s.replicas) >= config.distribution.write_quorum for s in stored)
    for d in distributed:  # every write finished (drained): all three are in the result
        holders = [ack.node_id for ack in d.replicas]
        assert len(holders) == 3, (d.chunk.file, holders)
        assert {node_registry.nodes[n].cloud for n in holders} == {"aws", "gcp"}
        for node_id in holders:
            assert await local_services(node_registry)[node_id].check(d.chunk.chunk_id) == "ok"
    # The stages used on their own record no batch: nothing was written to a manifest.
    assert node_registry.data_dir is not None
    assert not (node_registry.data_dir / "manifest.db").exists()


async def test_distribute_processed_chunks_reports_every_replica(
        node_registry: NodeRegistry, config: PipelineConfig, test_config: dict[str, object],
        coordinator: DistributionCoordinator, storage: StorageManager) -> None:
    processed = await processed_batch(node_registry, config, test_config)

    distributed = await coordinator.distribute_processed_chunks(processed)
    stored = await storage.store_distributed_chunks(distributed)

    assert all(len(d.replicas) == 3 for d in distributed)
    assert [s.replicas for s in stored] == [[a.node_id for a in d.replicas] for d in distributed]
