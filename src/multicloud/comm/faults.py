"""Fault injection for any cluster: the switches a test (or a soak) turns.

Each fault is a `fault` request to the nodes it concerns, carried like any other request,
so the same test crashes an in-process node and an HTTP node alike; the node suffers it
where a real one would (see `multicloud.node.faults`). A partition is told to every node,
as every machine's network would see it; a slow link changes the link the orchestrator
hands to the sending node. HTTP nodes take faults only when started with
`--allow-faults`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from multicloud.control.registry import NodeRegistry
from multicloud.core.errors import NodeUnavailable
from multicloud.core.messages import Channel, Request
from multicloud.core.network import NetworkTopology
from multicloud.core.types import NodeStatus

FAULT_S = 10.0  # a node that cannot switch a fault this fast hangs


class WriteGate:
    """A node's held writes: wait for one to arrive, count them, let them through."""

    def __init__(self, faults: Faults, node_id: str) -> None:
        self._faults = faults
        self.node_id = node_id

    async def arrived(self) -> int:
        """Wait until a write is held; the number held."""
        return int((await self._faults.send(self.node_id, "wait_held"))["held"])

    async def held(self) -> int:
        """Writes held so far (they stay counted once released)."""
        return int((await self._faults.send(self.node_id, "held"))["held"])

    async def release(self) -> None:
        """Let held and later writes through."""
        await self._faults.send(self.node_id, "release_writes")


class Faults:
    """Crash, restart, partition, slow down, corrupt and fill the nodes of a cluster."""

    def __init__(self, registry: NodeRegistry, channel: Channel,
                 topology: NetworkTopology) -> None:
        self.registry = registry
        self.channel = channel
        self.topology = topology

    async def send(self, node_id: str, action: str, **args: Any) -> dict[str, Any]:
        """Switch one fault on node_id; the node's answer. NodeUnavailable when a node
        that hangs does not answer within FAULT_S (a `wait_*` action waits as long as
        its condition takes)."""
        node = self.registry.get(node_id)
        request = Request("fault", {"action": action, **args})
        if action.startswith("wait_"):
            return (await self.channel.call(node.address, request)).meta
        try:
            async with asyncio.timeout(FAULT_S):
                reply = await self.channel.call(node.address, request)
        except TimeoutError:
            raise NodeUnavailable(node_id, f"no answer to a fault request in {FAULT_S:g}s"
                                  ) from None
        return reply.meta

    async def state(self, node_id: str) -> dict[str, Any]:
        """The faults switched on at node_id: crashed, partitions, quota_bytes, held, and
        undoing (cancelled writes waiting for their disk write to take it back)."""
        return await self.send(node_id, "state")

    async def crash(self, node_id: str) -> None:
        """The node stops answering; its staged (unstored) blobs are lost, its disk is kept."""
        await self.send(node_id, "crash")

    async def restart(self, node_id: str) -> None:
        """Bring a crashed node back with its disk; it rejoins as healthy."""
        await self.send(node_id, "restart")
        self.registry.get(node_id).set_status(NodeStatus.HEALTHY, "restarted")

    async def partition(self, cloud_a: str, cloud_b: str) -> None:
        """Cut the network between two clouds (every node is told)."""
        await self._everyone("partition", a=cloud_a, b=cloud_b)

    async def heal(self) -> None:
        """Remove every partition."""
        await self._everyone("heal")

    def slow_link(self, cloud_a: str, cloud_b: str, factor: float) -> None:
        """Make links between two clouds `factor` times slower (both ways)."""
        self.topology.slow_down(cloud_a, cloud_b, factor)

    async def corrupt(self, node_id: str, chunk_id: str) -> int:
        """Flip one byte of a stored replica (bit rot); the offset flipped."""
        return int((await self.send(node_id, "corrupt", chunk_id=chunk_id))["offset"])

    async def lose(self, node_id: str, chunk_id: str) -> bool:
        """Delete a stored replica behind the cluster's back (a lost disk sector)."""
        return bool((await self.send(node_id, "lose", chunk_id=chunk_id))["lost"])

    async def crash_during_write(self, node_id: str, nth: int = 1) -> None:
        """Crash the node in the middle of its nth next write, leaving a partial temp file."""
        await self.send(node_id, "crash_during_write", nth=nth)

    async def disarm(self, node_id: str) -> None:
        """Call off a crash_during_write that has not struck yet."""
        await self.send(node_id, "disarm")

    async def disk_full(self, node_id: str, full: bool = True) -> None:
        """Fill the node's disk (every new write fails with DiskFull), or free it again."""
        await self.send(node_id, "disk_full", full=full)

    async def hold_disk(self, node_id: str) -> None:
        """Stop every write to node_id on its disk, before the rename that commits it."""
        await self.send(node_id, "hold_disk")

    async def wait_disk_held(self, node_id: str) -> None:
        """Wait until a write to node_id stopped on its disk."""
        await self.send(node_id, "wait_disk_held")

    async def release_disk(self, node_id: str) -> None:
        """Let writes to node_id's disk go on."""
        await self.send(node_id, "release_disk")

    async def hold_writes(self, node_id: str) -> WriteGate:
        """Hold every write to node until the returned gate is released."""
        await self.send(node_id, "hold_writes")
        return WriteGate(self, node_id)

    async def _everyone(self, action: str, **args: Any) -> None:
        await asyncio.gather(*(self.send(node_id, action, **args)
                               for node_id in sorted(self.registry.nodes)))
