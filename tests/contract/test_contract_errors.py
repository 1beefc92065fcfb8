"""Errors cross the carrier unchanged, and nodes marked unhealthy are kept out of service.

Each error is asserted as its exact class with its exact message (and the attributes it
carries), so the in-process and the HTTP run of a test can only both pass if the two
carriers deliver the same error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from contract_support import OTHER, make_chunk, object_path, push, stage

from multicloud import Cluster, ClusterError, IntegrityError, NodeUnavailable, ProcessingConfig
from multicloud.blob import check_blob
from multicloud.core.errors import ChunkNotFound, InvalidChunkId, ReplicaRefused
from multicloud.core.messages import Request

MISSING = "f" * 64


async def test_a_missing_chunk_is_chunk_not_found(cluster: Cluster) -> None:
    with pytest.raises(ChunkNotFound) as err:
        await cluster.client.read(cluster.get("gcp-node-1"), MISSING,
                                  cluster.get("aws-node-1").location)
    assert type(err.value) is ChunkNotFound
    assert str(err.value) == f"chunk {MISSING} is not on node gcp-node-1"


async def test_a_malformed_chunk_id_is_invalid_chunk_id(cluster: Cluster) -> None:
    with pytest.raises(InvalidChunkId) as err:
        await cluster.client.check(cluster.get("aws-node-2"), "../etc/passwd")
    assert err.value.chunk_id == "../etc/passwd"
    assert str(err.value) == ("invalid chunk id '../etc/passwd': expected 64 lowercase hex "
                              "characters (a SHA-256)")


async def test_a_corrupt_replica_read_is_integrity_error(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "gcp-node-2", blob)
    await cluster.faults.corrupt("gcp-node-2", blob.chunk_id)
    # The message the node's own check gives on the bytes it holds, word for word.
    with pytest.raises(IntegrityError) as local:
        check_blob(object_path(cluster, "gcp-node-2", blob.chunk_id).read_bytes(),
                   blob.chunk_id)
    with pytest.raises(IntegrityError) as err:
        await cluster.client.read(cluster.get("gcp-node-2"), blob.chunk_id,
                                  cluster.get("aws-node-1").location)
    assert type(err.value) is IntegrityError
    assert str(err.value) == str(local.value)


async def test_a_crashed_node_is_unavailable_by_name(cluster: Cluster) -> None:
    await cluster.faults.crash("gcp-node-3")
    with pytest.raises(NodeUnavailable) as err:
        await cluster.client.usage(cluster.get("gcp-node-3"))
    assert (err.value.node_id, err.value.reason) == ("gcp-node-3",
                                                     "connection refused (crashed)")
    assert str(err.value) == "node gcp-node-3 is unavailable: connection refused (crashed)"


async def test_an_unknown_operation_is_a_cluster_error(cluster: Cluster) -> None:
    node = cluster.get("aws-node-1")
    with pytest.raises(ClusterError) as err:
        await cluster.client.channel.call(node.address, Request("frobnicate"))
    assert type(err.value) is ClusterError
    assert str(err.value).startswith("node aws-node-1 has no operation 'frobnicate' (known: ")


@pytest.mark.parametrize(("op", "meta", "body", "message"), [
    pytest.param("get", {}, None, "a 'get' request needs 'chunk_id'", id="get"),
    pytest.param("check", {}, None, "a 'check' request needs 'chunk_id'", id="check"),
    pytest.param("delete", {}, None, "a 'delete' request needs 'chunk_id'", id="delete"),
    pytest.param("release", {}, None, "a 'release' request needs 'chunk_id'", id="release"),
    pytest.param("put", {"checksum": "0" * 32}, b"blob", "a 'put' request needs 'chunk_id'",
                 id="put-chunk_id"),
    pytest.param("put", {"chunk_id": MISSING}, b"blob", "a 'put' request needs 'checksum'",
                 id="put-checksum"),
    pytest.param("put", {"chunk_id": MISSING, "checksum": "0" * 32}, None,
                 "a 'put' request needs a body", id="put-body"),
    pytest.param("push", {"chunk_id": MISSING, "checksum": "0" * 32}, None,
                 "a 'push' request needs 'target'", id="push-target"),
    pytest.param("process", {}, b"raw", "a 'process' request needs 'chunk'", id="process"),
    pytest.param("configure", {}, None, "a 'configure' request needs 'processing'",
                 id="configure"),
    pytest.param("fault", {}, None, "a 'fault' request needs 'action'", id="fault"),
])
async def test_a_request_missing_an_argument_is_a_cluster_error(
        cluster: Cluster, op: str, meta: dict[str, object], body: bytes | None,
        message: str) -> None:
    node = cluster.get("aws-node-1")
    with pytest.raises(ClusterError) as err:
        await cluster.client.channel.call(node.address, Request(op, meta, body, node.location))
    assert type(err.value) is ClusterError  # a bad request, not the node failing inside
    assert str(err.value) == message


async def test_a_read_with_a_malformed_link_is_a_cluster_error(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "aws-node-1", blob)
    node = cluster.get("aws-node-1")
    request = Request("get", {"chunk_id": blob.chunk_id, "link": {"kind": "same_region"}})
    with pytest.raises(ClusterError) as err:
        await cluster.client.channel.call(node.address, request)
    assert type(err.value) is ClusterError, repr(err.value)


# -- health gating ---------------------------------------------------------------------


async def test_a_node_marked_unhealthy_is_refused_for_all_but_release(cluster: Cluster,
                                                                      ) -> None:
    client = cluster.client
    blob = await stage(cluster, "aws-node-2")
    await push(cluster, "aws-node-2", "aws-node-2", blob)  # stored: every op would succeed
    staged = await stage(cluster, "aws-node-2", OTHER)  # staged only
    node, peer = cluster.get("aws-node-2"), cluster.get("aws-node-1")
    node.status = "unhealthy"
    refused: dict[str, Callable[[], Awaitable[object]]] = {
        "process": lambda: client.process(node, make_chunk(OTHER), OTHER, node.location),
        "replicate": lambda: client.replicate(node, peer, blob),
        "read": lambda: client.read(node, blob.chunk_id, peer.location),
        "check": lambda: client.check(node, blob.chunk_id),
        "has": lambda: client.has(node, blob.chunk_id),
        "inventory": lambda: client.inventory(node),
        "usage": lambda: client.usage(node),
        "delete": lambda: client.delete(node, blob.chunk_id),
        "ping": lambda: client.ping(node),
        "configure": lambda: client.configure(node, ProcessingConfig()),
    }
    for op, call in refused.items():
        with pytest.raises(NodeUnavailable) as err:
            await call()
        assert str(err.value) == "node aws-node-2 is unavailable: marked unhealthy", op
    await client.release(node, staged.chunk_id)  # a node taken out can still free memory
    node.status = "healthy"
    assert await client.check(node, blob.chunk_id) == "ok"  # nothing above reached it
    with pytest.raises(ChunkNotFound):  # the release did: the staged blob is gone
        await push(cluster, "aws-node-2", "gcp-node-1", staged)


async def test_a_push_to_a_node_marked_unhealthy_is_replica_refused(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    dst = cluster.get("gcp-node-1")
    dst.status = "unhealthy"
    before = cluster.client.ledger.snapshot()
    with pytest.raises(ReplicaRefused) as err:
        await push(cluster, "aws-node-1", "gcp-node-1", blob)
    assert err.value.node_id == "gcp-node-1"
    assert isinstance(err.value.cause, NodeUnavailable)
    assert str(err.value.cause) == "node gcp-node-1 is unavailable: marked unhealthy"
    assert cluster.client.ledger.snapshot() == before  # nothing was sent
    dst.status = "healthy"
    assert not await cluster.client.has(dst, blob.chunk_id)
