"""Stage 2, processing: validate and transform each chunk on a worker node of its source cloud.

The raw bytes go out once, from the source bucket to a node in the same cloud (data
locality, no egress); a chunk in a real bucket goes as a reference, and the node reads the
range itself, so its bytes never pass through the orchestrator. The node is the chunk's
first rendezvous choice in that cloud, so it is usually also one of the chunk's replica
targets and stores its copy without a network hop; when that node's worker slots are all
busy, the least-loaded node of the cloud takes it.

`on_nodes` is the one retry loop of the pipeline: it runs an attempt on the best node for
a chunk and, when that node fails (it is down, or lost the chunk before quorum), on the
next one. `multicloud run` runs processing and distribution inside it; `process_one` runs
processing alone.

A chunk whose records do not parse (a log cut off mid-line) is the source as it is: with
`on_invalid_records: quarantine` the node stores it byte-exact all the same and the pool
records where the first bad line of each file is and why (`quarantined`, the run summary,
a `records_invalid` event); with `fail` it fails the batch. Bytes that changed on the way
to the node fail it in either mode.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from multicloud.blob.validate import InvalidRecord
from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core import clock
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
from multicloud.pipeline.metrics import PipelineMetrics, QuarantinedRecord
from multicloud.pipeline.placement import rank_nodes

log = logging.getLogger(__name__)

T = TypeVar("T")

# What makes a chunk move to another node: the node is gone, failed on its disk, or lost
# the staged blob before the chunk reached quorum.
NODE_FAILURES = (NodeUnavailable, StorageError, SourceLost)

_COUNT_BLOCK = 4 * 1024 * 1024  # read size when counting a source file's lines


class _LineCounter:
    """Counts the newlines of a source file before an offset, resuming from earlier counts.

    Only a chunk with an invalid record asks, so a file is read again at most once however
    many of its chunks are bad (the counts are kept while the file's size and mtime hold).
    """

    def __init__(self) -> None:
        # path -> ((size, mtime_ns), sorted [(offset, newlines before offset)])
        self._marks: dict[Path, tuple[tuple[int, int], list[tuple[int, int]]]] = {}
        self._locks: dict[Path, asyncio.Lock] = {}

    async def lines_before(self, path: Path, offset: int) -> int:
        """Newlines in path's first offset bytes; OSError if the file cannot be read."""
        if offset == 0:
            return 0
        # One count at a time per file, so the second bad chunk resumes from the first.
        async with self._locks.setdefault(path, asyncio.Lock()):
            return await asyncio.to_thread(self._count, path, offset)

    def _count(self, path: Path, offset: int) -> int:
        stat = path.stat()
        signature = (stat.st_size, stat.st_mtime_ns)
        known, marks = self._marks.get(path, (signature, [(0, 0)]))
        if known != signature:  # the file changed since: earlier counts do not hold
            marks = [(0, 0)]
        pos, lines = marks[bisect.bisect_right(marks, offset, key=lambda mark: mark[0]) - 1]
        with path.open("rb") as source:
            source.seek(pos)
            while pos < offset:
                block = source.read(min(_COUNT_BLOCK, offset - pos))
                if not block:
                    raise OSError(f"{path} is shorter than {offset} bytes now")
                lines += block.count(b"\n")
                pos += len(block)
        bisect.insort(marks, (offset, lines))
        self._marks[path] = (signature, marks)
        return lines

    def clear(self) -> None:
        """Forget every count."""
        self._marks.clear()
        self._locks.clear()


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
        self._lines = _LineCounter()

    @property
    def quarantined(self) -> dict[str, str]:
        """File -> why it was stored with records that do not parse: its first bad line and
        the reason, e.g. "line 1234: not valid JSON: unexpected end of data at column 29".

        Kept in the run's metrics, which the orchestrator resets at the start of each run.
        """
        return {file: f"{record.where}: {record.reason}"
                for file, record in self.metrics.quarantined_files().items()}

    def found_invalid(self, chunk: Chunk) -> bool:
        """Whether this run found a record of the chunk (or of a file packed in it) that
        does not parse."""
        keys = [(m.file, 0) for m in chunk.members] or [(chunk.file, chunk.index)]
        return any(key in self.metrics.invalid_chunks for key in keys)

    def reset(self) -> None:
        """Forget the quarantined files (a new run starts)."""
        self.metrics.invalid_chunks.clear()
        self._lines.clear()

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
        ranked = rank_nodes(chunk.placement_key, nodes)
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

        Bad data is not an exception: the result has `result=None` and the error. Records
        that do not parse in quarantine mode are not even that: the blob is staged and
        `invalid` says why. A node that fails raises (see NODE_FAILURES). Each call counts
        one attempt of the stage.
        """
        self.metrics.attempt("processing")
        started = clock.monotonic()
        self._load[node.id] += 1
        try:
            with self.metrics.busy("processing"):
                # A chunk in a bucket is read by the node itself: only its reference goes.
                data = None if chunk.source_ref is not None else await read_chunk_bytes(chunk)
                outcome = await self.registry.client.process_outcome(
                    node, chunk, data, self.origin_of(chunk.source_cloud))
        except ValidationFailed as exc:
            self.metrics.failure("processing")
            self.on_event("chunk_failed", str(exc), level="error", file=chunk.file,
                          index=chunk.index, chunk_id=chunk.chunk_id, stage="processing",
                          error=str(exc))
            return ProcessedChunk(chunk, node.id, None, clock.monotonic() - started,
                                  error=str(exc))
        except NODE_FAILURES:
            self.metrics.failure("processing")
            raise
        finally:
            self._load[node.id] -= 1
        latency = clock.monotonic() - started
        if not chunk.chunk_id:  # read from a bucket by the node, which found its id
            chunk.chunk_id = outcome.blob.chunk_id
        self.metrics.success("processing", chunk.size_bytes, latency)
        invalid = None
        if outcome.invalid is not None:
            invalid = await self._quarantine(chunk, outcome.invalid)
        return ProcessedChunk(chunk, node.id, outcome.blob, latency, invalid=invalid)

    async def _quarantine(self, chunk: Chunk, problem: InvalidRecord) -> str:
        """Record a chunk stored although a record of it does not parse; why, as a line.

        In a pack, each file with a bad record is noted on its own; the line says how many.
        """
        if problem.file is not None:
            for each in (problem, *problem.more):
                file = each.file or chunk.file
                self._note(QuarantinedRecord(file, 0, each.line, each.reason), chunk)
            first = f"{problem.file}: line {problem.line}: {problem.reason}"
            return first + (f" (and {len(problem.more)} more file(s) of the pack)"
                            if problem.more else "")
        record = self.metrics.invalid_chunks.get((chunk.file, chunk.index))
        if record is None:  # a chunk processed again after its node failed is noted once
            record = await self._locate(chunk, problem)
            self._note(record, chunk)
        return f"{record.where}: {record.reason}"

    def _note(self, record: QuarantinedRecord, chunk: Chunk) -> None:
        if self.metrics.quarantine(record):
            self.on_event(
                "records_invalid", f"{record.file}: {record.where}: {record.reason}; "
                f"stored as it is", level="warning", file=record.file, line=record.line,
                reason=record.reason, line_in_file=record.in_file, index=record.chunk,
                chunk_id=chunk.chunk_id)

    async def _locate(self, chunk: Chunk, problem: InvalidRecord) -> QuarantinedRecord:
        """The invalid record with its line in the file, counted from the source when the
        chunk does not start the file; its line in the chunk when the source cannot tell."""
        if chunk.offset > 0:
            if chunk.path is None:  # bytes held in memory: the lines before are not here
                return QuarantinedRecord(chunk.file, chunk.index, problem.line, problem.reason,
                                         in_file=False)
            try:
                before = await self._lines.lines_before(chunk.path, chunk.offset)
            except OSError as exc:
                log.warning("cannot count the lines of %s before byte %d: %s", chunk.path,
                            chunk.offset, exc)
                return QuarantinedRecord(chunk.file, chunk.index, problem.line, problem.reason,
                                         in_file=False)
        else:
            before = 0
        # The chunk's line 1 is the line the chunk starts in, the one after `before`
        # newlines (it may have begun in the previous chunk).
        return QuarantinedRecord(chunk.file, chunk.index, before + problem.line,
                                 problem.reason)

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
