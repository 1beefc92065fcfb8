"""The control plane's node operations on both carriers: a node's batch catalog, deletes
conditional on an object's age, the detailed inventory gc reads, and a client's own write
of a blob (a batch manifest), verified before it is stored."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import pytest
from contract_support import object_path

from multicloud import Cluster
from multicloud.blob import TransformChain, blob_checksum, decode_blob
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import ClusterError, IntegrityError, StorageError
from multicloud.core.messages import Request
from multicloud.core.network import Location
from multicloud.core.types import BlobInfo, Chunk

CLIENT = Location("aws", "us-east-1")  # where the orchestrator writes from
HOUR_S = 3600.0


def encoded(raw: bytes) -> tuple[bytes, BlobInfo]:
    """A blob made on the client's side, as the catalogue makes a batch manifest."""
    chunk = Chunk(chunk_id=hashlib.sha256(raw).hexdigest(), file=".multicloud-manifest.json",
                  index=0, offset=0, size_bytes=len(raw), source_cloud="aws")
    return TransformChain(ProcessingConfig()).apply(chunk, raw)


MANIFEST_RAW = json.dumps({"format": "multicloud-manifest/1", "files": [["a", 1]]} | {
    "padding": "x" * 4000}).encode()


def entry(batch_id: str, updated_at: float, **fields: Any) -> dict[str, Any]:
    """A catalog entry as `Catalogue.publish` makes it."""
    return {"batch_id": batch_id, "status": "success", "manifest_object": "cd" * 32,
            "blob": {"chunk_id": "cd" * 32, "raw_size": 10, "blob_size": 20,
                     "blob_checksum": "ef" * 16, "codec": "zstd"},
            "holders": ["aws-node-1", "gcp-node-1"], "source": "/data/café",
            "created_at": 1.5, "updated_at": updated_at, **fields}


async def written(cluster: Cluster, node_id: str, raw: bytes) -> BlobInfo:
    """Write raw's blob to a node with the client's `write`; its BlobInfo."""
    blob, info = encoded(raw)
    await cluster.client.write(cluster.get(node_id), info, blob, CLIENT)
    return info


def age(cluster: Cluster, node_id: str, chunk_id: str, seconds: float) -> float:
    """Set a stored object's mtime back by seconds; its new mtime."""
    path = object_path(cluster, node_id, chunk_id)
    when = path.stat().st_mtime - seconds
    os.utime(path, (when, when))
    return when


# -- the catalog ----------------------------------------------------------------------------


async def test_catalog_put_and_list(cluster: Cluster) -> None:
    node = cluster.get("aws-node-1")
    assert await cluster.client.catalog_list(node) == []
    first, second = entry("b1", 10.0), entry("b2", 11.0, source="/data/b2")
    assert await cluster.client.catalog_put(node, first)
    assert await cluster.client.catalog_put(node, second)
    listed = await cluster.client.catalog_list(node)
    assert sorted(listed, key=lambda e: e["batch_id"]) == [first, second]
    # Each node keeps its own catalog: the catalogue tells every node.
    assert await cluster.client.catalog_list(cluster.get("gcp-node-1")) == []


async def test_catalog_keeps_the_newest_entry_and_tombstones(cluster: Cluster) -> None:
    node = cluster.get("gcp-node-2")
    assert await cluster.client.catalog_put(node, entry("b", 2.0))
    assert not await cluster.client.catalog_put(node, entry("b", 1.0, source="/stale"))
    assert not await cluster.client.catalog_put(node, entry("b", 2.0, source="/same-age"))
    assert await cluster.client.catalog_list(node) == [entry("b", 2.0)]
    gone = {"batch_id": "b", "status": "deleted", "updated_at": 3.0}
    assert await cluster.client.catalog_put(node, gone)
    assert not await cluster.client.catalog_put(node, entry("b", 2.5))
    assert await cluster.client.catalog_list(node) == [gone]


async def test_catalog_refuses_a_malformed_entry_and_an_unknown_action(cluster: Cluster,
                                                                       ) -> None:
    node = cluster.get("aws-node-2")
    with pytest.raises(StorageError, match="batch_id and updated_at"):
        await cluster.client.catalog_put(node, {"batch_id": "b"})
    with pytest.raises(ClusterError, match="'list'"):
        await cluster.client.channel.call(node.address, Request("catalog", {"action": "drop"}))
    with pytest.raises(ClusterError, match="'put'"):
        await cluster.client.channel.call(node.address, Request("catalog", {"action": "put"}))
    assert await cluster.client.catalog_list(node) == []


# -- a client's write ---------------------------------------------------------------------


async def test_write_stores_a_verified_durable_blob(cluster: Cluster) -> None:
    blob, info = encoded(MANIFEST_RAW)
    node = cluster.get("gcp-node-1")
    before = cluster.client.ledger.snapshot()
    ack = await cluster.client.write(node, info, blob, CLIENT)
    assert (ack.node_id, ack.chunk_id, ack.blob_checksum, ack.blob_size) == (
        "gcp-node-1", info.chunk_id, info.blob_checksum, len(blob))
    assert await cluster.client.check(node, info.chunk_id) == "ok"
    assert object_path(cluster, "gcp-node-1", info.chunk_id).read_bytes() == blob
    read = await cluster.client.read(node, info.chunk_id, CLIENT)
    assert decode_blob(read, expected_chunk_id=info.chunk_id) == MANIFEST_RAW
    assert await cluster.client.usage(node) == (1, len(blob))
    charged = cluster.client.ledger.difference(cluster.client.ledger.snapshot(), before)
    link = "aws/us-east-1->gcp/us-central1"
    assert link in charged, sorted(charged)
    assert charged[link].bytes >= len(blob)  # the write went out; the read came back


