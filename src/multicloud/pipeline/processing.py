"""Stage 2, processing: validate and transform each chunk on a worker node of its source cloud.

The raw bytes go out once, from the source bucket to a node in the same cloud (data
locality, no egress). The node is the chunk's first rendezvous choice in that cloud, so it
is usually also one of the chunk's replica targets and stores its copy without a network
hop; when that node's worker slots are all busy, the least-loaded node of the cloud takes it.

`on_nodes` is the one retry loop of the pipeline: it runs an attempt on the best node for
a chunk and, when that node fails (it is down, or lost the chunk before quorum), on the
next one. `multicloud run` runs processing and distribution inside it; `process_one` runs
processing alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import (
    ClusterError,
    InsufficientNodes,
    MulticloudError,
    NodeUnavailable,
    SourceLost,
    StorageError,
    ValidationFailed,
)
from multicloud.core.network import Location
from multicloud.core.types import Chunk, ProcessedChunk
from multicloud.pipeline.events import Emit, no_events
from multicloud.pipeline.ingestion import read_chunk_bytes
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import rank_nodes

log = logging.getLogger(__name__)

T = TypeVar("T")

# What makes a chunk move to another node: the node is gone, failed on its disk, or lost
# the staged blob before the chunk reached quorum.
NODE_FAILURES = (NodeUnavailable, StorageError, SourceLost)


class ProcessingWorkerPool:
    """Runs the transform chain for chunks on the worker slots of the cluster's nodes."""

    def __init__(self, cluster: Cluster, config: ProcessingConfig | None = None,
                 metrics: PipelineMetrics | None = None, *,
                 on_event: Emit = no_events) -> None:
        self.registry = cluster
        self.config = config or ProcessingConfig()
        self.metrics = metrics or PipelineMetrics()
        self.on_event = on_event
        self._load: Counter[str] = Counter()
        self._configured = False

    async def configure_nodes(self) -> None:
        """Hand the transform chain and slot count to every node in service."""
        await self.registry.configure(self.config)
        self._configured = True

    def origin_of(self, cloud: str) -> Location:
        """Where a source bucket of this cloud lives: the cloud's first region."""
        regions = self.registry.config.regions.get(cloud) or ["default"]
        return Location(cloud, regions[0])

    def choose_node(self, chunk: Chunk, exclude: set[str] | frozenset[str] = frozenset(),
                    ) -> WorkerNode:
        """The node to process a chunk on: source cloud first, by rendezvous, then load."""
        nodes = [n for n in self.registry.healthy_nodes(chunk.source_cloud) if n.id not in exclude]
        if not nodes:  # no healthy node in the source cloud: pay egress rather than stop
            nodes = [n for n in self.registry.healthy_nodes() if n.id not in exclude]
        if not nodes:
            raise InsufficientNodes("no healthy node is left to process chunks on")
        ranked = rank_nodes(chunk.chunk_id, nodes)
        slots = self.config.max_workers_per_node
        for node in ranked:
            if self._load[node.id] < slots:
                return node
        return min(ranked, key=lambda n: self._load[n.id])

    async def on_nodes(self, chunk: Chunk, attempt: Callable[[WorkerNode], Awaitable[T]]) -> T:
        """attempt(node) on the best node for chunk, then the next while nodes fail.

        Gives up with ClusterError after `max_attempts` nodes have failed it.
        """
        tried: set[str] = set()
        last_error = "not attempted"
        for _ in range(self.config.max_attempts):
            try:
                node = self.choose_node(chunk, tried)
            except InsufficientNodes as exc:
                self._gave_up(chunk, f"{exc}; last error: {last_error}")
                raise
            try:
                return await attempt(node)
            except NODE_FAILURES as exc:
                last_error = str(exc)
                tried.add(node.id)
                log.warning("chunk %s on %s failed: %s; trying another node",
                            chunk.chunk_id[:12], node.id, exc)
        self._gave_up(chunk, last_error)
        raise ClusterError(f"chunk {chunk.index} of {chunk.file}: gave up after "
                           f"{len(tried)} nodes failed it; last error: {last_error}")

    def _gave_up(self, chunk: Chunk, error: str) -> None:
        self.on_event("chunk_failed", f"chunk {chunk.index} of {chunk.file}: {error}",
                      level="error", file=chunk.file, index=chunk.index,
                      chunk_id=chunk.chunk_id, stage="processing", error=error)

    async def process_on(self, node: WorkerNode, chunk: Chunk) -> ProcessedChunk:
        """Process one chunk on node: one attempt.

        Bad data is not an exception: the result has `result=None` and the error. A node
        that fails raises (see NODE_FAILURES). Each call counts one attempt of the stage.
        """
        self.metrics.attempt("processing")
        started = time.perf_counter()
        self._load[node.id] += 1
        try:
            with self.metrics.busy("processing"):
                data = await read_chunk_bytes(chunk)
                info = await self.registry.client.process(
                    node, chunk, data, self.origin_of(chunk.source_cloud))
        except ValidationFailed as exc:
            self.metrics.failure("processing")
            self.on_event("chunk_failed", str(exc), level="error", file=chunk.file,
                          index=chunk.index, chunk_id=chunk.chunk_id, stage="processing",
                          error=str(exc))
            return ProcessedChunk(chunk, node.id, None, time.perf_counter() - started,
                                  error=str(exc))
        except NODE_FAILURES:
            self.metrics.failure("processing")
            raise
        finally:
            self._load[node.id] -= 1
        latency = time.perf_counter() - started
        self.metrics.success("processing", chunk.size_bytes, latency)
        return ProcessedChunk(chunk, node.id, info, latency)

    async def process_one(self, chunk: Chunk) -> ProcessedChunk:
        """Process one chunk, moving to another node when one fails."""
        if not self._configured:
            await self.configure_nodes()
        return await self.on_nodes(chunk, lambda node: self.process_on(node, chunk))

    async def process_chunks(self, chunks: list[Chunk]) -> list[ProcessedChunk]:
        """Process many chunks concurrently (bounded by the cluster's slots), in order."""
        if not chunks:
            return []
        if not self._configured:
            await self.configure_nodes()
        limit = asyncio.Semaphore(self.config.max_workers_per_node
                                  * max(1, len(self.registry.healthy_nodes())))

        async def one(chunk: Chunk) -> ProcessedChunk:
            async with limit:
                return await self.process_one(chunk)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(c)) for c in chunks]
        except* MulticloudError as group:
            raise group.exceptions[0] from None
        return [t.result() for t in tasks]
