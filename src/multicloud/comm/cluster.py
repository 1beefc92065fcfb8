"""A cluster: the node registry plus the means to reach its nodes.

`Cluster` is what the orchestrator runs on and what `create_local_cluster` (embedded) and
`connect_cluster` (HTTP) return. It is a `NodeRegistry` (so `cluster.nodes["aws-node-2"]
.status = "unhealthy"` works as on any registry) with the `NodeClient` that reaches the
nodes, the `Faults` that can be injected into them, and what to stop when it closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from multicloud.comm.client import NodeClient
from multicloud.comm.faults import Faults
from multicloud.control.membership import RegistryCatalog
from multicloud.control.registry import NodeRegistry, WorkerNode
from multicloud.core.config import ClusterConfig, ProcessingConfig
from multicloud.core.errors import MulticloudError, NodeUnavailable
from multicloud.core.messages import Channel
from multicloud.core.network import NetworkTopology
from multicloud.core.types import NodeStatus

log = logging.getLogger(__name__)


class Cluster(NodeRegistry):
    """A node registry whose nodes can be reached, and faulted, over one channel."""

    def __init__(self, config: ClusterConfig, nodes: list[WorkerNode], channel: Channel, *,
                 topology: NetworkTopology | None = None,
                 data_dir: Path | None = None) -> None:
        super().__init__(config, nodes, topology, data_dir)
        self.client = NodeClient(channel, self.topology, config.time_scale)
        self.faults = Faults(self, channel, self.topology)
        self._on_close: list[Callable[[], Awaitable[None]]] = []
        # Cluster mode: the registry keeps the batch catalogue too (None when embedded).
        self.registry_catalog: RegistryCatalog | None = None

    async def configure(self, processing: ProcessingConfig) -> None:
        """Give every node in service the transform chain and worker slots of this run."""
        nodes = self.healthy_nodes()
        results = await asyncio.gather(*(self.client.configure(n, processing) for n in nodes),
                                       return_exceptions=True)
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, NodeUnavailable):
                # Down already: the run's failure handling routes around it.
                self.record_failure(node.id, 1, str(result))
            elif isinstance(result, BaseException):
                raise result

    async def report(self) -> list[dict[str, Any]]:
        """Every node with its place, health, and what it stores (0 when unreachable)."""
        async def row(node: WorkerNode) -> dict[str, Any]:
            try:
                chunks, nbytes = await self.client.usage(node)
            except MulticloudError:
                chunks, nbytes = 0, 0  # a node that is down: its row still shows it
            return {"id": node.id, "cloud": node.cloud, "region": node.region,
                    "status": node.status.value, "url": node.url, "chunks": chunks,
                    "bytes": nbytes, "capacity_bytes": node.capacity_bytes}

        return list(await asyncio.gather(*(row(n) for _, n in sorted(self.nodes.items()))))

    async def probe(self) -> list[str]:
        """Health-check every node in service; mark the silent ones unhealthy (returned).

        Run before repair, so that replicas on a node that died quietly (no transfer to it
        failed yet, its heartbeat timeout not yet up) are not counted as safe.
        """
        nodes = self.healthy_nodes()
        results = await asyncio.gather(*(self.client.ping(n) for n in nodes),
                                       return_exceptions=True)
        down = []
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, MulticloudError):
                node.set_status(NodeStatus.UNHEALTHY, f"health check failed: {result}")
                down.append(node.id)
            elif isinstance(result, BaseException):
                raise result
        return down

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run closer when the cluster closes (a membership watcher, the local nodes)."""
        self._on_close.append(closer)

    async def close(self) -> None:
        """Stop what watches the cluster, release the connections, close local nodes."""
        await self.client.close()
        for closer in reversed(self._on_close):
            await closer()
        self._on_close.clear()
