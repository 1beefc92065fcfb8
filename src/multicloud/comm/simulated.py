"""The embedded transport: nodes in this process, links emulated, faults injected on demand.

Each node is a `NodeService` with its own chunk store under the data dir. Every transfer
is charged to its link; with `time_scale > 0` it also waits for it, and transfers on one
link share its bandwidth (a FIFO pipe), so cross-cloud traffic is measurably slower.
`time_scale: 0` keeps the accounting and skips the waiting. Faults (crash, partition,
slow link, corrupted or lost replica, a crash in the middle of a write) are seeded.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from multicloud.comm.transport import ReplicaState, Transport
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import NodeUnavailable
from multicloud.core.network import (
    Link,
    LinkEmulator,
    Location,
    NetworkTopology,
    TrafficLedger,
)
from multicloud.core.types import NodeStatus
from multicloud.node.service import NodeService

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry, WorkerNode
    from multicloud.core.types import BlobInfo, Chunk, ReplicaAck


@dataclass
class WriteGate:
    """Holds writes to one node until released, so a test can act at an exact moment."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0

    def release(self) -> None:
        """Let held and later writes through."""
        self.opened.set()


class SimulatedTransport(Transport):
    """Reaches in-process nodes; emulates links; injects faults."""

    def __init__(self, services: dict[str, NodeService], topology: NetworkTopology,
                 time_scale: float = 0.0, seed: int = 0) -> None:
        self.services = services
        self.topology = topology
        self.time_scale = time_scale
        self.ledger = TrafficLedger()
        self.rng = random.Random(seed)
        self.crashed: set[str] = set()
        self.partitions: set[frozenset[str]] = set()
        self._crash_on_write: dict[str, int] = {}
        self._gates: dict[str, WriteGate] = {}
        self.links = LinkEmulator(time_scale)
        self._registry: NodeRegistry | None = None

    def attach(self, registry: NodeRegistry) -> None:
        """Know the registry, so that a restarted node can be put back in service."""
        self._registry = registry

    # -- faults -------------------------------------------------------------------------

    def crash(self, node_id: str) -> None:
        """The node stops answering; its staged (unstored) blobs are lost, its disk is kept."""
        self.crashed.add(node_id)
        self.services[node_id].drop_staged()

    def restart(self, node_id: str) -> None:
        """Bring a crashed node back with its data dir; it rejoins as healthy."""
        self.crashed.discard(node_id)
        service = self.services[node_id]
        service.store._clear_temp_files()
        if self._registry is not None and node_id in self._registry.nodes:
            self._registry.nodes[node_id].set_status(NodeStatus.HEALTHY, "restarted")

    def partition(self, cloud_a: str, cloud_b: str) -> None:
        """Cut the network between two clouds."""
        self.partitions.add(frozenset((cloud_a, cloud_b)))

    def heal(self) -> None:
        """Remove every partition."""
        self.partitions.clear()

    def slow_link(self, cloud_a: str, cloud_b: str, factor: float) -> None:
        """Make links between two clouds `factor` times slower."""
        self.topology.slow_down(cloud_a, cloud_b, factor)

    def corrupt(self, node_id: str, chunk_id: str) -> int:
        """Flip one byte of a stored replica (bit rot); returns the offset flipped."""
        path = self.services[node_id].store.path_for(chunk_id)
        data = bytearray(path.read_bytes())
        offset = self.rng.randrange(len(data))
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        return offset

    def lose(self, node_id: str, chunk_id: str) -> bool:
        """Delete a stored replica behind the cluster's back (a lost disk sector)."""
        return self.services[node_id].store.delete(chunk_id)

    def crash_during_write(self, node_id: str, nth: int = 1) -> None:
        """Crash the node in the middle of its nth next write, leaving a partial temp file."""
        self._crash_on_write[node_id] = nth

    def hold_writes(self, node_id: str) -> WriteGate:
        """Hold every write to node until the returned gate is released."""
        gate = self._gates[node_id] = WriteGate()
        return gate

    # -- Transport ----------------------------------------------------------------------

    async def configure(self, processing: ProcessingConfig) -> None:
        for service in self.services.values():
            service.configure(processing)

    async def ping(self, node: WorkerNode) -> None:
        self._reach(node)

    async def process(self, node: WorkerNode, chunk: Chunk, data: bytes | memoryview,
                      origin: Location) -> BlobInfo:
        service = self._reach(node, origin.cloud)
        await self._move(self.topology.link(origin, node.location), len(data))
        info = await service.process(chunk, data)
        self._reach(node)  # a crash while processing loses the result
        return info

    async def replicate(self, src: WorkerNode, dst: WorkerNode, blob: BlobInfo) -> ReplicaAck:
        source = self._reach(src)  # a partition makes dst unreachable, not src
        target = self._reach(dst, src.cloud)
        if src.id == dst.id:
            await self._before_write(dst)
            ack = await source.persist_staged(blob.chunk_id, blob.blob_checksum)
        else:
            data = await source.blob_for_push(blob.chunk_id)
            await self._move(self.topology.link(src.location, dst.location), len(data))
            await self._before_write(dst)
            target = self._reach(dst, src.cloud)
            ack = await target.write(blob.chunk_id, data, blob.blob_checksum)
        self._reach(dst)  # crashed before the ack left: the writer never hears of it
        return ack

    async def release(self, node: WorkerNode, chunk_id: str) -> None:
        if node.id not in self.crashed:
            self.services[node.id].release(chunk_id)

    async def read(self, node: WorkerNode, chunk_id: str, dest: Location) -> bytes:
        service = self._reach(node, dest.cloud)
        blob = await service.read(chunk_id)
        await self._move(self.topology.link(node.location, dest), len(blob))
        return blob

    async def check(self, node: WorkerNode, chunk_id: str) -> ReplicaState:
        return await self._reach(node).check(chunk_id)

    async def inventory(self, node: WorkerNode) -> list[str]:
        return await self._reach(node).inventory()

    async def usage(self, node: WorkerNode) -> tuple[int, int]:
        return await self._reach(node).usage()

    async def delete(self, node: WorkerNode, chunk_id: str) -> bool:
        return await self._reach(node).delete(chunk_id)

    async def close(self) -> None:
        services = list(self.services.values())
        await asyncio.gather(*(asyncio.to_thread(s.close) for s in services))

    # -- internals ----------------------------------------------------------------------

    def _reach(self, node: WorkerNode, from_cloud: str | None = None) -> NodeService:
        if node.id in self.crashed:
            raise NodeUnavailable(node.id, "connection refused (crashed)")
        if not node.healthy:
            raise NodeUnavailable(node.id, "marked unhealthy")
        if from_cloud is not None and frozenset((from_cloud, node.cloud)) in self.partitions:
            raise NodeUnavailable(node.id, f"network partition between {from_cloud} and "
                                           f"{node.cloud}")
        return self.services[node.id]

    async def _move(self, link: Link, nbytes: int) -> None:
        self.ledger.charge(link, nbytes)
        await self.links.transfer(link, nbytes)

    async def _before_write(self, dst: WorkerNode) -> None:
        gate = self._gates.get(dst.id)
        if gate is not None and not gate.opened.is_set():
            gate.held += 1
            gate.arrived.set()
            await gate.opened.wait()
        remaining = self._crash_on_write.get(dst.id)
        if remaining is not None:
            if remaining > 1:
                self._crash_on_write[dst.id] = remaining - 1
                return
            del self._crash_on_write[dst.id]
            store = self.services[dst.id].store
            (store.root / "tmp" / "interrupted-write.partial").write_bytes(b"\0" * 1024)
            self.crash(dst.id)
            raise NodeUnavailable(dst.id, "crashed in the middle of a write")
