"""Tests for the registry, worker nodes, the embedded cluster on disk and the node service.

What the nodes do over a carrier (replication, the ledger, faults, errors on the wire) is
the contract suite's, in tests/contract, run on both carriers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cluster_kinds import local_services
from multicloud import (
    Cluster,
    ClusterError,
    IntegrityError,
    LocalComm,
    NodeRegistry,
    NodeStatus,
    WorkerNode,
    create_local_cluster,
)
from multicloud.blob import blob_checksum
from multicloud.cluster.local import MEMBERSHIP_FILE
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import ChunkNotFound, ConfigError, InvalidChunkId
from multicloud.core.network import Location
from multicloud.core.types import BlobInfo, Chunk
from multicloud.node.service import NodeService
from multicloud.node.store import ChunkStore

DATA = b'{"event": "click", "user": 42}\n' * 200
OTHER = b"some,other,bytes\n" * 300
HERE = Location("aws", "us-east-1")


def make_chunk(data: bytes, cloud: str = "aws") -> Chunk:
    """A single-chunk file made of ``data``."""
    return Chunk(chunk_id=hashlib.sha256(data).hexdigest(), file="data.bin", index=0,
                 offset=0, size_bytes=len(data), source_cloud=cloud)


def lone_service(root: Path, node_id: str) -> NodeService:
    """A node service with its own store and no peers."""
    return NodeService(node_id, HERE, ChunkStore(root / node_id), LocalComm({}))


# -- node status and the registry -----------------------------------------------------


def test_status_compares_equal_to_plain_strings(node_registry: NodeRegistry) -> None:
    node = node_registry.nodes["aws-node-2"]
    assert node.status == "healthy"
    assert node.healthy
    node.status = "unhealthy"
    assert node.status == "unhealthy"
    assert node.status is NodeStatus.UNHEALTHY
    assert not node.healthy
    assert "aws-node-2" not in [n.id for n in node_registry.healthy_nodes()]
    assert [n.id for n in node_registry.healthy_nodes("aws")] == ["aws-node-1", "aws-node-3"]
    assert "unhealthy" in repr(node)


def test_status_change_notifies_subscribers(node_registry: NodeRegistry) -> None:
    seen: list[tuple[str, NodeStatus, NodeStatus, str]] = []

    def listener(node: WorkerNode, old: NodeStatus, reason: str) -> None:
        seen.append((node.id, old, node.status, reason))

    unsubscribe = node_registry.subscribe(listener)
    node_registry.nodes["gcp-node-1"].status = "unhealthy"
    node_registry.nodes["gcp-node-1"].status = "unhealthy"  # no change: no event
    node_registry.nodes["gcp-node-1"].status = NodeStatus.HEALTHY
    assert seen == [
        ("gcp-node-1", "healthy", "unhealthy", "set by operator"),
        ("gcp-node-1", "unhealthy", "healthy", "set by operator"),
    ]
    unsubscribe()
    unsubscribe()  # idempotent
    node_registry.nodes["gcp-node-1"].status = "unhealthy"
    assert len(seen) == 2


def test_invalid_status_is_refused(node_registry: NodeRegistry) -> None:
    node = node_registry.nodes["aws-node-1"]
    with pytest.raises(ClusterError, match=r"invalid node status 'dead'.*healthy, unhealthy"):
        node.status = "dead"
    assert node.status == "healthy"


def test_record_failure_marks_unhealthy_at_threshold(node_registry: NodeRegistry) -> None:
    reasons: list[str] = []
    node_registry.subscribe(lambda node, old, reason: reasons.append(reason))
    assert node_registry.record_failure("aws-node-3", 3, "timeout") is False
    assert node_registry.record_failure("aws-node-3", 3, "timeout") is False
    assert node_registry.nodes["aws-node-3"].healthy
    assert node_registry.record_failure("aws-node-3", 3, "refused") is True
    assert node_registry.nodes["aws-node-3"].status == "unhealthy"
    assert reasons == ["3 failed transfers, last: refused"]
    # already unhealthy, or unknown: nothing more to count
    assert node_registry.record_failure("aws-node-3", 3, "x") is False
    assert node_registry.record_failure("nope", 1, "x") is False
    # back in service: the streak starts over
    node_registry.nodes["aws-node-3"].status = "healthy"
    assert node_registry.nodes["aws-node-3"].consecutive_failures == 0


def test_record_success_ends_the_streak(node_registry: NodeRegistry) -> None:
    node_registry.record_failure("gcp-node-2", 3, "x")
    node_registry.record_failure("gcp-node-2", 3, "x")
    node_registry.record_success("gcp-node-2")
    node_registry.record_success("nope")
    assert node_registry.record_failure("gcp-node-2", 3, "x") is False
    assert node_registry.nodes["gcp-node-2"].healthy


def test_registry_lookup(node_registry: NodeRegistry) -> None:
    assert node_registry.get("gcp-node-3").location == Location("gcp", "us-central1")
    with pytest.raises(ClusterError, match=r"unknown node 'x'.*aws-node-1"):
        node_registry.get("x")
    assert node_registry.clouds() == ["aws", "gcp"]
    for node in ("gcp-node-1", "gcp-node-2", "gcp-node-3"):
        node_registry.nodes[node].status = "unhealthy"
    assert node_registry.clouds() == ["aws"]
    assert node_registry.clouds(healthy_only=False) == ["aws", "gcp"]


# -- the embedded cluster on disk -----------------------------------------------------


async def test_create_local_cluster_records_membership(tmp_path: Path) -> None:
    root = tmp_path / "c"
    first = create_local_cluster(root, {"aws": 3, "gcp": 3})
    await first.close()
    recorded = json.loads((root / MEMBERSHIP_FILE).read_text())
    assert [n["id"] for n in recorded["nodes"]] == [
        "aws-node-1", "aws-node-2", "aws-node-3", "gcp-node-1", "gcp-node-2", "gcp-node-3"]
    assert recorded["nodes"][1] == {"id": "aws-node-2", "cloud": "aws", "region": "us-west-2",
                                    "capacity_gb": 100.0, "store": "local"}

    second = create_local_cluster(root, {"aws": 4, "gcp": 1, "azure": 1})
    try:
        assert sorted(second.nodes) == [
            "aws-node-1", "aws-node-2", "aws-node-3", "aws-node-4", "azure-node-1",
            "gcp-node-1", "gcp-node-2", "gcp-node-3"]
    finally:
        await second.close()
    recorded = json.loads((root / MEMBERSHIP_FILE).read_text())
    assert len(recorded["nodes"]) == 8
    for node in recorded["nodes"]:
        assert (root / "nodes" / node["id"] / "objects").is_dir()


async def test_reopened_cluster_keeps_its_data(tmp_path: Path) -> None:
    first = create_local_cluster(tmp_path / "c", {"aws": 3, "gcp": 3})
    src = first.get("aws-node-1")
    blob = await first.client.process(src, make_chunk(DATA), DATA, src.location)
    await first.client.replicate(src, first.get("gcp-node-2"), blob)
    await first.close()
    again = create_local_cluster(tmp_path / "c")
    try:
        assert await again.client.check(again.get("gcp-node-2"), blob.chunk_id) == "ok"
        assert await again.client.inventory(again.get("gcp-node-2")) == [blob.chunk_id]
    finally:
        await again.close()


def test_damaged_membership_file(tmp_path: Path) -> None:
    (tmp_path / MEMBERSHIP_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="is damaged"):
        create_local_cluster(tmp_path)


async def test_keyword_overrides(tmp_path: Path) -> None:
    registry = create_local_cluster(tmp_path, {"gcp": 2}, time_scale=0.25, seed=9)
    try:
        assert registry.config.time_scale == 0.25
        assert registry.config.seed == 9
        assert registry.client.time_scale == 0.25
        assert sorted(registry.nodes) == ["gcp-node-1", "gcp-node-2"]
        assert registry.data_dir == tmp_path
    finally:
        await registry.close()


# -- the node service -----------------------------------------------------------------


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[NodeService]:
    """A lone node service with its own store."""
    node = lone_service(tmp_path, "n1")
    yield node
    node.close()


async def processed(tmp_path: Path, data: bytes = DATA) -> tuple[bytes, BlobInfo]:
    """A blob made by another node, as a receiver would get it."""
    sender = lone_service(tmp_path, "sender")
    try:
        info = await sender.process(make_chunk(data), data)
        blob = sender.staged_blob(info.chunk_id)
        assert blob is not None
        return blob, info
    finally:
        sender.close()


async def test_write_verifies_and_stores(service: NodeService, tmp_path: Path) -> None:
    blob, info = await processed(tmp_path)
    ack = await service.write(info.chunk_id, blob, info.blob_checksum)
    assert (ack.node_id, ack.chunk_id, ack.blob_size) == ("n1", info.chunk_id, len(blob))
    assert await service.read(info.chunk_id) == blob
    assert await service.check(info.chunk_id) == "ok"
    assert await service.usage() == (1, len(blob))


async def test_write_refuses_a_wrong_checksum(service: NodeService, tmp_path: Path) -> None:
    blob, info = await processed(tmp_path)
    with pytest.raises(IntegrityError, match=r"refused.*nothing was stored"):
        await service.write(info.chunk_id, blob, "0" * 32)
    assert not service.has(info.chunk_id)
    assert await service.inventory() == []
    assert list((service.store.root / "tmp").iterdir()) == []


async def test_write_refuses_damaged_bytes_with_their_own_checksum(
        service: NodeService, tmp_path: Path) -> None:
    blob, info = await processed(tmp_path)
    damaged = bytearray(blob)
    damaged[-1] ^= 0x01
    with pytest.raises(IntegrityError):
        await service.write(info.chunk_id, bytes(damaged), blob_checksum(bytes(damaged)))
    assert not service.has(info.chunk_id)


async def test_write_refuses_a_blob_under_another_id(service: NodeService,
                                                     tmp_path: Path) -> None:
    blob, info = await processed(tmp_path)
    other_id = hashlib.sha256(OTHER).hexdigest()
    with pytest.raises(IntegrityError, match="expected chunk"):
        await service.write(other_id, blob, info.blob_checksum)
    with pytest.raises(InvalidChunkId):
        await service.write("../x", blob, info.blob_checksum)
    assert await service.inventory() == []


async def test_process_stages_until_released(service: NodeService) -> None:
    info = await service.process(make_chunk(DATA), DATA)
    assert info.raw_size == len(DATA)
    assert info.codec == "zstd"  # repetitive JSON lines compress
    assert service.staged_blob(info.chunk_id) is not None
    assert not service.has(info.chunk_id)  # staged is not stored
    ack = await service.persist_staged(info.chunk_id)
    assert ack.blob_checksum == info.blob_checksum
    service.release(info.chunk_id)
    assert service.staged_blob(info.chunk_id) is None
    # Released: a push sends the stored copy, with the checksum of those bytes.
    stored = await service.read(info.chunk_id)
    assert await service.blob_for_push(info.chunk_id) == (stored, blob_checksum(stored))
    with pytest.raises(ChunkNotFound):
        await service.persist_staged(info.chunk_id)


async def test_a_chunk_processed_twice_keeps_its_first_blob(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encryption draws a fresh nonce: a second processing of a staged chunk makes other
    bytes, so it must hand out the staged blob's info, or its pushes would be refused."""
    monkeypatch.setenv("MULTICLOUD_ENCRYPTION_KEY", "ab" * 32)
    encrypting = ProcessingConfig(transforms=["validate", "compress", "encrypt"])
    node = NodeService("n1", Location("aws", "us-east-1"), ChunkStore(tmp_path / "n1"),
                       LocalComm({}), encrypting)
    try:
        first = await node.process(make_chunk(DATA), DATA)
        second = await node.process(make_chunk(DATA), DATA)
        assert second == first
        staged = node.staged_blob(first.chunk_id)
        assert staged is not None
        assert blob_checksum(staged) == first.blob_checksum
        assert (await node.persist_staged(first.chunk_id)).blob_checksum == first.blob_checksum
    finally:
        node.close()


async def test_configure_changes_worker_slots(node_registry: Cluster) -> None:
    await node_registry.configure(ProcessingConfig(max_workers_per_node=7))
    assert {s.worker_slots for s in local_services(node_registry).values()} == {7}
