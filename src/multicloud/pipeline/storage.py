"""Stage 4, storage: commit chunks and their verified replicas to the manifest.

Nodes acknowledge a replica only after checking its checksum and making it durable, so a
chunk is stored once `write_quorum` acks are in; this stage records that in the manifest
(grouped into few SQLite transactions) and counts it. Replicas that land later (the writes
past quorum, repairs) are recorded the same way. `pipeline.repair` brings chunks back to
the replication factor.

Hinted handoff: a chunk committed with fewer than `replication_factor` acks gets a hint
for each replica it is owed, (chunk id, the target that failed it) or (chunk id, "*")
when no node can be named (fewer nodes than the factor, or a write still running).
Hints are buffered and flushed like replicas; a chunk whose late acks (or repairs) bring
it to the factor has its hints taken back. A hint left over is harmless: replaying it
finds the chunk whole and forgets it. `Repairer.replay_hints` replays them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multicloud.core import clock
from multicloud.core.config import DistributionConfig, StorageConfig
from multicloud.core.errors import StorageError
from multicloud.core.types import BlobInfo, Chunk, DistributedChunk, ReplicaAck, StoredChunk
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.metrics import PipelineMetrics

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry

log = logging.getLogger(__name__)

_FLUSH_EVERY = 64  # chunks per manifest transaction
# ...or fewer, once this long has passed: bounds what a kill -9 loses for a resume to redo.
_FLUSH_AFTER_S = 1.0
MANIFEST_FILE = "manifest.db"
ANY_NODE = "*"  # the node id of a hint that names no node: any node will do


@dataclass
class _Owed:
    """A chunk of this batch committed short of the replication factor."""

    holders: set[str]  # nodes with a verified replica, as this run recorded them
    hinted: set[str] = field(default_factory=set)  # node ids of its hints ("*" included)


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
        self._blobs: dict[str, BlobInfo] = {}  # chunk id -> blob, of this batch's commits
        self._pending_chunks: list[tuple[Chunk, BlobInfo]] = []
        self._pending_replicas: list[tuple[str, str]] = []
        self._flushing_replicas: list[tuple[str, str]] = []  # being written right now
        self._pending_hints: dict[str, set[str]] = {}  # chunk id -> node ids to hint
        self._pending_unhints: list[tuple[str, str]] = []  # hints to take back
        self._pending_clean: list[tuple[str, str]] = []  # (chunk id, records context)
        self._owed: dict[str, _Owed] = {}
        self._flush_lock = asyncio.Lock()
        self._flushed_at = clock.monotonic()

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
        self._blobs.clear()
        self._owed.clear()  # the last batch's hints are in the manifest, for replay

    def commit(self, distributed: DistributedChunk) -> StoredChunk:
        """Record a chunk that reached quorum, with a hint for each replica it is short of
        the replication factor (buffered; `flush` writes them)."""
        self.metrics.attempt("storage")
        replicas = [ack.node_id for ack in distributed.replicas]
        committed = len(replicas) >= self.distribution.write_quorum
        if committed:
            if self.batch_id is not None:  # the stage on its own records nothing
                self._pending_chunks.append((distributed.chunk, distributed.blob))
                self._pending_replicas.extend((distributed.blob.chunk_id, r) for r in replicas)
                self._owe(distributed.blob.chunk_id, set(replicas), distributed.failed_targets)
            self.chunk_ids.add(distributed.blob.chunk_id)
            self._blobs[distributed.blob.chunk_id] = distributed.blob
            self.metrics.success("storage", distributed.blob.blob_size)
        else:
            self.metrics.failure("storage")
        return StoredChunk(distributed.chunk, distributed.blob, replicas, committed)

    def committed_blob(self, chunk_id: str) -> BlobInfo | None:
        """The blob of a chunk this batch has committed (in this run, or in the run it
        resumes), None if it has not."""
        return self._blobs.get(chunk_id)

    async def remember_committed(self, chunk_ids: Iterable[str]) -> None:
        """Chunks the run being resumed committed: their blobs, from the manifest."""
        ids = sorted(set(chunk_ids))
        blobs = await asyncio.to_thread(lambda: [self.manifest.blob(c) for c in ids])
        self.chunk_ids.update(ids)
        self._blobs.update((b.chunk_id, b) for b in blobs if b is not None)

    def commit_copy(self, chunk: Chunk, blob: BlobInfo) -> None:
        """Record a chunk whose bytes are stored already (by this batch, in another file or
        place, or by an earlier batch): its replicas are the ones recorded, no byte moves."""
        if self.batch_id is not None:
            self._pending_chunks.append((chunk, blob))
        self.chunk_ids.add(blob.chunk_id)  # the run's last repair pass sees to its factor
        self._blobs[blob.chunk_id] = blob

    def note_clean(self, chunk_id: str, context: str) -> None:
        """Remember that the chunk's records all parsed where it stands (context: see
        `Chunk.records_context`), with the next flush."""
        self._pending_clean.append((chunk_id, context))

    def record_late_ack(self, distributed: DistributedChunk, ack: ReplicaAck) -> None:
        """A replica that finished after its chunk was committed."""
        if self.batch_id is not None:
            self.record_replica(ack.chunk_id, ack.node_id)

    def record_replica(self, chunk_id: str, node_id: str) -> None:
        """A verified replica of a committed chunk (buffered; `flush` writes it)."""
        self._pending_replicas.append((chunk_id, node_id))
        owed = self._owed.get(chunk_id)
        if owed is None:
            return
        owed.holders.add(node_id)
        if len(owed.holders) >= self.distribution.replication_factor:
            # Whole again: take its hints back, in the flush that records this replica.
            del self._owed[chunk_id]
            self._unhint(chunk_id, owed.hinted)

    def unrecorded(self, chunk_id: str) -> list[str]:
        """Nodes with a verified replica of chunk_id that the manifest does not have yet."""
        return sorted({n for c, n in (*self._flushing_replicas, *self._pending_replicas)
                       if c == chunk_id})

    def _owe(self, chunk_id: str, holders: set[str], failed: list[str]) -> None:
        """Hint the replicas a just-committed chunk is short of, if any.

        Named after the targets that failed it (the latest first), and "*" for the rest:
        a target still being written, or no target at all because too few nodes are up.
        A write that lands later takes the hints back (`record_replica`).
        """
        owed = self._owed.get(chunk_id)
        if owed is not None:  # the same bytes committed again (a file repeated in the batch)
            holders |= owed.holders
        missing = self.distribution.replication_factor - len(holders)
        if missing <= 0:
            if owed is not None:
                del self._owed[chunk_id]
                self._unhint(chunk_id, owed.hinted)
            return
        named: list[str] = []
        for node_id in reversed(failed):
            if node_id not in holders and node_id not in named and len(named) < missing:
                named.append(node_id)
        hinted = set(named) | ({ANY_NODE} if len(named) < missing else set())
        if owed is None:
            owed = self._owed[chunk_id] = _Owed(holders)
        owed.holders = holders
        new = hinted - owed.hinted
        owed.hinted |= hinted
        if new:
            self._pending_hints.setdefault(chunk_id, set()).update(new)

    def _unhint(self, chunk_id: str, node_ids: set[str]) -> None:
        """Take hints back: drop them from the buffer, or queue their removal if flushed."""
        buffered = self._pending_hints.pop(chunk_id, set())
        self._pending_unhints.extend((chunk_id, n) for n in sorted(node_ids - buffered))

    async def flush(self, force: bool = True) -> None:
        """Write buffered commits to the manifest in one transaction."""
        if (not force and len(self._pending_chunks) < _FLUSH_EVERY
                and clock.monotonic() - self._flushed_at < _FLUSH_AFTER_S):
            return
        async with self._flush_lock:
            self._flushed_at = clock.monotonic()
            chunks, self._pending_chunks = self._pending_chunks, []
            replicas, self._pending_replicas = self._pending_replicas, []
            hinted, self._pending_hints = self._pending_hints, {}
            unhints, self._pending_unhints = self._pending_unhints, []
            clean, self._pending_clean = self._pending_clean, []
            hints = [(c, n) for c, nodes in sorted(hinted.items()) for n in sorted(nodes)]
            if not (chunks or replicas or hints or unhints or clean):
                return
            self._flushing_replicas = replicas
            try:
                with self.metrics.busy("storage"):
                    # One transaction: a chunk is never recorded without the replicas that
                    # committed it (a resumed run skips recorded chunks), nor short without
                    # its hint.
                    await asyncio.to_thread(self.manifest.record_commits, self.batch_id,
                                            chunks, replicas, hints, unhints, clean)
            except BaseException:
                # Keep them for the next flush (a full disk may have room once the writes
                # in flight are done); writing them twice is harmless, all are upserts.
                self._pending_chunks[:0] = chunks
                self._pending_replicas[:0] = replicas
                for chunk_id, nodes in hinted.items():
                    self._pending_hints.setdefault(chunk_id, set()).update(nodes)
                self._pending_unhints[:0] = unhints
                self._pending_clean[:0] = clean
                raise
            finally:
                self._flushing_replicas = []

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
