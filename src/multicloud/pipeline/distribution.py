"""Stage 3, distribution: quorum writes of each chunk to its placement targets.

The processing node pushes its staged blob to every target (node to node; a target that
is the processing node itself stores in place), each write through the `ReplicaWriter`.
A chunk is committed as soon as `write_quorum` targets have verified and durably stored
it; the remaining writes finish in the background (held, and awaited by `drain()`). A
target that fails, times out or is marked unhealthy mid-write is replaced by the next
placement candidate that keeps the cloud spread.

With fewer healthy nodes than `replication_factor`, placement gives fewer targets (never
fewer than `write_quorum`) and the chunk commits at quorum all the same: storage keeps a
hint for each replica it is short, and `drain()` reports the chunks that finished short
in one `under_replicated` event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core.config import DistributionConfig
from multicloud.core.errors import (
    DiskFull,
    IntegrityError,
    MulticloudError,
    NodeUnavailable,
    QuorumNotReached,
    ReplicaRefused,
    SourceLost,
    TransferTimeout,
)
from multicloud.core.types import DistributedChunk, ProcessedChunk, ReplicaAck
from multicloud.pipeline.events import Emit, no_events
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import NetworkAwarePlacement
from multicloud.pipeline.replicas import ReplicaWriter

log = logging.getLogger(__name__)

LateAck = Callable[[DistributedChunk, ReplicaAck], None]

# How many chunk ids an `under_replicated` event names (it always has the count).
_IDS_SHOWN = 5


def _ignore_late_ack(distributed: DistributedChunk, ack: ReplicaAck) -> None:
    """The LateAck of a coordinator used on its own: the ack is in distributed.replicas."""


@dataclass
class _ChunkWrite:
    """The state of one chunk's replica writes."""

    processed: ProcessedChunk
    quorum: int
    acks: list[ReplicaAck] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    causes: dict[str, MulticloudError] = field(default_factory=dict)  # failed target -> why
    current: list[str] = field(default_factory=list)  # targets written or being written
    replacements_left: int = 0
    source_lost: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)  # quorum, or no hope of it
    result: DistributedChunk | None = None
    running: set[str] = field(default_factory=set)  # targets a write is running to now


