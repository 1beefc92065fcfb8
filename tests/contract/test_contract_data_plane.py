"""The happy path of every node operation: process, replicate, read, delete, release."""

from __future__ import annotations

import hashlib

import pytest
from contract_support import DATA, make_chunk, object_path, push, stage

from multicloud import Cluster
from multicloud.blob import blob_checksum, check_blob
from multicloud.core.errors import ChunkNotFound, ReplicaRefused
from multicloud.core.network import Location

BUCKET = Location("aws", "us-east-1")


async def test_process_stages_a_blob_and_charges_the_source_bytes(cluster: Cluster) -> None:
    node = cluster.get("aws-node-2")  # us-west-2: the bucket is in another region
    info = await cluster.client.process(node, make_chunk(DATA), DATA, BUCKET)
    assert info.chunk_id == hashlib.sha256(DATA).hexdigest()
    assert info.raw_size == len(DATA)
    assert info.codec == "zstd"  # repetitive JSON lines compress
    assert 0 < info.blob_size < info.raw_size
    # Staged is not stored: nothing on the node's disk until a replicate.
    assert not await cluster.client.has(node, info.chunk_id)
    assert await cluster.client.inventory(node) == []
    charged = cluster.client.ledger.snapshot()
    assert list(charged) == ["aws/us-east-1->aws/us-west-2"]
    traffic = charged["aws/us-east-1->aws/us-west-2"]
    assert (traffic.transfers, traffic.bytes) == (1, len(DATA))
    assert traffic.egress_usd == pytest.approx(len(DATA) / 1e9 * 0.02)  # aws inter-region


async def test_process_an_empty_file(cluster: Cluster) -> None:
    """An empty source file is one chunk of 0 bytes; its blob is a header alone."""
    node = cluster.get("aws-node-1")
    info = await cluster.client.process(node, make_chunk(b""), b"", node.location)
    assert (info.chunk_id, info.raw_size, info.codec) == (hashlib.sha256(b"").hexdigest(),
                                                          0, "raw")
    await push(cluster, "aws-node-1", "gcp-node-1", info)
    assert await cluster.client.check(cluster.get("gcp-node-1"), info.chunk_id) == "ok"


async def test_replicate_stores_a_verified_durable_replica(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    dst = cluster.get("gcp-node-2")
    ack = await cluster.client.replicate(cluster.get("aws-node-1"), dst, blob)
    assert (ack.node_id, ack.chunk_id, ack.blob_checksum, ack.blob_size) == (
        "gcp-node-2", blob.chunk_id, blob.blob_checksum, blob.blob_size)
    assert await cluster.client.check(dst, blob.chunk_id) == "ok"
    assert await cluster.client.usage(dst) == (1, blob.blob_size)
    assert await cluster.client.inventory(dst) == [blob.chunk_id]
    assert await cluster.client.has(dst, blob.chunk_id)
    # The source only staged it: pushing does not store it there.
    assert not await cluster.client.has(cluster.get("aws-node-1"), blob.chunk_id)


async def test_replicate_to_self_stores_in_place_without_a_charge(cluster: Cluster) -> None:
    blob = await stage(cluster, "gcp-node-1")
    before = cluster.client.ledger.snapshot()
    node = cluster.get("gcp-node-1")
    ack = await cluster.client.replicate(node, node, blob)
    assert (ack.node_id, ack.blob_checksum, ack.blob_size) == (
        "gcp-node-1", blob.blob_checksum, blob.blob_size)
    assert await cluster.client.check(node, blob.chunk_id) == "ok"
    assert await cluster.client.inventory(node) == [blob.chunk_id]
    assert cluster.client.ledger.snapshot() == before


async def test_read_returns_the_verified_blob_and_charges_the_way_back(cluster: Cluster,
                                                                       ) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "gcp-node-1", blob)
    before = cluster.client.ledger.snapshot()
    read = await cluster.client.read(cluster.get("gcp-node-1"), blob.chunk_id, BUCKET)
    assert len(read) == blob.blob_size
    assert blob_checksum(read) == blob.blob_checksum
    assert check_blob(read, blob.chunk_id).chunk_id == blob.chunk_id
    delta = cluster.client.ledger.difference(cluster.client.ledger.snapshot(), before)
    assert list(delta) == ["gcp/us-central1->aws/us-east-1"]
    back = delta["gcp/us-central1->aws/us-east-1"]
    assert (back.transfers, back.bytes, back.cross_cloud) == (1, blob.blob_size, True)
    assert back.egress_usd == pytest.approx(blob.blob_size / 1e9 * 0.12)  # gcp internet


async def test_delete(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "aws-node-3", blob)
    node = cluster.get("aws-node-3")
    assert await cluster.client.delete(node, blob.chunk_id) is True
    assert await cluster.client.check(node, blob.chunk_id) == "missing"
    assert not await cluster.client.has(node, blob.chunk_id)
    assert await cluster.client.usage(node) == (0, 0)
    assert await cluster.client.delete(node, blob.chunk_id) is False


async def test_release_drops_the_staged_blob(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await push(cluster, "aws-node-1", "gcp-node-1", blob)
    await cluster.client.release(cluster.get("aws-node-1"), blob.chunk_id)
    # Gone from the source, which never stored it: a failure of the source, not of the
    # target, so distribution takes the source for lost instead of blaming gcp-node-3.
    with pytest.raises(ChunkNotFound, match="is not on node aws-node-1") as err:
        await push(cluster, "aws-node-1", "gcp-node-3", blob)
    assert not isinstance(err.value, ReplicaRefused)
    assert not await cluster.client.has(cluster.get("gcp-node-3"), blob.chunk_id)


async def test_a_chunk_processed_twice_stays_staged_until_both_are_released(
        cluster: Cluster) -> None:
    """Identical pieces of two files: one staged blob, released by the last of them."""
    first = await stage(cluster, "aws-node-1")
    second = await stage(cluster, "aws-node-1")
    assert first == second
    src = cluster.get("aws-node-1")
    await cluster.client.release(src, first.chunk_id)
    await push(cluster, "aws-node-1", "aws-node-3", second)
    await cluster.client.release(src, second.chunk_id)
    with pytest.raises(ChunkNotFound):
        await push(cluster, "aws-node-1", "gcp-node-1", second)


async def test_inventory_lists_every_chunk_of_a_full_node(cluster: Cluster) -> None:
    """Thousands of ids (over 64 KiB of them) come back whole, on any carrier."""
    ids = sorted(hashlib.sha256(str(n).encode()).hexdigest() for n in range(2000))
    for chunk_id in ids:  # planted behind the node's back: listing only reads names
        path = object_path(cluster, "gcp-node-3", chunk_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert await cluster.client.inventory(cluster.get("gcp-node-3")) == ids
