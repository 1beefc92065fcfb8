"""A node verifies what it receives before it acknowledges: bad puts store nothing.

The puts go out raw, through the cluster's channel, as a peer (or an attacker with the
token) would send them: the node, not the client, must refuse them.
"""

from __future__ import annotations

import hashlib

import pytest
from contract_support import OTHER, stage, stored_blob

from cluster_kinds import temp_files
from multicloud import Cluster, IntegrityError
from multicloud.blob import blob_checksum
from multicloud.core.errors import InvalidChunkId
from multicloud.core.messages import Request

TARGET = "gcp-node-1"


async def put(cluster: Cluster, chunk_id: str, body: bytes, checksum: str) -> None:
    """A raw put to TARGET from aws-node-1's place."""
    sender = cluster.get("aws-node-1").location
    request = Request("put", {"chunk_id": chunk_id, "checksum": checksum}, body, sender)
    await cluster.client.channel.call(cluster.get(TARGET).address, request)


async def assert_nothing_stored(cluster: Cluster) -> None:
    """TARGET holds no object and no temp file."""
    node = cluster.get(TARGET)
    assert await cluster.client.inventory(node) == []
    assert await cluster.client.usage(node) == (0, 0)
    assert temp_files(cluster, TARGET) == []


@pytest.fixture
async def good(cluster: Cluster) -> tuple[str, bytes, str]:
    """A good blob as a sender holds it: (chunk id, bytes, checksum)."""
    info = await stage(cluster, "aws-node-1")
    return info.chunk_id, await stored_blob(cluster, "aws-node-1", info), info.blob_checksum


async def test_a_put_that_passes_is_stored(cluster: Cluster, good: tuple[str, bytes, str],
                                           ) -> None:
    chunk_id, blob, checksum = good
    await put(cluster, chunk_id, blob, checksum)
    assert await cluster.client.check(cluster.get(TARGET), chunk_id) == "ok"


async def test_a_wrong_checksum_is_refused(cluster: Cluster, good: tuple[str, bytes, str],
                                           ) -> None:
    chunk_id, blob, _ = good
    with pytest.raises(IntegrityError, match=r"refused.*does not match.*nothing was stored"):
        await put(cluster, chunk_id, blob, "0" * 32)
    await assert_nothing_stored(cluster)


async def test_damaged_bytes_with_their_own_checksum_are_refused(
        cluster: Cluster, good: tuple[str, bytes, str]) -> None:
    chunk_id, blob, _ = good
    damaged = bytearray(blob)
    damaged[-1] ^= 0x01
    with pytest.raises(IntegrityError, match="the blob is corrupt"):
        await put(cluster, chunk_id, bytes(damaged), blob_checksum(bytes(damaged)))
    await assert_nothing_stored(cluster)


async def test_a_blob_under_another_chunk_id_is_refused(
        cluster: Cluster, good: tuple[str, bytes, str]) -> None:
    chunk_id, blob, checksum = good
    other_id = hashlib.sha256(OTHER).hexdigest()
    with pytest.raises(IntegrityError, match=f"holds chunk {chunk_id}, expected chunk {other_id}"):
        await put(cluster, other_id, blob, checksum)
    await assert_nothing_stored(cluster)


@pytest.mark.parametrize("bad_id", ["../x", "A" * 64, "ab" * 33, ""])
async def test_a_malformed_chunk_id_is_refused(cluster: Cluster, good: tuple[str, bytes, str],
                                               bad_id: str) -> None:
    _, blob, checksum = good
    with pytest.raises(InvalidChunkId) as err:
        await put(cluster, bad_id, blob, checksum)
    assert err.value.chunk_id == bad_id
    await assert_nothing_stored(cluster)


async def test_an_empty_body_is_refused(cluster: Cluster, good: tuple[str, bytes, str]) -> None:
    """No bytes are not a blob: refused as any damaged body is, whichever the carrier."""
    chunk_id, _, checksum = good
    with pytest.raises(IntegrityError, match="nothing was stored"):
        await put(cluster, chunk_id, b"", checksum)
    await assert_nothing_stored(cluster)
