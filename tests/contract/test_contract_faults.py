"""Each fault, and what the coordinator sees of it, alike on every carrier.

A failure of the target of a push is `ReplicaRefused` (its cause attached), so that
distribution picks another target; a failure of the source is raised as itself, so that
distribution takes the source for lost. Every wait is on a held write or a condition.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import TypeVar

import pytest
from contract_support import OTHER, make_chunk, object_path, push, stage, within

from cluster_kinds import make_cluster, temp_files
from multicloud import (
    Cluster,
    ClusterConfig,
    DiskFull,
    IntegrityError,
    NodeUnavailable,
    ProcessingConfig,
    StorageConfig,
)
from multicloud.core.errors import ChunkNotFound, ReplicaRefused
from multicloud.core.network import Location

MIB = 1024 * 1024
E = TypeVar("E", bound=Exception)


def refused_because(err: pytest.ExceptionInfo[ReplicaRefused], node_id: str,
                    cause: type[E]) -> E:
    """The cause of a ReplicaRefused by node_id, checked to be of the given class."""
    assert err.value.node_id == node_id
    assert isinstance(err.value.cause, cause), repr(err.value.cause)
    return err.value.cause


# -- crash and restart -----------------------------------------------------------------


async def test_a_crashed_node_refuses_everything_and_keeps_its_disk(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "gcp-node-1", blob)
    gcp1 = cluster.get("gcp-node-1")

    await cluster.faults.crash("gcp-node-1")
    assert (await cluster.faults.state("gcp-node-1"))["crashed"] is True
    with pytest.raises(NodeUnavailable, match="crashed") as err:
        await cluster.client.check(gcp1, blob.chunk_id)
    assert err.value.node_id == "gcp-node-1"
    with pytest.raises(ReplicaRefused) as refused:
        await push(cluster, "aws-node-1", "gcp-node-1", blob)
    assert refused_because(refused, "gcp-node-1", NodeUnavailable).node_id == "gcp-node-1"
    assert gcp1.status == "healthy"  # the registry learns of a crash from failed transfers

    gcp1.status = "unhealthy"  # as the coordinator marks it
    reasons: list[str] = []
    cluster.subscribe(lambda node, old, reason: reasons.append(reason))
    await cluster.faults.restart("gcp-node-1")
    assert gcp1.status == "healthy"
    assert reasons == ["restarted"]
    assert await cluster.client.check(gcp1, blob.chunk_id) == "ok"  # the disk survived


async def test_a_crash_loses_the_staged_blobs(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await cluster.faults.crash("aws-node-1")
    with pytest.raises(NodeUnavailable) as err:  # the source is down: not ReplicaRefused
        await push(cluster, "aws-node-1", "aws-node-2", blob)
    assert not isinstance(err.value, ReplicaRefused)
    assert err.value.node_id == "aws-node-1"
    await cluster.faults.restart("aws-node-1")
    with pytest.raises(ChunkNotFound, match="is not on node aws-node-1"):  # the source again
        await push(cluster, "aws-node-1", "aws-node-2", blob)


# -- partition -------------------------------------------------------------------------


async def test_a_partition_cuts_only_across_the_clouds(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await cluster.faults.partition("aws", "gcp")
    assert (await cluster.faults.state("gcp-node-3"))["partitions"] == [["aws", "gcp"]]

    with pytest.raises(ReplicaRefused) as refused:
        await push(cluster, "aws-node-1", "gcp-node-1", blob)
    # The target is the one cut off: distribution must not take the source for lost.
    cause = refused_because(refused, "gcp-node-1", NodeUnavailable)
    assert cause.node_id == "gcp-node-1"
    assert "network partition between aws and gcp" in cause.reason
    with pytest.raises(NodeUnavailable, match="partition between aws and gcp") as err:
        await cluster.client.process(cluster.get("gcp-node-2"), make_chunk(OTHER), OTHER,
                                     Location("aws", "us-east-1"))
    assert err.value.node_id == "gcp-node-2"

    await push(cluster, "aws-node-1", "aws-node-2", blob)  # the same cloud still works
    assert await cluster.client.check(cluster.get("aws-node-2"), blob.chunk_id) == "ok"
    assert not await cluster.client.has(cluster.get("gcp-node-1"), blob.chunk_id)

    await cluster.faults.heal()
    await push(cluster, "aws-node-1", "gcp-node-1", blob)
    assert await cluster.client.check(cluster.get("gcp-node-1"), blob.chunk_id) == "ok"


# -- slow link -------------------------------------------------------------------------


async def test_a_slow_link_makes_cross_cloud_pushes_slower(kind: str, tmp_path: Path) -> None:
    cluster = await make_cluster(kind, tmp_path / "cluster", {"aws": 1, "gcp": 2},
                                 config=ClusterConfig(time_scale=0.05),
                                 storage=StorageConfig(fsync=False))
    try:
        await cluster.configure(ProcessingConfig())  # hands the nodes the time scale
        data = random.Random(0).randbytes(2 * MIB)  # incompressible: the blob stays 2 MiB
        blob = await stage(cluster, "aws-node-1", data)
        elapsed: dict[str, float] = {}
        for dst, factor in (("gcp-node-1", 1.0), ("gcp-node-2", 100.0)):
            cluster.faults.slow_link("aws", "gcp", factor)
            started = time.perf_counter()
            await push(cluster, "aws-node-1", dst, blob)
            elapsed[dst] = time.perf_counter() - started
        assert elapsed["gcp-node-2"] > 2 * elapsed["gcp-node-1"]
        charged = cluster.client.ledger.snapshot()
        normal = charged["aws/us-east-1->gcp/us-central1"].emulated_seconds
        slowed = charged["aws/us-east-1->gcp/us-east1"].emulated_seconds
        assert slowed / normal == pytest.approx(100.0, rel=0.01)
    finally:
        await cluster.close()


# -- damage to stored replicas ---------------------------------------------------------


async def test_a_corrupt_replica_fails_its_check_and_its_read(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "aws-node-2", blob)
    offset = await cluster.faults.corrupt("aws-node-2", blob.chunk_id)
    assert 0 <= offset < blob.blob_size
    node = cluster.get("aws-node-2")
    assert await cluster.client.check(node, blob.chunk_id) == "corrupt"
    with pytest.raises(IntegrityError):
        await cluster.client.read(node, blob.chunk_id, Location("aws", "us-east-1"))


async def test_a_lost_replica_is_missing(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "gcp-node-3", blob)
    assert await cluster.faults.lose("gcp-node-3", blob.chunk_id) is True
    assert await cluster.faults.lose("gcp-node-3", blob.chunk_id) is False
    assert await cluster.client.check(cluster.get("gcp-node-3"), blob.chunk_id) == "missing"


# -- crash during a write --------------------------------------------------------------


async def test_a_crash_during_a_write_leaves_only_a_partial_temp_file(cluster: Cluster,
                                                                      ) -> None:
    blob = await stage(cluster, "aws-node-1")
    await cluster.faults.crash_during_write("aws-node-2")
    with pytest.raises(ReplicaRefused) as refused:
        await push(cluster, "aws-node-1", "aws-node-2", blob)
    cause = refused_because(refused, "aws-node-2", NodeUnavailable)
    assert "crashed in the middle of a write" in str(cause)
    assert temp_files(cluster, "aws-node-2") == ["interrupted-write.partial"]
    assert not object_path(cluster, "aws-node-2", blob.chunk_id).exists()
    assert (await cluster.faults.state("aws-node-2"))["crashed"] is True

    await cluster.faults.restart("aws-node-2")
    assert temp_files(cluster, "aws-node-2") == []
    node = cluster.get("aws-node-2")
    assert await cluster.client.check(node, blob.chunk_id) == "missing"
    await push(cluster, "aws-node-1", "aws-node-2", blob)  # the crash was one-off
    assert await cluster.client.check(node, blob.chunk_id) == "ok"


async def test_a_crash_during_the_nth_write(cluster: Cluster) -> None:
    first = await stage(cluster, "aws-node-1")
    second = await stage(cluster, "aws-node-1", OTHER)
    await cluster.faults.crash_during_write("gcp-node-1", nth=2)
    await push(cluster, "aws-node-1", "gcp-node-1", first)
    with pytest.raises(ReplicaRefused) as refused:
        await push(cluster, "aws-node-1", "gcp-node-1", second)
    refused_because(refused, "gcp-node-1", NodeUnavailable)
    await cluster.faults.restart("gcp-node-1")
    gcp1 = cluster.get("gcp-node-1")
    assert await cluster.client.check(gcp1, first.chunk_id) == "ok"
    assert await cluster.client.check(gcp1, second.chunk_id) == "missing"


# -- full disk -------------------------------------------------------------------------


async def test_a_full_disk_refuses_writes_until_freed(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await cluster.faults.disk_full("gcp-node-1")
    assert (await cluster.faults.state("gcp-node-1"))["quota_bytes"] == 0
    with pytest.raises(ReplicaRefused) as refused:
        await push(cluster, "aws-node-1", "gcp-node-1", blob)
    cause = refused_because(refused, "gcp-node-1", DiskFull)
    assert "No space left on device" in str(cause)
    gcp1 = cluster.get("gcp-node-1")
    assert not await cluster.client.has(gcp1, blob.chunk_id)
    assert await cluster.client.usage(gcp1) == (0, 0)
    assert temp_files(cluster, "gcp-node-1") == []

    await cluster.faults.disk_full("gcp-node-1", full=False)
    await push(cluster, "aws-node-1", "gcp-node-1", blob)
    assert await cluster.client.check(gcp1, blob.chunk_id) == "ok"


async def test_a_full_disk_refuses_the_processing_node_its_own_copy(cluster: Cluster) -> None:
    """Storing in place on a full disk is the target failing, not the source."""
    blob = await stage(cluster, "aws-node-1")
    await cluster.faults.disk_full("aws-node-1")
    with pytest.raises(ReplicaRefused) as refused:
        await push(cluster, "aws-node-1", "aws-node-1", blob)
    refused_because(refused, "aws-node-1", DiskFull)
    await push(cluster, "aws-node-1", "aws-node-2", blob)  # still staged: pushes go on


# -- held writes -----------------------------------------------------------------------


async def test_held_writes_wait_for_the_gate(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    gcp2 = cluster.get("gcp-node-2")
    gate = await cluster.faults.hold_writes("gcp-node-2")
    held = asyncio.create_task(push(cluster, "aws-node-1", "gcp-node-2", blob))
    try:
        assert await within(gate.arrived()) == 1
        assert await gate.held() == 1
        assert not held.done()
        assert not await cluster.client.has(gcp2, blob.chunk_id)
        await within(push(cluster, "aws-node-1", "gcp-node-1", blob))  # others not held
    finally:
        await gate.release()
    await within(held)
    assert await cluster.client.check(gcp2, blob.chunk_id) == "ok"
    # Once released, later writes go straight through (and are not counted as held).
    second = await stage(cluster, "aws-node-1", OTHER)
    await within(push(cluster, "aws-node-1", "gcp-node-2", second))
    assert await gate.held() == 1
