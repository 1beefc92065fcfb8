"""Stage 4, storage: commit chunks and their verified replicas to the manifest; repair.

Nodes acknowledge a replica only after checking its checksum and making it durable, so a
chunk is stored once `write_quorum` acks are in; this stage records that in the manifest
(grouped into few SQLite transactions) and counts it. `repair()` then brings every chunk
back to `replication_factor` replicas on healthy nodes, copying node to node from a
healthy holder, where enough healthy nodes exist.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multicloud.core.config import DistributionConfig, StorageConfig
from multicloud.core.errors import (
    ClusterError,
    InsufficientNodes,
    IntegrityError,
    StorageError,
    TransferTimeout,
)
from multicloud.core.types import BlobInfo, Chunk, DistributedChunk, ReplicaAck, StoredChunk
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import NetworkAwarePlacement
from multicloud.pipeline.timeouts import AdaptiveTimeouts

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry

log = logging.getLogger(__name__)

_FLUSH_EVERY = 64  # chunks per manifest transaction
MANIFEST_FILE = "manifest.db"


@dataclass
class RepairReport:
    """What one repair pass did."""

    checked: int = 0
    replicas_created: int = 0
    dropped_corrupt: int = 0
    under_replicated: int = 0  # chunks still below replication_factor
    lost: int = 0  # chunks with no healthy replica left at all


def manifest_path(node_registry: NodeRegistry) -> Path:
    """Where the cluster's manifest lives."""
    if node_registry.data_dir is None:
        raise StorageError("this cluster has no data dir, so there is no manifest to use")
    return node_registry.data_dir / MANIFEST_FILE


