"""Stage 2, processing: validate and transform each chunk on a worker node of its source cloud.

The raw bytes go out once, from the source bucket to a node in the same cloud (data
locality, no egress). The node is the chunk's first rendezvous choice in that cloud, so it
is usually also one of the chunk's replica targets and stores its copy without a network
hop; when that node's worker slots are all busy, the least-loaded node of the cloud takes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import (
    ClusterError,
    InsufficientNodes,
    MulticloudError,
    NodeUnavailable,
    StorageError,
    ValidationFailed,
)
from multicloud.core.network import Location
from multicloud.core.types import Chunk, ProcessedChunk
from multicloud.pipeline.events import Emit, no_events
from multicloud.pipeline.ingestion import read_chunk_bytes
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import rank_nodes

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry, WorkerNode

log = logging.getLogger(__name__)


class ProcessingWorkerPool:
    """Runs the transform chain for chunks on the worker slots of the cluster's nodes."""

    def __init__(self, node_registry: NodeRegistry, config: ProcessingConfig | None = None,
                 metrics: PipelineMetrics | None = None) -> None:
        self.registry = node_registry
        self.config = config or ProcessingConfig()
        self.metrics = metrics or PipelineMetrics()
        self._load: Counter[str] = Counter()
        self.on_event: Emit = no_events
        self._configured = False

    async def configure_nodes(self) -> None:
        """Hand the transform chain and slot count to every node (once per pool)."""
        if not self._configured:
            await self.registry.transport.configure(self.config)
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

    async def process_one(self, chunk: Chunk, exclude: set[str] | None = None) -> ProcessedChunk:
        """Process one chunk, moving to another node when one fails.

        Bad data is not an exception: the result has `result=None` and the error. Running
        out of nodes or attempts raises ClusterError.
        """
        await self.configure_nodes()
        tried: set[str] = set(exclude or ())
        self.metrics.attempt("processing")
        last_error = "not attempted"
        for _attempt in range(self.config.max_attempts):
            node = self.choose_node(chunk, tried)
            started = time.perf_counter()
            self._load[node.id] += 1
            try:
                with self.metrics.busy("processing"):
                    data = await read_chunk_bytes(chunk)
                    info = await self.registry.transport.process(
                        node, chunk, data, self.origin_of(chunk.source_cloud))
            except ValidationFailed as exc:
                self.metrics.failure("processing")
                self.on_event("chunk_failed", str(exc), level="error", file=chunk.file,
                              index=chunk.index, chunk_id=chunk.chunk_id, stage="processing",
                              error=str(exc))
                return ProcessedChunk(chunk, node.id, None, time.perf_counter() - started,
                                      error=str(exc))
            except (NodeUnavailable, StorageError, ClusterError) as exc:
                last_error = str(exc)
                tried.add(node.id)
                log.warning("processing chunk %s on %s failed: %s", chunk.chunk_id[:12],
                            node.id, exc)
                continue
            finally:
                self._load[node.id] -= 1
            latency = time.perf_counter() - started
            self.metrics.success("processing", chunk.size_bytes, latency)
            return ProcessedChunk(chunk, node.id, info, latency)
        self.metrics.failure("processing")
        self.on_event("chunk_failed", f"chunk {chunk.index} of {chunk.file}: {last_error}",
                      level="error", file=chunk.file, index=chunk.index,
                      chunk_id=chunk.chunk_id, stage="processing", error=last_error)
        raise ClusterError(f"chunk {chunk.index} of {chunk.file}: processing gave up after "
                           f"{self.config.max_attempts} attempts; last error: {last_error}")

    async def process_chunks(self, chunks: list[Chunk]) -> list[ProcessedChunk]:
        """Process many chunks concurrently (bounded by the cluster's slots), in order."""
        if not chunks:
            return []
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
