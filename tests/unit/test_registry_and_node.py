"""Tests for the registry, worker nodes, the node service, the embedded cluster and its faults."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from multicloud import (
    ClusterError,
    IntegrityError,
    NodeRegistry,
    NodeStatus,
    NodeUnavailable,
    SimulatedTransport,
    StorageConfig,
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

MIB = 1024 * 1024
DATA = b'{"event": "click", "user": 42}\n' * 200
OTHER = b"some,other,bytes\n" * 300


def make_chunk(data: bytes, cloud: str = "aws") -> Chunk:
    """A single-chunk file made of ``data``."""
    return Chunk(chunk_id=hashlib.sha256(data).hexdigest(), file="data.bin", index=0,
                 offset=0, size_bytes=len(data), source_cloud=cloud)


def sim(registry: NodeRegistry) -> SimulatedTransport:
    """The registry's simulated transport."""
    transport = registry.transport
    assert isinstance(transport, SimulatedTransport)
    return transport


async def stage(registry: NodeRegistry, node_id: str, data: bytes = DATA) -> BlobInfo:
    """Process ``data`` on a node, from a bucket in the node's own region."""
    node = registry.get(node_id)
    return await registry.transport.process(node, make_chunk(data, node.cloud), data,
                                            node.location)


async def push(registry: NodeRegistry, src: str, dst: str, blob: BlobInfo) -> None:
    """Replicate a staged blob from src to dst."""
    await registry.transport.replicate(registry.get(src), registry.get(dst), blob)


def temp_files(registry: NodeRegistry, node_id: str) -> list[str]:
    """Names in a node's chunk-store temp dir."""
    return sorted(p.name for p in (sim(registry).services[node_id].store.root / "tmp").iterdir())


async def within(awaitable: Awaitable[object] | asyncio.Event) -> None:
    """Wait for an event or future, failing instead of hanging if it never comes."""
    async with asyncio.timeout(10):
        if isinstance(awaitable, asyncio.Event):
            await awaitable.wait()
        else:
            await awaitable


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
                                    "capacity_gb": 100.0}

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
    blob = await stage(first, "aws-node-1")
    await push(first, "aws-node-1", "gcp-node-2", blob)
    await first.close()
    again = create_local_cluster(tmp_path / "c")
    try:
        assert await again.transport.check(again.get("gcp-node-2"), blob.chunk_id) == "ok"
        assert await again.transport.inventory(again.get("gcp-node-2")) == [blob.chunk_id]
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
        assert sim(registry).time_scale == 0.25
        assert sorted(registry.nodes) == ["gcp-node-1", "gcp-node-2"]
        assert registry.data_dir == tmp_path
    finally:
        await registry.close()


# -- the node service -----------------------------------------------------------------


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[NodeService]:
    """A lone node service with its own store."""
    node = NodeService("n1", ChunkStore(tmp_path / "n1"))
    yield node
    node.close()


async def processed(tmp_path: Path, data: bytes = DATA) -> tuple[bytes, BlobInfo]:
    """A blob made by another node, as a receiver would get it."""
    sender = NodeService("sender", ChunkStore(tmp_path / "sender"))
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
    assert await service.blob_for_push(info.chunk_id) == await service.read(info.chunk_id)
    with pytest.raises(ChunkNotFound):
        await service.persist_staged(info.chunk_id)


async def test_configure_changes_worker_slots(node_registry: NodeRegistry) -> None:
    await node_registry.transport.configure(ProcessingConfig(max_workers_per_node=7))
    assert {s.max_workers for s in sim(node_registry).services.values()} == {7}


# -- the simulated transport: happy path and accounting -------------------------------


async def test_replicate_and_scrub(node_registry: NodeRegistry) -> None:
    blob = await stage(node_registry, "aws-node-1")
    for dst in ("aws-node-1", "aws-node-3", "gcp-node-2"):
        await push(node_registry, "aws-node-1", dst, blob)
        node = node_registry.get(dst)
        assert await node_registry.transport.check(node, blob.chunk_id) == "ok"
        assert await node_registry.transport.usage(node) == (1, blob.blob_size)
    await node_registry.transport.release(node_registry.get("aws-node-1"), blob.chunk_id)
    assert sim(node_registry).services["aws-node-1"].staged_blob(blob.chunk_id) is None
    read = await node_registry.transport.read(node_registry.get("gcp-node-2"), blob.chunk_id,
                                              Location("aws", "us-east-1"))
    assert blob_checksum(read) == blob.blob_checksum
    assert await node_registry.transport.delete(node_registry.get("aws-node-3"), blob.chunk_id)
    assert await node_registry.transport.check(node_registry.get("aws-node-3"),
                                               blob.chunk_id) == "missing"


