"""Repair: bring chunks back to `replication_factor` replicas on healthy nodes.

For each chunk with too few replicas on healthy nodes, new targets come from its placement
(minus the nodes that hold or failed it), and a healthy holder pushes the blob to each
through the `ReplicaWriter`, the same writer distribution uses. A holder whose copy turns
out corrupt or gone is forgotten in the manifest (and made up for), and the next holder
is tried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from multicloud.control.registry import NodeRegistry
from multicloud.core.config import DistributionConfig
from multicloud.core.errors import (
    ChunkNotFound,
    InsufficientNodes,
    IntegrityError,
    MulticloudError,
    ReplicaRefused,
)
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import NetworkAwarePlacement, has_room
from multicloud.pipeline.replicas import ReplicaWriter
from multicloud.pipeline.storage import StorageManager

log = logging.getLogger(__name__)

RecordReplica = Callable[[str, str], None]


@dataclass
class RepairReport:
    """What one repair pass did."""

    checked: int = 0
    replicas_created: int = 0
    dropped_corrupt: int = 0  # holders whose copy was corrupt or gone: forgotten
    under_replicated: int = 0  # chunks still below replication_factor
    lost: int = 0  # chunks with no healthy replica left at all


class Repairer:
    """Re-replicates under-replicated chunks from a healthy holder to new nodes."""

    def __init__(self, registry: NodeRegistry, manifest: Callable[[], Manifest],
                 config: DistributionConfig, writer: ReplicaWriter,
                 record_replica: RecordReplica,
                 placement: NetworkAwarePlacement | None = None) -> None:
        self.registry = registry
        self._manifest = manifest  # opened on first use, by whoever owns it
        self.config = config
        self.writer = writer
        self.record_replica = record_replica
        self.placement = placement or NetworkAwarePlacement(registry, None, config)

    async def repair(self, chunk_ids: Iterable[str]) -> RepairReport:
        """Re-replicate those of chunk_ids with fewer than replication_factor healthy replicas."""
        ids = sorted(set(chunk_ids))
        manifest = self._manifest()
        holders = await asyncio.to_thread(manifest.replicas, ids)
        report = RepairReport(checked=len(ids))
        limit = asyncio.Semaphore(self.config.max_concurrent_distributions)

        async def one(chunk_id: str) -> None:
            async with limit:
                await self._repair_chunk(chunk_id, holders.get(chunk_id, []), report)

        async with asyncio.TaskGroup() as group:
            for chunk_id in ids:
                group.create_task(one(chunk_id))
        return report

    async def _repair_chunk(self, chunk_id: str, holders: list[str],
                            report: RepairReport) -> None:
        rf = self.config.replication_factor
        nodes = self.registry.nodes
        healthy = [h for h in holders if h in nodes and nodes[h].healthy]
        if len(healthy) >= rf:
            return
        if not healthy:
            report.lost += 1
            report.under_replicated += 1
            log.error("chunk %s has no healthy replica left", chunk_id)
            return
        manifest = self._manifest()
        blob = await asyncio.to_thread(manifest.blob, chunk_id)
        if blob is None:
            report.under_replicated += 1
            return
        sources = list(healthy)
        for target in self._targets(chunk_id, healthy, holders, blob.blob_size):
            if len(healthy) >= rf or not sources:
                break
            while sources:
                src, dst = nodes[sources[0]], nodes[target]
                try:
                    await self.writer.write(src, dst, blob)
                except ReplicaRefused as exc:
                    log.warning("repair: copy of %s to %s failed: %s", chunk_id[:12], dst.id,
                                exc.cause)
                    break  # try the next target
                except MulticloudError as exc:  # the holder failed, or its copy is gone or bad
                    log.warning("repair: holder %s of %s failed: %s", src.id, chunk_id[:12],
                                exc)
                    if isinstance(exc, IntegrityError | ChunkNotFound):
                        # Not a replica any more: forget it, and make up for it too.
                        await asyncio.to_thread(manifest.remove_replicas, [(chunk_id, src.id)])
                        healthy.remove(src.id)
                        report.dropped_corrupt += 1
                    sources.pop(0)
                    continue
                self.record_replica(chunk_id, target)
                report.replicas_created += 1
                healthy.append(target)
                break
        if len(healthy) < rf:
            report.under_replicated += 1

    def _targets(self, chunk_id: str, healthy: list[str], holders: list[str],
                 size: int) -> list[str]:
        """Candidates for a chunk's missing replicas, best first: its placement, then any
        healthy node with room, never a current holder (the caller takes what it needs)."""
        try:
            ideal = self.placement.select_target_nodes(
                chunk_id, healthy[0], self.config.replication_factor,
                exclude=set(holders) - set(healthy), size_bytes=size)
        except InsufficientNodes:
            ideal = []
        extra = [n.id for n in self.registry.healthy_nodes() if has_room(n, size)]
        targets = []
        for node_id in ideal + extra:
            if node_id not in holders and node_id not in targets:
                targets.append(node_id)
        return targets


class RepairsOnFailure:
    """Repairs started the moment a node fails, for the chunks committed so far.

    Each runs as a task held here until `settle()` awaits it: the run settles them before
    its final repair pass (and again after it, for a node that failed during it);
    `created` counts the replicas they re-created in this run.
    """

    def __init__(self, repairer: Repairer, storage: StorageManager,
                 metrics: PipelineMetrics) -> None:
        self.repairer = repairer
        self.storage = storage
        self.metrics = metrics
        self.created = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, node_id: str) -> None:
        """Re-replicate the committed chunks node_id held, in the background."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # marked from outside the event loop: the final repair covers it
        task = loop.create_task(self._repair(node_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for every repair started so far (a failed one is logged: the final pass
        covers its chunks)."""
        while self._tasks:
            for outcome in await asyncio.gather(*list(self._tasks), return_exceptions=True):
                if isinstance(outcome, BaseException):
                    log.warning("repair after a node failure failed: %s (the final repair "
                                "pass covers its chunks)", outcome)

    async def _repair(self, node_id: str) -> None:
        await self.storage.flush()
        ids = sorted(self.storage.chunk_ids)
        holders = await asyncio.to_thread(self.storage.manifest.replicas, ids)
        affected = [chunk_id for chunk_id, nodes in holders.items() if node_id in nodes]
        if affected:
            with self.metrics.busy("storage"):
                report = await self.repairer.repair(affected)
            self.created += report.replicas_created