class StorageManager:
    """Commits distributed chunks to the manifest and keeps them at full replication."""

    def __init__(self, node_registry: NodeRegistry, config: StorageConfig | None = None,
                 manifest: Manifest | None = None,
                 distribution: DistributionConfig | None = None,
                 metrics: PipelineMetrics | None = None,
                 placement: NetworkAwarePlacement | None = None) -> None:
        self.registry = node_registry
        self.config = config or StorageConfig()
        self.distribution = distribution or DistributionConfig()
        self._owns_manifest = manifest is None
        self._manifest = manifest
        self.metrics = metrics or PipelineMetrics()
        self.placement = placement or NetworkAwarePlacement(node_registry, None, self.distribution)
        self.timeouts = AdaptiveTimeouts(self.distribution.timeouts)
        self.batch_id: str | None = None
        self.chunk_ids: set[str] = set()
        self._pending_chunks: list[tuple[Chunk, BlobInfo]] = []
        self._pending_replicas: list[tuple[str, str]] = []
        self._flush_lock = asyncio.Lock()

    @property
    def manifest(self) -> Manifest:
        """The cluster's manifest, opened on first use (a run that never starts makes none)."""
        if self._manifest is None:
            self._manifest = Manifest(manifest_path(self.registry))
        return self._manifest

    def begin(self, batch_id: str) -> None:
        """Commit what follows under this batch."""
        self.batch_id = batch_id
        self.chunk_ids.clear()

    def commit(self, distributed: DistributedChunk) -> StoredChunk:
        """Record a chunk that reached quorum (buffered; `flush` writes it)."""
        self.metrics.attempt("storage")
        replicas = [ack.node_id for ack in distributed.replicas]
        committed = len(replicas) >= self.distribution.write_quorum
        if committed:
            self._pending_chunks.append((distributed.chunk, distributed.blob))
            self._pending_replicas.extend((distributed.blob.chunk_id, r) for r in replicas)
            self.chunk_ids.add(distributed.blob.chunk_id)
            self.metrics.success("storage", distributed.blob.blob_size)
        else:
            self.metrics.failure("storage")
        return StoredChunk(distributed.chunk, distributed.blob, replicas, committed)

    def record_late_ack(self, distributed: DistributedChunk, ack: ReplicaAck) -> None:
        """A replica that finished after its chunk was committed."""
        self._pending_replicas.append((ack.chunk_id, ack.node_id))

    async def flush(self, force: bool = True) -> None:
        """Write buffered commits to the manifest in one transaction."""
        if not force and len(self._pending_chunks) < _FLUSH_EVERY:
            return
        async with self._flush_lock:
            chunks, self._pending_chunks = self._pending_chunks, []
            replicas, self._pending_replicas = self._pending_replicas, []
            if not chunks and not replicas:
                return
            batch_id = self._ensure_batch()
            with self.metrics.busy("storage"):
                await asyncio.to_thread(self._write, batch_id, chunks, replicas)

    def _write(self, batch_id: str, chunks: list[tuple[Chunk, BlobInfo]],
               replicas: list[tuple[str, str]]) -> None:
        if chunks:
            self.manifest.add_chunks(batch_id, chunks)
        if replicas:
            self.manifest.add_replicas(replicas)

    def _ensure_batch(self) -> str:
        if self.batch_id is None:
            # Stage-by-stage use without a batch: record the chunks under an ad-hoc batch.
            self.batch_id = f"stage-{uuid.uuid4().hex[:12]}"
            self.manifest.begin_batch(self.batch_id, "(stage API)", "unknown")
        return self.batch_id

    async def store_distributed_chunks(self, distributed: list[DistributedChunk],
                                       ) -> list[StoredChunk]:
        """Commit many distributed chunks and write them to the manifest."""
        adhoc = self.batch_id is None
        stored = [self.commit(d) for d in distributed]
        await self.flush()
        if adhoc and self.batch_id is not None:
            # Stage-by-stage use: the ad-hoc batch is complete once its chunks are in.
            await asyncio.to_thread(self.manifest.finish_batch, self.batch_id,
                                    "success" if all(s.committed for s in stored) else "failed")
            self.batch_id = None
        return stored

    async def repair(self, chunk_ids: Iterable[str] | None = None) -> RepairReport:
        """Re-replicate chunks with fewer than replication_factor healthy replicas."""
        await self.flush()
        ids = sorted(set(chunk_ids) if chunk_ids is not None else self.chunk_ids)
        holders = await asyncio.to_thread(self.manifest.replicas, ids)
        report = RepairReport(checked=len(ids))
        limit = asyncio.Semaphore(self.distribution.max_concurrent_distributions)

        async def one(chunk_id: str) -> None:
            async with limit:
                await self._repair_chunk(chunk_id, holders.get(chunk_id, []), report)

        async with asyncio.TaskGroup() as group:
            for chunk_id in ids:
                group.create_task(one(chunk_id))
        await self.flush()
        return report

    async def _repair_chunk(self, chunk_id: str, holders: list[str],
                            report: RepairReport) -> None:
        rf = self.distribution.replication_factor
        nodes = self.registry.nodes
        healthy = [h for h in holders if h in nodes and nodes[h].healthy]
        if len(healthy) >= rf:
            return
        if not healthy:
            report.lost += 1
            report.under_replicated += 1
            log.error("chunk %s has no healthy replica left", chunk_id)
            return
        blob = await asyncio.to_thread(self.manifest.blob, chunk_id)
        if blob is None:
            report.under_replicated += 1
            return
        targets = self._repair_targets(chunk_id, healthy, holders, rf - len(healthy),
                                       blob.blob_size)
        sources = list(healthy)
        for target in targets:
            while sources:
                src, dst = nodes[sources[0]], nodes[target]
                link = f"{src.location}->{dst.location}"
                timeout = self.timeouts.timeout(link, blob.blob_size)
                try:
                    async with asyncio.timeout(timeout):
                        ack = await self.registry.transport.replicate(src, dst, blob)
                except IntegrityError as exc:
                    # The holder's copy is bad: forget it, copy from the next holder.
                    log.warning("repair: replica of %s on %s is corrupt: %s", chunk_id[:12],
                                src.id, exc)
                    await asyncio.to_thread(self.manifest.remove_replicas, [(chunk_id, src.id)])
                    report.dropped_corrupt += 1
                    sources.pop(0)
                    continue
                except (TimeoutError, TransferTimeout, ClusterError, StorageError) as exc:
                    log.warning("repair: copy of %s %s -> %s failed: %s", chunk_id[:12],
                                src.id, dst.id, exc)
                    if isinstance(exc, ClusterError) and getattr(exc, "node_id", "") == src.id:
                        sources.pop(0)
                        continue
                    break  # try the next target
                dst.used_bytes += ack.blob_size
                self._pending_replicas.append((chunk_id, target))
                report.replicas_created += 1
                healthy.append(target)
                break
        if len(healthy) < rf:
            report.under_replicated += 1

    def _repair_targets(self, chunk_id: str, healthy: list[str], holders: list[str],
                        missing: int, size: int) -> list[str]:
        """New nodes for a chunk's missing replicas: its placement, minus current holders."""
        try:
            ideal = self.placement.select_target_nodes(
                chunk_id, healthy[0], self.distribution.replication_factor,
                exclude=set(holders) - set(healthy), size_bytes=size)
        except InsufficientNodes:
            ideal = []
        extra = [n.id for n in self.registry.healthy_nodes()]
        targets = []
        for node_id in ideal + extra:
            if node_id not in holders and node_id not in targets:
                targets.append(node_id)
        return targets[:missing]

    async def usage_by_place(self, chunk_ids: Iterable[str] | None = None,
                             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per cloud and per node: chunks with a replica there, replicas, and bytes held."""
        ids = sorted(set(chunk_ids) if chunk_ids is not None else self.chunk_ids)
        holders = await asyncio.to_thread(self.manifest.replicas, ids)
        blobs = await asyncio.to_thread(lambda: [self.manifest.blob(c) for c in ids])
        sizes = {c: b.blob_size if b else 0 for c, b in zip(ids, blobs, strict=True)}

        def empty() -> dict[str, int]:
            return {"chunk_count": 0, "replicas": 0, "bytes": 0}

        by_cloud: dict[str, dict[str, int]] = defaultdict(empty)
        by_node: dict[str, dict[str, int]] = defaultdict(empty)
        for chunk_id, nodes in holders.items():
            clouds_seen: set[str] = set()
            for node_id in nodes:
                node = self.registry.nodes.get(node_id)
                if node is None:
                    continue
                for entry in (by_cloud[node.cloud], by_node[node_id]):
                    entry["replicas"] += 1
                    entry["bytes"] += sizes.get(chunk_id, 0)
                by_node[node_id]["chunk_count"] += 1
                clouds_seen.add(node.cloud)
            for cloud in clouds_seen:
                by_cloud[cloud]["chunk_count"] += 1
        return dict(sorted(by_cloud.items())), dict(sorted(by_node.items()))

    async def under_replicated(self, chunk_ids: Iterable[str] | None = None) -> int:
        """Chunks with fewer than replication_factor replicas on healthy nodes."""
        await self.flush()
        ids = sorted(set(chunk_ids) if chunk_ids is not None else self.chunk_ids)
        holders = await asyncio.to_thread(self.manifest.replicas, ids)
        rf = self.distribution.replication_factor
        nodes = self.registry.nodes
        return sum(1 for chunk_id in ids
                   if sum(1 for h in holders.get(chunk_id, [])
                          if h in nodes and nodes[h].healthy) < rf)

    def close(self) -> None:
        """Close the manifest if this manager opened it."""
        if self._owns_manifest and self._manifest is not None:
            self._manifest.close()