async def test_ledger_charges_egress_for_cross_cloud(node_registry: NodeRegistry) -> None:
    ledger = sim(node_registry).ledger
    blob = await stage(node_registry, "aws-node-1")
    before = ledger.snapshot()
    await push(node_registry, "aws-node-1", "gcp-node-1", blob)
    await push(node_registry, "aws-node-1", "aws-node-3", blob)
    await push(node_registry, "aws-node-1", "aws-node-1", blob)  # in place: no transfer
    delta = ledger.difference(ledger.snapshot(), before)
    assert set(delta) == {"aws/us-east-1->gcp/us-central1", "aws/us-east-1->aws/us-east-1"}
    cross = delta["aws/us-east-1->gcp/us-central1"]
    assert cross.cross_cloud
    assert (cross.transfers, cross.bytes) == (1, blob.blob_size)
    assert cross.egress_usd == pytest.approx(blob.blob_size / 1e9 * 0.09)
    same = delta["aws/us-east-1->aws/us-east-1"]
    assert not same.cross_cloud
    assert same.egress_usd == pytest.approx(blob.blob_size / 1e9 * 0.01)
    assert cross.emulated_seconds > same.emulated_seconds
    # The raw bytes went from the bucket to the processing node in its region.
    ingress = before["aws/us-east-1->aws/us-east-1"]
    assert (ingress.transfers, ingress.bytes) == (1, len(DATA))


async def test_cross_cloud_transfer_is_slower_with_time_scale(tmp_path: Path) -> None:
    registry = create_local_cluster(tmp_path, {"aws": 3, "gcp": 1}, time_scale=0.5,
                                    storage=StorageConfig(fsync=False))
    try:
        data = random.Random(0).randbytes(8 * MIB)  # incompressible: the blob stays 8 MiB
        blob = await stage(registry, "aws-node-1", data)
        elapsed: dict[str, float] = {}
        for dst in ("aws-node-3", "gcp-node-1"):  # same region as aws-node-1, other cloud
            started = time.perf_counter()
            await push(registry, "aws-node-1", dst, blob)
            elapsed[dst] = time.perf_counter() - started
        assert elapsed["gcp-node-1"] > elapsed["aws-node-3"]
    finally:
        await registry.close()


# -- faults ---------------------------------------------------------------------------


async def test_crash_and_restart(node_registry: NodeRegistry) -> None:
    transport = sim(node_registry)
    blob = await stage(node_registry, "aws-node-1")
    await push(node_registry, "aws-node-1", "gcp-node-1", blob)
    gcp1 = node_registry.get("gcp-node-1")

    transport.crash("gcp-node-1")
    with pytest.raises(NodeUnavailable, match="crashed") as err:
        await push(node_registry, "aws-node-1", "gcp-node-1", blob)
    assert err.value.node_id == "gcp-node-1"
    with pytest.raises(NodeUnavailable):
        await transport.check(gcp1, blob.chunk_id)
    assert gcp1.status == "healthy"  # the registry learns of a crash from failed transfers

    reasons: list[str] = []
    node_registry.subscribe(lambda node, old, reason: reasons.append(reason))
    gcp1.status = "unhealthy"
    transport.restart("gcp-node-1")
    assert gcp1.status == "healthy"
    assert reasons[-1] == "restarted"
    assert await transport.check(gcp1, blob.chunk_id) == "ok"  # the disk survived


async def test_crash_loses_staged_blobs(node_registry: NodeRegistry) -> None:
    transport = sim(node_registry)
    blob = await stage(node_registry, "aws-node-1")
    transport.crash("aws-node-1")
    with pytest.raises(NodeUnavailable):
        await push(node_registry, "aws-node-1", "aws-node-2", blob)
    transport.restart("aws-node-1")
    with pytest.raises(ChunkNotFound):
        await push(node_registry, "aws-node-1", "aws-node-2", blob)


async def test_unhealthy_node_is_unreachable(node_registry: NodeRegistry) -> None:
    blob = await stage(node_registry, "aws-node-1")
    node_registry.nodes["aws-node-2"].status = "unhealthy"
    with pytest.raises(NodeUnavailable, match="marked unhealthy"):
        await push(node_registry, "aws-node-1", "aws-node-2", blob)
    with pytest.raises(NodeUnavailable):
        await stage(node_registry, "aws-node-2")


