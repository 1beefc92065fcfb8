"""Stage 4, storage: commit chunks and their verified replicas to the manifest.

Nodes acknowledge a replica only after checking its checksum and making it durable, so a
chunk is stored once `write_quorum` acks are in; this stage records that in the manifest
(grouped into few SQLite transactions) and counts it. Replicas that land later (the writes
past quorum, repairs) are recorded the same way. `pipeline.repair` brings chunks back to
the replication factor.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multicloud.core.config import DistributionConfig, StorageConfig
from multicloud.core.errors import StorageError
from multicloud.core.types import BlobInfo, Chunk, DistributedChunk, ReplicaAck, StoredChunk
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.metrics import PipelineMetrics

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry

log = logging.getLogger(__name__)

_FLUSH_EVERY = 64  # chunks per manifest transaction
MANIFEST_FILE = "manifest.db"


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
                 metrics: PipelineMetrics | None = None) -> None:
        self.registry = node_registry
        self.config = config or StorageConfig()
        self.distribution = distribution or DistributionConfig()
        self._owns_manifest = manifest is None
        self._manifest = manifest
        self.metrics = metrics or PipelineMetrics()
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

    async def load_node_usage(self) -> None:
        """Tell each node what the manifest says it holds, so placement skips a node
        without room for a chunk; a disk that filled up in an earlier run may have room
        again, so no node starts the run marked full."""
        usage = await asyncio.to_thread(self.manifest.node_usage)
        for node_id, node in self.registry.nodes.items():
            node.used_bytes = usage.get(node_id, (0, 0))[1]
            node.full = False

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
        self.record_replica(ack.chunk_id, ack.node_id)

    def record_replica(self, chunk_id: str, node_id: str) -> None:
        """A verified replica of a committed chunk (buffered; `flush` writes it)."""
        self._pending_replicas.append((chunk_id, node_id))

    async def flush(self, force: bool = True) -> None:
        """Write buffered commits to the manifest in one transaction."""
        if not force and len(self._pending_chunks) < _FLUSH_EVERY:
            return
        async with self._flush_lock:
            chunks, self._pending_chunks = self._pending_chunks, []
            replicas, self._pending_replicas = self._pending_replicas, []
            if not (chunks or replicas) or self.batch_id is None:
                return  # the stage used on its own, outside a batch: nothing to record
            try:
                with self.metrics.busy("storage"):
                    await asyncio.to_thread(self._write, self.batch_id, chunks, replicas)
            except BaseException:
                # Keep them for the next flush (a full disk may have room once the writes
                # in flight are done); writing them twice is harmless, both are upserts.
                self._pending_chunks[:0] = chunks
                self._pending_replicas[:0] = replicas
                raise

    def _write(self, batch_id: str, chunks: list[tuple[Chunk, BlobInfo]],
               replicas: list[tuple[str, str]]) -> None:
        if chunks:
            self.manifest.add_chunks(batch_id, chunks)
        if replicas:
            self.manifest.add_replicas(replicas)

    async def store_distributed_chunks(self, distributed: list[DistributedChunk],
                                       ) -> list[StoredChunk]:
        """Commit many distributed chunks: recorded under the current batch if one is open.

        The stage on its own (no `begin`) only checks each chunk reached quorum: its
        replicas are on the nodes already, and no batch is made up for them.
        """
        stored = [self.commit(d) for d in distributed]
        await self.flush()
        return stored

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
