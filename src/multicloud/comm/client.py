"""The orchestrator's side of the data plane: typed node operations over a `Channel`.

Written once for every carrier. It keeps nodes marked unhealthy out of service (every
operation but `release` refuses them), works out the link each transfer crosses (so the
node that sends the bytes can emulate it) and charges the `TrafficLedger` with the bytes
that were actually sent, failed attempts included, as clouds bill them: the source bytes
when they leave for a processing node, a push's bytes as the pushing node reports them,
a read's bytes as they arrive.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from multicloud.blob.validate import InvalidRecord
from multicloud.control.registry import WorkerNode
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import NodeUnavailable, ReplicaRefused, StorageError, from_wire
from multicloud.core.messages import Body, Channel, Reply, Request
from multicloud.core.network import LinkEmulator, Location, NetworkTopology, TrafficLedger
from multicloud.core.types import BlobInfo, Chunk, ReplicaAck

ReplicaState = Literal["ok", "missing", "corrupt"]
PING_S = 2.0  # a node that cannot answer a health check this fast is not fit to hold data
# How long a node may take over a control operation (no bulk bytes), whose caller sets no
# deadline of its own: a node that hangs (SIGSTOP, a wedged disk) must cost a verify or a
# gc this much, not HTTP's five minutes per call. Replica writes and processing have
# adaptive timeouts; a read or a manifest put moves bytes whose time depends on the link.
OP_DEADLINES_S = {"health": 30.0, "configure": 30.0, "check": 60.0, "has": 30.0,
                  "inventory": 120.0, "usage": 30.0, "delete": 30.0, "catalog": 60.0}


@dataclass(frozen=True, slots=True)
class ProcessOutcome:
    """What a node made of a chunk: the staged blob, and the record that did not parse."""

    blob: BlobInfo
    # The chunk's first record that does not parse, stored as it is all the same
    # (`processing.on_invalid_records: quarantine`); None when every record parses.
    invalid: InvalidRecord | None = None


class NodeClient:
    """Reaches the nodes of a cluster; records what every transfer cost."""

    def __init__(self, channel: Channel, topology: NetworkTopology,
                 time_scale: float = 0.0) -> None:
        self.channel = channel
        self.topology = topology
        self.time_scale = time_scale
        self.ledger = TrafficLedger()
        self.links = LinkEmulator(time_scale)  # for the source bytes this side sends
        # The run's transform chain, sent with every chunk: a node that missed `configure`
        # (down at the start of the run, restarted since) still processes with it.
        self._processing: dict[str, Any] | None = None

    async def ping(self, node: WorkerNode, timeout_s: float = PING_S) -> None:
        """Raise NodeUnavailable unless node answers a health check within timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._call(node, "health")
        except TimeoutError:
            raise NodeUnavailable(node.id, f"no answer to a health check in {timeout_s}s") \
                from None

    async def configure(self, node: WorkerNode, processing: ProcessingConfig) -> None:
        """Give node the transform chain, its worker slots and the link time scale."""
        self._processing = processing.model_dump(mode="json")
        await self._call(node, "configure", {"processing": self._processing,
                                             "time_scale": self.time_scale})

    async def process(self, node: WorkerNode, chunk: Chunk, data: Body | None,
                      origin: Location) -> BlobInfo:
        """Send raw bytes from origin (the source bucket) to node; it processes and stages them."""
        return (await self.process_outcome(node, chunk, data, origin)).blob

    async def process_outcome(self, node: WorkerNode, chunk: Chunk, data: Body | None,
                              origin: Location) -> ProcessOutcome:
        """`process`, also bringing back the record that did not parse, if any.

        Without data the chunk is a reference (`chunk.source_ref`): the node reads the
        range from the bucket itself, and emulates the bucket-to-node link it crosses.
        """
        self._in_service(node)
        link = self.topology.link(origin, node.location)
        meta: dict[str, Any] = {"chunk": chunk.to_json()}
        if data is None:
            if chunk.source_ref is None:
                raise ValueError("process_outcome needs the chunk's bytes or a source_ref")
            meta["link"] = link.to_json()
        else:
            await self.links.transfer(f"bucket {origin}", link, len(data))
        # Charged whether the orchestrator sends the bytes or the node fetches them: the
        # bucket's cloud bills the read either way (and the attempt, if it fails).
        self.ledger.charge(link, chunk.size_bytes if data is None else len(data))
        if self._processing is not None:
            meta["processing"] = self._processing
        reply = await self._call(node, "process", meta, data, origin)
        invalid = reply.meta.get("invalid")
        return ProcessOutcome(BlobInfo.from_json(reply.meta["blob"]),
                              InvalidRecord.from_json(invalid) if invalid else None)

    async def replicate(self, src: WorkerNode, dst: WorkerNode, blob: BlobInfo) -> ReplicaAck:
        """Have src push its staged or stored blob to dst (src == dst stores it in place).

        A failure of dst is `ReplicaRefused` (its cause attached); anything else raised is
        a failure of src (down, or no longer holding a good copy of the blob).
        """
        if not dst.healthy:
            unavailable = NodeUnavailable(dst.id, "marked unhealthy")
            raise ReplicaRefused(dst.id, blob.chunk_id, unavailable)
        link = self.topology.link(src.location, dst.location)
        reply = await self._call(src, "push", {"chunk_id": blob.chunk_id,
                                               "target": dst.address.to_json(),
                                               "link": link.to_json()})
        sent = int(reply.meta.get("sent_bytes", 0))
        if sent:
            self.ledger.charge(link, sent)
        if reply.meta.get("error"):
            raise ReplicaRefused(dst.id, blob.chunk_id, from_wire(reply.meta["error"]))
        ack = ReplicaAck.from_json(reply.meta["ack"])
        if (ack.node_id, ack.chunk_id) != (dst.id, blob.chunk_id):
            raise StorageError(f"node {src.id} answered a push of chunk {blob.chunk_id[:12]} "
                               f"to {dst.id} with an ack of {ack.chunk_id[:12]} on {ack.node_id}")
        return ack

    async def release(self, node: WorkerNode, chunk_id: str) -> None:
        """Let node drop the staged blob of a chunk whose writes have all finished (even a
        node marked unhealthy, which may hold it yet; one that hangs is given up on)."""
        try:
            async with asyncio.timeout(PING_S):
                await self.channel.call(node.address, Request("release", {"chunk_id": chunk_id}))
        except TimeoutError:
            raise NodeUnavailable(node.id, f"no answer to a release in {PING_S}s") from None

    async def read(self, node: WorkerNode, chunk_id: str, dest: Location) -> bytes:
        """Fetch a verified blob from node to dest (a restore)."""
        link = self.topology.link(node.location, dest)
        reply = await self._call(node, "get", {"chunk_id": chunk_id, "link": link.to_json()},
                                 sender=dest)
        blob = reply.body or b""
        self.ledger.charge(link, len(blob))
        return blob

    async def check(self, node: WorkerNode, chunk_id: str) -> ReplicaState:
        """Have node scrub one replica in place."""
        state: ReplicaState = (await self._call(node, "check", {"chunk_id": chunk_id})
                               ).meta["state"]
        return state

    async def has(self, node: WorkerNode, chunk_id: str) -> bool:
        """Whether node holds an object for the chunk (unverified)."""
        return bool((await self._call(node, "has", {"chunk_id": chunk_id})).meta["present"])

    async def inventory(self, node: WorkerNode) -> list[str]:
        """Ids of every chunk node holds."""
        return list((await self._call(node, "inventory")).meta["chunks"])

    async def usage(self, node: WorkerNode) -> tuple[int, int]:
        """(chunks, bytes) node holds."""
        meta = (await self._call(node, "usage")).meta
        return int(meta["chunks"]), int(meta["bytes"])

    async def delete(self, node: WorkerNode, chunk_id: str,
                     older_than: float | None = None) -> bool:
        """Remove a chunk from node (with older_than: only if written before then)."""
        meta: dict[str, Any] = {"chunk_id": chunk_id}
        if older_than is not None:
            meta["older_than"] = older_than
        return bool((await self._call(node, "delete", meta)).meta["deleted"])

    async def objects(self, node: WorkerNode) -> list[tuple[str, int, float]]:
        """(id, size, mtime) of every object node holds."""
        reply = await self._call(node, "inventory", {"details": True})
        return [(str(c), int(n), float(t)) for c, n, t in reply.meta["objects"]]

    async def write(self, node: WorkerNode, blob: BlobInfo, data: Body,
                    origin: Location) -> ReplicaAck:
        """Store a blob made on this side (a batch manifest) on node, verified and durable."""
        link = self.topology.link(origin, node.location)
        self.ledger.charge(link, len(data))
        await self.links.transfer(f"client {origin}", link, len(data))
        reply = await self._call(node, "put", {"chunk_id": blob.chunk_id,
                                               "checksum": blob.blob_checksum}, data, origin)
        return ReplicaAck.from_json(reply.meta["ack"])

    async def catalog_put(self, node: WorkerNode, entry: dict[str, Any]) -> bool:
        """Record a batch entry on node; False when node holds a newer one."""
        return bool((await self._call(node, "catalog", {"action": "put", "entry": entry})
                     ).meta["kept"])

    async def catalog_list(self, node: WorkerNode) -> list[dict[str, Any]]:
        """The batch entries node holds."""
        return list((await self._call(node, "catalog", {"action": "list"})).meta["entries"])

    async def close(self) -> None:
        """Release the channel's connections."""
        await self.channel.close()

    def _in_service(self, node: WorkerNode) -> None:
        if not node.healthy:
            raise NodeUnavailable(node.id, "marked unhealthy")

    async def _call(self, node: WorkerNode, op: str, meta: dict[str, Any] | None = None,
                    body: Body | None = None, sender: Location | None = None) -> Reply:
        self._in_service(node)
        request = Request(op, meta or {}, body, sender)
        deadline = OP_DEADLINES_S.get(op)
        if deadline is None:
            return await self.channel.call(node.address, request)
        try:
            async with asyncio.timeout(deadline):
                return await self.channel.call(node.address, request)
        except TimeoutError:
            raise NodeUnavailable(node.id, f"no answer to {op} in {deadline:g}s") from None