async def test_write_with_a_wrong_checksum_is_refused_and_stores_nothing(
        cluster: Cluster) -> None:
    blob, info = encoded(MANIFEST_RAW)
    node = cluster.get("aws-node-3")
    wrong = BlobInfo(info.chunk_id, info.raw_size, info.blob_size, "0" * 32, info.codec)
    with pytest.raises(IntegrityError, match="checksum"):
        await cluster.client.write(node, wrong, blob, CLIENT)
    assert not await cluster.client.has(node, info.chunk_id)
    assert await cluster.client.inventory(node) == []
    assert await cluster.client.usage(node) == (0, 0)


async def test_write_refuses_bytes_damaged_before_the_checksum_was_taken(
        cluster: Cluster) -> None:
    """A checksum that matches the bytes is not enough: the blob must hold its chunk."""
    blob, info = encoded(MANIFEST_RAW)
    damaged = bytearray(blob)
    damaged[-1] ^= 0xFF
    rotten = BlobInfo(info.chunk_id, info.raw_size, len(damaged), blob_checksum(bytes(damaged)),
                      info.codec)
    node = cluster.get("aws-node-1")
    with pytest.raises(IntegrityError):
        await cluster.client.write(node, rotten, bytes(damaged), CLIENT)
    other_blob, other = encoded(b"another manifest")
    misnamed = BlobInfo(info.chunk_id, other.raw_size, other.blob_size, other.blob_checksum,
                        other.codec)
    with pytest.raises(IntegrityError, match="expected chunk"):
        await cluster.client.write(node, misnamed, other_blob, CLIENT)
    assert await cluster.client.inventory(node) == []


# -- the detailed inventory, and deletes conditional on age ---------------------------------


async def test_inventory_details_give_id_size_and_mtime(cluster: Cluster) -> None:
    node = cluster.get("aws-node-2")
    assert await cluster.client.objects(node) == []
    first = await written(cluster, "aws-node-2", MANIFEST_RAW)
    second = await written(cluster, "aws-node-2", b"second")
    aged = age(cluster, "aws-node-2", second.chunk_id, HOUR_S)
    objects = sorted(await cluster.client.objects(node))
    want = sorted([
        (first.chunk_id, first.blob_size,
         object_path(cluster, "aws-node-2", first.chunk_id).stat().st_mtime),
        (second.chunk_id, second.blob_size, aged)])
    assert [(c, n) for c, n, _ in objects] == [(c, n) for c, n, _ in want]
    assert [t for _, _, t in objects] == pytest.approx([t for _, _, t in want], abs=1e-6)
    # Without details, ids alone, as before.
    assert await cluster.client.inventory(node) == sorted([first.chunk_id, second.chunk_id])


async def test_delete_older_than_takes_an_old_object_and_keeps_a_fresh_one(
        cluster: Cluster) -> None:
    node = cluster.get("gcp-node-3")
    old = await written(cluster, "gcp-node-3", b"written long ago")
    fresh = await written(cluster, "gcp-node-3", MANIFEST_RAW)
    age(cluster, "gcp-node-3", old.chunk_id, HOUR_S)
    cutoff = time.time() - 60  # gc's grace: objects younger than this stay

    assert await cluster.client.delete(node, old.chunk_id, older_than=cutoff)
    assert not await cluster.client.delete(node, fresh.chunk_id, older_than=cutoff)
    assert not await cluster.client.has(node, old.chunk_id)
    assert await cluster.client.check(node, fresh.chunk_id) == "ok"
    assert await cluster.client.usage(node) == (1, fresh.blob_size)
    # Gone already: nothing to delete, conditional or not.
    assert not await cluster.client.delete(node, old.chunk_id, older_than=cutoff)
    assert not await cluster.client.delete(node, old.chunk_id)


async def test_delete_older_than_keeps_an_object_written_at_the_cutoff(cluster: Cluster,
                                                                       ) -> None:
    node = cluster.get("aws-node-1")
    info = await written(cluster, "aws-node-1", MANIFEST_RAW)
    [(_, _, mtime)] = await cluster.client.objects(node)
    assert not await cluster.client.delete(node, info.chunk_id, older_than=mtime)
    assert await cluster.client.has(node, info.chunk_id)
    assert await cluster.client.delete(node, info.chunk_id, older_than=mtime + 1.0)
    assert await cluster.client.objects(node) == []


async def test_an_unconditional_delete_takes_a_fresh_object(cluster: Cluster) -> None:
    node = cluster.get("gcp-node-1")
    info = await written(cluster, "gcp-node-1", MANIFEST_RAW)
    assert await cluster.client.delete(node, info.chunk_id)
    assert await cluster.client.usage(node) == (0, 0)