class DistributionCoordinator:
    """Places replicas and runs quorum writes with replacement."""

    def __init__(self, cluster: Cluster, config: DistributionConfig | None = None,
                 metrics: PipelineMetrics | None = None, *,
                 placement: NetworkAwarePlacement | None = None,
                 writer: ReplicaWriter | None = None, on_late_ack: LateAck = _ignore_late_ack,
                 on_event: Emit = no_events) -> None:
        self.registry = cluster
        self.config = config or DistributionConfig()
        self.metrics = metrics or PipelineMetrics()
        self.placement = placement or NetworkAwarePlacement(cluster, None, self.config)
        self._owns_writer = writer is None
        self.writer = writer or ReplicaWriter(cluster, self.config, self.metrics)
        self.on_late_ack = on_late_ack
        self.on_event = on_event
        self._background: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(self.config.max_concurrent_distributions)
        self._writes: dict[str, list[_ChunkWrite]] = {}  # chunk id -> its running writes
        self._short: list[str] = []  # committed, every write done, fewer than RF replicas

    async def distribute(self, processed: ProcessedChunk,
                         force_cross_cloud: bool = False) -> DistributedChunk:
        """Write a processed chunk to its targets; return once write_quorum have acked.

        Raises SourceLost when the processing node failed before quorum (process the
        chunk again elsewhere) and QuorumNotReached when too few targets could be written.
        """
        blob = processed.result
        if blob is None:
            raise ValueError("cannot distribute a chunk whose processing failed")
        self.metrics.attempt("distribution")
        src = self.registry.nodes.get(processed.node_id)
        try:
            state, finished = await self._write_to_quorum(processed, force_cross_cloud)
            if len(state.acks) < state.quorum:
                await finished  # no hope of quorum yet: late acks may still make it
        except BaseException:
            # Placement found no targets, or the run is being cancelled: the staged blob
            # must not stay behind on the node.
            if src is not None:
                await asyncio.shield(self._release(src, blob.chunk_id))
            raise
        if len(state.acks) >= state.quorum:
            state.result = DistributedChunk(processed.chunk, blob, processed.node_id,
                                            list(state.acks), list(state.failed))
            self.metrics.success("distribution", blob.blob_size)
            # The remaining writes go on in the background; their acks arrive as late acks.
            task = asyncio.create_task(self._finish(state, finished, src))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return state.result
        if src is not None:
            await self._release(src, blob.chunk_id)
        self.metrics.failure("distribution")
        chunk = processed.chunk
        self.on_event("chunk_failed", f"chunk {chunk.index} of {chunk.file}: "
                      f"{len(state.acks)} replica(s), quorum {state.quorum}", level="warning",
                      file=chunk.file, index=chunk.index, chunk_id=chunk.chunk_id,
                      stage="distribution",
                      error="source lost" if state.source_lost else "quorum not reached")
        if state.source_lost:
            raise SourceLost(f"processing node {processed.node_id} failed before chunk "
                             f"{blob.chunk_id[:12]} reached quorum")
        raise QuorumNotReached(
            f"chunk {chunk.index} of {chunk.file}: {len(state.acks)} verified replica(s), "
            f"write_quorum is {state.quorum}; {_failures(state.causes)}")

    async def _write_to_quorum(self, processed: ProcessedChunk, force_cross_cloud: bool,
                               ) -> tuple[_ChunkWrite, asyncio.Future[list[None]]]:
        """Start a write to every target; return at quorum, or once there is no hope of it,
        with the writes (still running past quorum)."""
        blob = processed.result
        assert blob is not None
        async with self._limit:
            with self.metrics.busy("distribution"):
                # As many targets as there are, down to write_quorum (InsufficientNodes
                # below it): a quorum write goes on when one replica cannot be placed.
                targets = self.placement.select_target_nodes(
                    blob.chunk_id, processed.node_id, self.config.replication_factor,
                    at_least=self.config.write_quorum, force_cross_cloud=force_cross_cloud,
                    size_bytes=blob.blob_size)
                state = _ChunkWrite(processed, self.config.write_quorum, current=list(targets),
                                    replacements_left=self.config.max_replacements)
                writers = [asyncio.create_task(self._write_target(state, t, force_cross_cloud))
                           for t in targets]
                finished: asyncio.Future[list[None]] = asyncio.gather(*writers)
                self._track(state, finished)
                waiter: asyncio.Task[bool] = asyncio.create_task(state.done.wait())
                try:
                    either: list[asyncio.Future[Any]] = [finished, waiter]
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    for writer in writers:
                        writer.cancel()
                    await asyncio.gather(finished, return_exceptions=True)
                    raise
                finally:
                    waiter.cancel()
        return state, finished

    async def drain(self) -> None:
        """Wait for every background write to finish; report the chunks left short."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        self._report_short()

    def writing(self, chunk_id: str) -> list[str]:
        """Nodes a write of chunk_id is running to, or acked by a write not yet finished.

        Repair counts them as holders: the manifest learns of them only when storage
        flushes, and a repair that ignored them would leave a replica too many.
        """
        nodes = {n for state in self._writes.get(chunk_id, ())
                 for n in (*state.running, *(a.node_id for a in state.acks))}
        return sorted(nodes)

    def close(self) -> None:
        """Release the replica writer if this coordinator made it."""
        if self._owns_writer:
            self.writer.close()

    # -- internals ----------------------------------------------------------------------

    async def _write_target(self, state: _ChunkWrite, target: str,
                            force_cross_cloud: bool) -> None:
        processed = state.processed
        blob = processed.result
        assert blob is not None
        node_id: str | None = target
        while node_id is not None:
            if state.source_lost:
                return
            src = self.registry.nodes[processed.node_id]
            dst = self.registry.nodes[node_id]
            state.running.add(dst.id)
            try:
                ack = await self.writer.write(src, dst, blob)
            except ReplicaRefused as exc:
                log.warning("replica of %s on %s failed: %s", blob.chunk_id[:12], dst.id,
                            exc.cause)
                state.causes[dst.id] = exc.cause
                node_id = self._replace(state, dst.id, force_cross_cloud, str(exc.cause))
                continue
            except MulticloudError as exc:
                log.warning("processing node %s lost chunk %s: %s", src.id, blob.chunk_id[:12],
                            exc)
                state.source_lost = True
                state.done.set()
                return
            finally:
                # No await between here and the ack below: repair sees one or the other.
                state.running.discard(dst.id)
            state.acks.append(ack)
            if state.result is not None:  # quorum was reached earlier: a late ack
                state.result.replicas.append(ack)
                self.on_late_ack(state.result, ack)
            if len(state.acks) >= state.quorum:
                state.done.set()
            return

    def _replace(self, state: _ChunkWrite, failed: str, force_cross_cloud: bool,
                 reason: str) -> str | None:
        """The node to write instead of a failed target (None: none left, or none needed)."""
        state.failed.append(failed)
        state.current.remove(failed)
        if state.result is not None:
            # Past quorum: the committed chunk's record follows, as it does for late acks.
            state.result.failed_targets.append(failed)
        replacement = self._replacement(state, force_cross_cloud)
        blob = state.processed.result
        assert blob is not None
        if replacement is not None:
            state.current.append(replacement)
            self.metrics.replicas.replacements += 1
            self.on_event("replica_replaced",
                          f"chunk {blob.chunk_id[:12]}: {failed} -> {replacement} ({reason})",
                          level="warning", chunk_id=blob.chunk_id, failed_node=failed,
                          replacement=replacement, reason=reason)
        elif len(state.acks) + self._pending(state) < state.quorum:
            state.done.set()
        return replacement

    def _pending(self, state: _ChunkWrite) -> int:
        acked = {a.node_id for a in state.acks}
        return sum(1 for n in state.current if n not in acked)

    def _replacement(self, state: _ChunkWrite, force_cross_cloud: bool) -> str | None:
        if state.replacements_left <= 0:
            return None
        state.replacements_left -= 1
        blob = state.processed.result
        assert blob is not None
        return self.placement.replacement(
            blob.chunk_id, state.processed.node_id, state.current, state.failed,
            force_cross_cloud=force_cross_cloud, size_bytes=blob.blob_size)

    async def _finish(self, state: _ChunkWrite, writers: asyncio.Future[list[None]],
                      src: WorkerNode | None) -> None:
        await asyncio.gather(writers, return_exceptions=True)
        if len({a.node_id for a in state.acks}) < self.config.replication_factor:
            self._short.append(state.processed.chunk.chunk_id)
        if src is not None:
            await self._release(src, state.processed.chunk.chunk_id)

    def _track(self, state: _ChunkWrite, writers: asyncio.Future[list[None]]) -> None:
        """Keep state findable by chunk id (for `writing`) until its writes are all done."""
        chunk_id = state.processed.chunk.chunk_id
        self._writes.setdefault(chunk_id, []).append(state)

        def untrack(_: asyncio.Future[list[None]]) -> None:
            # By identity: two writes of one chunk id (the same bytes in two files) differ.
            left = [s for s in self._writes.get(chunk_id, []) if s is not state]
            if left:
                self._writes[chunk_id] = left
            else:
                self._writes.pop(chunk_id, None)

        writers.add_done_callback(untrack)

    def _report_short(self) -> None:
        """One `under_replicated` event for the chunks committed short since the last one.

        One event with the count and a few ids rather than one per chunk: with a node
        down, that is every chunk of the batch.
        """
        if not self._short:
            return
        short, self._short = sorted(set(self._short)), []
        rf = self.config.replication_factor
        shown = short[:_IDS_SHOWN]
        more = f" and {len(short) - len(shown)} more" if len(short) > len(shown) else ""
        self.on_event("under_replicated",
                      f"{len(short)} chunk(s) committed with fewer than {rf} replicas "
                      f"({', '.join(c[:12] for c in shown)}{more}); hinted: repair brings "
                      f"them to {rf} when a node comes back or joins", level="warning",
                      count=len(short), chunk_ids=shown, replication_factor=rf)

    async def _release(self, src: WorkerNode, chunk_id: str) -> None:
        try:
            await self.registry.client.release(src, chunk_id)
        except MulticloudError as exc:  # the node is gone; so is its staging area
            log.info("could not release staged %s on %s: %s", chunk_id[:12], src.id, exc)

    async def distribute_processed_chunks(self, processed: list[ProcessedChunk],
                                          force_cross_cloud: bool = False,
                                          ) -> list[DistributedChunk]:
        """Distribute many chunks and wait for all their writes, quorum and the rest.

        The stage on its own, for callers that hold processed chunks: the same
        `distribute` that `multicloud run` streams every chunk through.
        """
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.distribute(p, force_cross_cloud))
                         for p in processed if p.result is not None]
        except* MulticloudError as failed:
            raise failed.exceptions[0] from None
        results = [t.result() for t in tasks]
        await self.drain()
        return results


_CAUSES: list[tuple[type[MulticloudError], str]] = [
    (DiskFull, "disk full"), (NodeUnavailable, "unreachable"),
    (TransferTimeout, "timed out"), (IntegrityError, "refused the bytes as damaged"),
]


def _failures(causes: dict[str, MulticloudError]) -> str:
    """The failed targets grouped by what went wrong, with what to do about a full disk."""
    if not causes:
        return "no target was left to write to"
    groups: dict[str, list[str]] = {}
    for node_id, cause in causes.items():
        label = next((text for cls, text in _CAUSES if isinstance(cause, cls)), str(cause))
        groups.setdefault(label, []).append(node_id)
    text = "; ".join(f"{label}: {', '.join(sorted(nodes))}" for label, nodes in groups.items())
    if any(isinstance(cause, DiskFull) for cause in causes.values()):
        text += " (free some space, or add nodes, and run the batch again)"
    return f"failed targets: {text}"
