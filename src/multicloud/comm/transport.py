"""The one interface through which the orchestrator reaches nodes and nodes move bytes.

The coordinator logic (placement, quorum, retries, repair) is written once against this
class; `SimulatedTransport` runs nodes in this process, `HttpTransport` reaches node
processes over HTTP. Both charge every transfer to its link in the `TrafficLedger`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Literal

from multicloud.core.config import ProcessingConfig
from multicloud.core.network import Location, TrafficLedger

if TYPE_CHECKING:
    from multicloud.control.registry import WorkerNode
    from multicloud.core.types import BlobInfo, Chunk, ReplicaAck

ReplicaState = Literal["ok", "missing", "corrupt"]


class Transport(abc.ABC):
    """How the control plane talks to nodes, and how the data plane moves bytes."""

    ledger: TrafficLedger

    @abc.abstractmethod
    async def configure(self, processing: ProcessingConfig) -> None:
        """Give every node the transform chain and worker slots of this run."""

    @abc.abstractmethod
    async def ping(self, node: WorkerNode) -> None:
        """Raise NodeUnavailable unless node answers now."""

    @abc.abstractmethod
    async def process(self, node: WorkerNode, chunk: Chunk, data: bytes | memoryview,
                      origin: Location) -> BlobInfo:
        """Send raw bytes from origin (the source bucket) to node; it processes and stages them."""

    @abc.abstractmethod
    async def replicate(self, src: WorkerNode, dst: WorkerNode, blob: BlobInfo) -> ReplicaAck:
        """Have src push its staged or stored blob to dst (src == dst stores it in place)."""

    @abc.abstractmethod
    async def release(self, node: WorkerNode, chunk_id: str) -> None:
        """Let node drop the staged blob of a chunk whose writes have all finished."""

    @abc.abstractmethod
    async def read(self, node: WorkerNode, chunk_id: str, dest: Location) -> bytes:
        """Fetch a verified blob from node to dest (a restore)."""

    @abc.abstractmethod
    async def check(self, node: WorkerNode, chunk_id: str) -> ReplicaState:
        """Have node scrub one replica in place."""

    @abc.abstractmethod
    async def inventory(self, node: WorkerNode) -> list[str]:
        """Ids of every chunk node holds."""

    @abc.abstractmethod
    async def usage(self, node: WorkerNode) -> tuple[int, int]:
        """(chunks, bytes) node holds."""

    @abc.abstractmethod
    async def delete(self, node: WorkerNode, chunk_id: str) -> bool:
        """Remove a chunk from node."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections, threads and files."""
