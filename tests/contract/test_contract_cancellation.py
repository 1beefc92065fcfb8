"""A caller that gives up on a write reaches the node: nothing lands that nobody recorded.

The coordinator cancels a replicate when it times out or takes the target for down; it
records no replica then, so the target must not keep one either (it would be an orphan
that no manifest counts and no repair removes).
"""

from __future__ import annotations

import asyncio

import pytest
from contract_support import scrape, stage, wait_until, within

from cluster_kinds import temp_files
from multicloud import Cluster


async def write_requests(cluster: Cluster, node_id: str, route: str) -> dict[str, float]:
    """How the node's finished requests on route ended: status -> count."""
    scraped = await scrape(cluster, node_id)
    return scraped.labelled("multicloud_node_requests_total", "status", route=route)


@pytest.mark.parametrize("dst", ["gcp-node-1", "aws-node-1"], ids=["to-a-peer", "in-place"])
async def test_a_cancelled_replicate_leaves_nothing_at_the_target(cluster: Cluster,
                                                                  dst: str) -> None:
    # To a peer, the target's write is a put; in place, the push itself writes.
    route = "push" if dst == "aws-node-1" else "put"
    blob = await stage(cluster, "aws-node-1")
    gate = await cluster.faults.hold_writes(dst)
    replicate = asyncio.create_task(
        cluster.client.replicate(cluster.get("aws-node-1"), cluster.get(dst), blob))
    try:
        await within(gate.arrived())
        replicate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await replicate

        # The cancel reaches the held write: its request ends (and is counted) while
        # the gate is still closed. A write the cancel missed would wait here for
        # the gate, then store a blob that nobody recorded.
        async def write_ended() -> bool:
            return bool(await write_requests(cluster, dst, route))

        await wait_until(write_ended, f"the cancelled {route} at {dst} to end")
    finally:
        await gate.release()
    assert await write_requests(cluster, dst, route) == {"cancelled": 1.0}
    assert blob.chunk_id not in await cluster.client.inventory(cluster.get(dst))
    assert temp_files(cluster, dst) == []
    assert await gate.held() == 1  # nothing else arrived at the gate


async def test_a_cancelled_write_already_on_the_disk_is_taken_back(cluster: Cluster) -> None:
    """The cancel arrives while the disk write runs (it cannot be stopped): once it has
    finished, the node removes the object it made, and the chunk's lock held throughout."""
    blob = await stage(cluster, "aws-node-1")
    dst = cluster.get("gcp-node-1")
    await cluster.faults.hold_disk(dst.id)
    replicate = asyncio.create_task(
        cluster.client.replicate(cluster.get("aws-node-1"), dst, blob))
    try:
        await within(cluster.faults.wait_disk_held(dst.id))
        replicate.cancel()

        async def cancel_arrived() -> bool:  # over HTTP it crosses two hops to get there
            return bool((await cluster.faults.state(dst.id))["undoing"])

        await wait_until(cancel_arrived, "the cancel to reach the write on the disk")
    finally:
        await cluster.faults.release_disk(dst.id)
    with pytest.raises(asyncio.CancelledError):
        await replicate  # in-process, the cancelled task waits for the disk write too

    async def taken_back() -> bool:
        return (bool(await write_requests(cluster, dst.id, "put"))
                and blob.chunk_id not in await cluster.client.inventory(dst))

    await wait_until(taken_back, "the cancelled write to be taken back")
    assert await write_requests(cluster, dst.id, "put") == {"cancelled": 1.0}
    assert temp_files(cluster, dst.id) == []
    # A write that was not cancelled still lands: the gate is gone with the release.
    await cluster.client.replicate(cluster.get("aws-node-1"), dst, blob)
    assert await cluster.client.check(dst, blob.chunk_id) == "ok"
