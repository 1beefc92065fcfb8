"""Storage keeps a hint per replica a committed chunk is short of, and takes it back when a
late write (or a repair) brings the chunk to the replication factor."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from multicloud import DistributionConfig, NodeRegistry, create_local_cluster
from multicloud.core.types import BlobInfo, Chunk, DistributedChunk, ReplicaAck
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.storage import StorageManager


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[NodeRegistry]:
    """aws-node-1, aws-node-2, gcp-node-1."""
    made = create_local_cluster(tmp_path / "cluster", {"aws": 2, "gcp": 1})
    yield made
    await made.close()


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[Manifest]:
    """A manifest with batch "b" running."""
    with Manifest(tmp_path / "manifest.db") as made:
        made.begin_batch("b", "src", "aws")
        yield made


@pytest.fixture
def storage(registry: NodeRegistry, manifest: Manifest) -> StorageManager:
    """Storage committing under batch "b" with RF 3, quorum 2."""
    made = StorageManager(registry, manifest=manifest, distribution=DistributionConfig())
    made.begin("b")
    return made


def distributed(name: str, acked: list[str], failed: list[str] | None = None,
                ) -> DistributedChunk:
    """A chunk that reached quorum on acked, after failed targets failed."""
    chunk_id = hashlib.sha256(name.encode()).hexdigest()
    blob = BlobInfo(chunk_id, 10, 10, "0" * 32, "raw")
    chunk = Chunk(chunk_id, f"{name}.bin", 0, 0, 10, "aws")
    acks = [ack(chunk_id, n) for n in acked]
    return DistributedChunk(chunk, blob, "aws-node-1", acks, list(failed or []))


def ack(chunk_id: str, node_id: str) -> ReplicaAck:
    """A verified replica of chunk_id on node_id."""
    return ReplicaAck(node_id, chunk_id, "0" * 32, 10, 0.01)


async def test_a_whole_chunk_gets_no_hint(storage: StorageManager, manifest: Manifest) -> None:
    storage.commit(distributed("whole", ["aws-node-1", "aws-node-2", "gcp-node-1"]))
    await storage.flush()
    assert manifest.hints() == {}


async def test_a_failed_target_is_named_and_a_missing_one_is_any_node(
        storage: StorageManager, manifest: Manifest) -> None:
    named = distributed("named", ["aws-node-1", "gcp-node-1"], failed=["aws-node-2"])
    anyone = distributed("anyone", ["aws-node-1", "gcp-node-1"])
    storage.commit(named)
    storage.commit(anyone)
    await storage.flush()
    assert manifest.hints() == {named.blob.chunk_id: ["aws-node-2"],
                                anyone.blob.chunk_id: ["*"]}
    assert manifest.replicas([named.blob.chunk_id]) == {
        named.blob.chunk_id: ["aws-node-1", "gcp-node-1"]}


async def test_a_late_ack_before_the_flush_leaves_no_hint_behind(
        storage: StorageManager, manifest: Manifest) -> None:
    chunk = distributed("late", ["aws-node-1", "gcp-node-1"])
    storage.commit(chunk)
    storage.record_late_ack(chunk, ack(chunk.blob.chunk_id, "aws-node-2"))
    await storage.flush()
    assert manifest.hints() == {}
    assert manifest.replicas([chunk.blob.chunk_id])[chunk.blob.chunk_id] == [
        "aws-node-1", "aws-node-2", "gcp-node-1"]


async def test_a_late_ack_after_the_flush_takes_the_hint_back(
        storage: StorageManager, manifest: Manifest) -> None:
    chunk = distributed("later", ["aws-node-1", "gcp-node-1"])
    storage.commit(chunk)
    await storage.flush()
    assert manifest.hints() == {chunk.blob.chunk_id: ["*"]}
    assert storage.unrecorded(chunk.blob.chunk_id) == []

    storage.record_late_ack(chunk, ack(chunk.blob.chunk_id, "aws-node-2"))
    assert storage.unrecorded(chunk.blob.chunk_id) == ["aws-node-2"]
    await storage.flush()

    assert manifest.hints() == {}
    assert len(manifest.replicas([chunk.blob.chunk_id])[chunk.blob.chunk_id]) == 3


async def test_a_repair_that_makes_the_chunk_whole_takes_its_hints_back(
        storage: StorageManager, manifest: Manifest) -> None:
    chunk = distributed("repaired", ["aws-node-1", "gcp-node-1"], failed=["aws-node-2"])
    storage.commit(chunk)
    await storage.flush()
    storage.record_replica(chunk.blob.chunk_id, "aws-node-2")
    await storage.flush()
    assert manifest.hints() == {}


async def test_the_stage_on_its_own_records_no_hint(registry: NodeRegistry,
                                                    manifest: Manifest) -> None:
    alone = StorageManager(registry, manifest=manifest, distribution=DistributionConfig())
    stored = await alone.store_distributed_chunks([distributed("alone", ["aws-node-1",
                                                                         "gcp-node-1"])])
    assert stored[0].committed
    assert manifest.hints() == {}