async def test_partition_cuts_only_cross_cloud(node_registry: NodeRegistry) -> None:
    transport = sim(node_registry)
    blob = await stage(node_registry, "aws-node-1")
    transport.partition("aws", "gcp")
    with pytest.raises(NodeUnavailable, match="partition between aws and gcp") as err:
        await push(node_registry, "aws-node-1", "gcp-node-1", blob)
    # The target is the one cut off: distribution must not take the source for lost.
    assert err.value.node_id == "gcp-node-1"
    with pytest.raises(NodeUnavailable, match="partition"):
        await transport.process(node_registry.get("gcp-node-1"), make_chunk(OTHER), OTHER,
                                Location("aws", "us-east-1"))
    await push(node_registry, "aws-node-1", "aws-node-2", blob)  # same cloud still works
    assert await transport.check(node_registry.get("aws-node-2"), blob.chunk_id) == "ok"
    assert not sim(node_registry).services["gcp-node-1"].has(blob.chunk_id)
    transport.heal()
    await push(node_registry, "aws-node-1", "gcp-node-1", blob)
    assert await transport.check(node_registry.get("gcp-node-1"), blob.chunk_id) == "ok"


async def test_corrupt_and_lose(node_registry: NodeRegistry) -> None:
    transport = sim(node_registry)
    blob = await stage(node_registry, "aws-node-1")
    await push(node_registry, "aws-node-1", "aws-node-2", blob)
    await push(node_registry, "aws-node-1", "gcp-node-3", blob)
    offset = transport.corrupt("aws-node-2", blob.chunk_id)
    assert 0 <= offset < blob.blob_size
    assert await transport.check(node_registry.get("aws-node-2"), blob.chunk_id) == "corrupt"
    with pytest.raises(IntegrityError):
        await transport.read(node_registry.get("aws-node-2"), blob.chunk_id,
                             Location("aws", "us-east-1"))
    assert transport.lose("gcp-node-3", blob.chunk_id) is True
    assert transport.lose("gcp-node-3", blob.chunk_id) is False
    assert await transport.check(node_registry.get("gcp-node-3"), blob.chunk_id) == "missing"


async def test_hold_writes_until_released(node_registry: NodeRegistry) -> None:
    transport = sim(node_registry)
    blob = await stage(node_registry, "aws-node-1")
    gate = transport.hold_writes("gcp-node-2")
    held = asyncio.create_task(push(node_registry, "aws-node-1", "gcp-node-2", blob))
    await within(gate.arrived)
    assert gate.held == 1
    assert not held.done()
    assert not transport.services["gcp-node-2"].has(blob.chunk_id)
    # other nodes are not held
    await push(node_registry, "aws-node-1", "gcp-node-1", blob)
    gate.release()
    await within(held)
    assert await transport.check(node_registry.get("gcp-node-2"), blob.chunk_id) == "ok"
    # once released, later writes go straight through
    await push(node_registry, "aws-node-1", "gcp-node-2", blob)
    assert gate.held == 1


async def test_crash_during_write(node_registry: NodeRegistry) -> None:
    transport = sim(node_registry)
    blob = await stage(node_registry, "aws-node-1")
    transport.crash_during_write("aws-node-2")
    with pytest.raises(NodeUnavailable, match="middle of a write"):
        await push(node_registry, "aws-node-1", "aws-node-2", blob)
    assert not transport.services["aws-node-2"].has(blob.chunk_id)
    assert temp_files(node_registry, "aws-node-2") == ["interrupted-write.partial"]
    assert "aws-node-2" in transport.crashed
    transport.restart("aws-node-2")
    assert temp_files(node_registry, "aws-node-2") == []
    assert await transport.check(node_registry.get("aws-node-2"), blob.chunk_id) == "missing"
    await push(node_registry, "aws-node-1", "aws-node-2", blob)  # the crash was one-off
    assert await transport.check(node_registry.get("aws-node-2"), blob.chunk_id) == "ok"


async def test_crash_during_nth_write(node_registry: NodeRegistry) -> None:
    transport = sim(node_registry)
    first = await stage(node_registry, "aws-node-1")
    second = await stage(node_registry, "aws-node-1", OTHER)
    transport.crash_during_write("gcp-node-1", nth=2)
    await push(node_registry, "aws-node-1", "gcp-node-1", first)
    with pytest.raises(NodeUnavailable):
        await push(node_registry, "aws-node-1", "gcp-node-1", second)
    transport.restart("gcp-node-1")
    gcp1 = node_registry.get("gcp-node-1")
    assert await transport.check(gcp1, first.chunk_id) == "ok"
    assert await transport.check(gcp1, second.chunk_id) == "missing"
