"""The orchestrator: runs a batch through the four stages, overlapped, and reports on it.

Chunks stream: ingestion reads a chunk only while the chunks between read and commit add
up to less than `max_inflight_chunks` full chunks (a byte budget, so many small files
overlap more), and each chunk then flows through processing, distribution and storage on
its own task, so memory depends on chunk size and queue depth, not on the dataset.
After the last chunk commits, background replica writes are drained and repair brings
every chunk back to the replication factor (a node that fails mid-run starts a repair of
what it held at once).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multicloud.blob.transforms import load_key
from multicloud.core.config import PipelineConfig, load_config
from multicloud.core.errors import (
    InsufficientNodes,
    MulticloudError,
    QuorumNotReached,
    ValidationFailed,
)
from multicloud.core.network import TrafficLedger
from multicloud.core.types import (
    Chunk,
    NodeStatus,
    PipelineResult,
    PipelineStatus,
    RestoreReport,
    Stage,
    VerifyReport,
)
from multicloud.pipeline.distribution import DistributionCoordinator, SourceLost
from multicloud.pipeline.events import EventBus, EventSink, PipelineEvent
from multicloud.pipeline.ingestion import ByteBudget, DataIngestionEngine
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.processing import ProcessingWorkerPool
from multicloud.pipeline.restore import BatchRestorer
from multicloud.pipeline.sources import SourceFile, list_source
from multicloud.pipeline.storage import StorageManager

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry, WorkerNode

log = logging.getLogger(__name__)

MB = 1_000_000


ProgressListener = Callable[["PipelineOrchestrator"], None]


class PipelineOrchestrator:
    """Coordinates complete end-to-end pipeline execution."""

    def __init__(self, node_registry: NodeRegistry, config_dir: str | Path | None = "config/",
                 config: PipelineConfig | None = None) -> None:
        self.node_registry = node_registry
        self.config = config or load_config(config_dir)
        self.metrics = PipelineMetrics()
        self.storage_manager = StorageManager(node_registry, self.config.storage,
                                              distribution=self.config.distribution,
                                              metrics=self.metrics)
        self.ingestion_engine = DataIngestionEngine(node_registry, self.config.ingestion)
        self.processing_pool = ProcessingWorkerPool(node_registry, self.config.processing,
                                                    self.metrics)
        self.distribution_coordinator = DistributionCoordinator(
            node_registry, self.config.distribution, self.metrics)
        self.pipeline_status = PipelineStatus.IDLE
        self.current_batch: str | None = None
        self.current_stage: str | None = None
        self.bus = EventBus()
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, committed bytes)
        self.total_bytes = 0
        self.committed_bytes = 0
        self.committed_chunks = 0
        self.node_failures_handled = 0
        self._started: float | None = None
        self._finished: float | None = None
        self._listeners: list[ProgressListener] = []
        # Repairs started the moment a node fails, for the chunks committed so far.
        self._repairs: set[asyncio.Task[None]] = set()
        self.replicas_repaired_early = 0
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    # -- live view, for the dashboard -------------------------------------------------------

    @property
    def events(self) -> list[PipelineEvent]:
        """The latest events of the current (or last) run, oldest first."""
        return list(self.bus.recent)

    @property
    def progress_percent(self) -> float:
        """Share of the batch's bytes committed, 0-100."""
        if self.pipeline_status is PipelineStatus.COMPLETED:
            return 100.0
        if not self.total_bytes:
            return 0.0
        return round(100.0 * self.committed_bytes / self.total_bytes, 2)

    @property
    def healthy_nodes(self) -> int:
        """Nodes in service."""
        return len(self.node_registry.healthy_nodes())

    @property
    def unhealthy_nodes(self) -> int:
        """Nodes out of service."""
        return len(self.node_registry.nodes) - self.healthy_nodes

    @property
    def elapsed_seconds(self) -> float:
        """Seconds since the current (or last) run started."""
        if self._started is None:
            return 0.0
        return (self._finished or time.perf_counter()) - self._started

    @property
    def current_throughput(self) -> float:
        """Committed MB per second so far."""
        elapsed = self.elapsed_seconds
        return round(self.committed_bytes / MB / elapsed, 2) if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the current throughput, None before the first commit."""
        if self.pipeline_status is not PipelineStatus.RUNNING or not self.committed_bytes:
            return None
        rate = self.committed_bytes / max(self.elapsed_seconds, 1e-9)
        return max(self.total_bytes - self.committed_bytes, 0) / rate

    @property
    def estimated_completion(self) -> dt.datetime | None:
        """When the run should finish (local wall-clock time), None if unknown."""
        eta = self.eta_seconds
        if eta is None:
            return None
        return dt.datetime.now().astimezone() + dt.timedelta(seconds=eta)

    def add_progress_listener(self, listener: ProgressListener) -> Callable[[], None]:
        """Call listener(orchestrator) after every committed chunk; returns a remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def wait_for_progress(self, percent: float) -> None:
        """Return once progress_percent reaches percent (or the run ends)."""
        if self.progress_percent >= percent or self.pipeline_status in (
                PipelineStatus.COMPLETED, PipelineStatus.FAILED):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((percent, future))
        await future

    # -- running -------------------------------------------------------------------------

    async def run_pipeline(self, batch_config: dict[str, Any]) -> PipelineResult:
        """Execute the complete pipeline: Ingestion -> Processing -> Distribution -> Storage."""
        self._new_run()
        batch_id = str(batch_config.get("batch_id") or f"batch-{int(time.time())}")
        self.current_batch = batch_id
        self.pipeline_status = PipelineStatus.RUNNING
        self._started = time.perf_counter()
        ledger_before = self.node_registry.transport.ledger.snapshot()
        unsubscribe = self.node_registry.subscribe(self._on_node_status)
        begun = False
        try:
            source, cloud = self.ingestion_engine.resolve(batch_config)
            force = bool(batch_config.get("force_cross_cloud", False))
            files = await asyncio.to_thread(list_source, source)
            self._check_policy(force)
            self.total_bytes = sum(f.size for f in files)
            await asyncio.to_thread(self.storage_manager.manifest.begin_batch,
                                    batch_id, str(source), cloud)
            begun = True
            self.storage_manager.begin(batch_id)
            await self._load_node_usage()
            self._emit("pipeline_started",
                       f"batch {batch_id}: {len(files)} files, {self.total_bytes} bytes from "
                       f"{source} ({cloud})", source=str(source), source_cloud=cloud,
                       files=len(files), total_bytes=self.total_bytes)
            await self._stream(files, cloud, force)
            result = await self._finish(batch_id, ledger_before)
        except* MulticloudError as group:
            error = group.exceptions[0]
            while isinstance(error, ExceptionGroup):
                error = error.exceptions[0]
            result = await self._fail(batch_id, error, begun)
        finally:
            unsubscribe()
            self._finished = time.perf_counter()
            if self.pipeline_status is PipelineStatus.RUNNING:
                # Cancelled, or a bug: leave the orchestrator usable and the batch marked.
                self.pipeline_status = PipelineStatus.FAILED
                if begun:
                    await asyncio.shield(asyncio.to_thread(
                        self.storage_manager.manifest.finish_batch, batch_id, "failed",
                        {"status": "failed", "error": "interrupted"}))
            self._wake_waiters(force=True)
        return result

    async def restore_batch(self, batch_id: str, dest_dir: str | Path) -> RestoreReport:
        """Rebuild every file of a batch, byte-exact, under dest_dir."""
        return await self._restorer().restore(batch_id, dest_dir)

    async def verify_batch(self, batch_id: str) -> VerifyReport:
        """Check every replica of a batch."""
        return await self._restorer().verify(batch_id)

    async def close(self) -> None:
        """Release the manifest and stop listening to the registry."""
        await self.distribution_coordinator.drain()
        await self._settle_repairs()
        self.distribution_coordinator.close()
        self.storage_manager.close()

    # -- internals ----------------------------------------------------------------------

    def _new_run(self) -> None:
        if self.pipeline_status is PipelineStatus.RUNNING:
            raise MulticloudError("this orchestrator is already running a batch; "
                                  "start another orchestrator for a parallel batch")
        self.metrics = PipelineMetrics()
        self.bus.clear()
        self.timeline = []
        self.total_bytes = self.committed_bytes = self.committed_chunks = 0
        self.node_failures_handled = 0
        self.replicas_repaired_early = 0
        self._finished = None
        self.current_stage = Stage.INGESTION.value
        self.ingestion_engine = DataIngestionEngine(self.node_registry, self.config.ingestion,
                                                    metrics=self.metrics)
        self.processing_pool = ProcessingWorkerPool(self.node_registry, self.config.processing,
                                                    self.metrics)
        self.distribution_coordinator.close()
        self.distribution_coordinator = DistributionCoordinator(
            self.node_registry, self.config.distribution, self.metrics)
        self.distribution_coordinator.on_late_ack = self.storage_manager.record_late_ack
        self.distribution_coordinator.on_event = self._emit
        self.processing_pool.on_event = self._emit
        self.storage_manager.metrics = self.metrics

    def _check_policy(self, force_cross_cloud: bool) -> None:
        dist = self.config.distribution
        healthy = self.node_registry.healthy_nodes()
        clouds = {n.cloud for n in healthy}
        need_clouds = max(dist.min_clouds, 2 if force_cross_cloud else 1)
        if len(healthy) < dist.replication_factor:
            raise InsufficientNodes(
                f"replication_factor is {dist.replication_factor} but only {len(healthy)} "
                f"healthy node(s) are up; start more nodes or lower replication_factor")
        if len(clouds) < need_clouds:
            why = "force_cross_cloud" if force_cross_cloud and dist.min_clouds < 2 else \
                f"min_clouds is {dist.min_clouds}"
            raise InsufficientNodes(
                f"{why} but healthy nodes span {len(clouds)} cloud(s) "
                f"({', '.join(sorted(clouds)) or 'none'}); add nodes in another cloud or "
                f"lower min_clouds")

    async def _stream(self, files: list[SourceFile], cloud: str, force: bool) -> None:
        ingestion = self.config.ingestion
        inflight = ByteBudget(ingestion.max_inflight_chunks * ingestion.chunk_size_bytes)
        chunks = self.ingestion_engine.iter_chunks(files, cloud, inflight)
        async with asyncio.TaskGroup() as group, aclosing(chunks):
            async for chunk in chunks:
                group.create_task(self._chunk_flow(chunk, force, inflight))
            self.metrics.record_stage(Stage.INGESTION, self.ingestion_engine.stats.chunks)
            self._stage_complete(Stage.INGESTION)
            self.current_stage = Stage.PROCESSING.value
        self._stage_complete(Stage.PROCESSING)

    async def _chunk_flow(self, chunk: Chunk, force: bool, inflight: ByteBudget) -> None:
        """One chunk through processing, distribution and storage."""
        try:
            lost: set[str] = set()
            for _attempt in range(self.config.processing.max_attempts):
                processed = await self.processing_pool.process_one(chunk, exclude=lost)
                if processed.result is None:
                    raise ValidationFailed(processed.error or "processing failed")
                if chunk.path is not None:
                    chunk.data = None  # the blob is staged; a retry re-reads the source
                try:
                    distributed = await self.distribution_coordinator.distribute(processed,
                                                                                 force)
                except SourceLost as exc:
                    log.warning("%s; processing it again elsewhere", exc)
                    lost.add(processed.node_id)
                    continue
                self.storage_manager.commit(distributed)
                await self.storage_manager.flush(force=False)
                self.committed_bytes += chunk.size_bytes
                self.committed_chunks += 1
                self.timeline.append((self.elapsed_seconds, self.committed_bytes))
                self._progressed()
                return
            raise QuorumNotReached(f"chunk {chunk.index} of {chunk.file}: its processing node "
                                   f"failed {len(lost)} time(s); giving up")
        finally:
            await inflight.release(chunk.size_bytes)

    async def _finish(self, batch_id: str, ledger_before: dict[str, Any]) -> PipelineResult:
        self.current_stage = Stage.DISTRIBUTION.value
        with self.metrics.busy("distribution"):  # replicas past quorum are distribution too
            await self.distribution_coordinator.drain()
        self._stage_complete(Stage.DISTRIBUTION)
        self.current_stage = Stage.STORAGE.value
        storage = self.storage_manager
        await storage.flush()
        stats = self.ingestion_engine.stats
        await asyncio.to_thread(storage.manifest.add_files, batch_id, stats.file_entries)
        await self.node_registry.probe()  # a node that died quietly must not count as a holder
        await self._settle_repairs()
        repair = None
        if self.config.storage.repair:
            with self.metrics.busy("storage"):
                repair = await storage.repair()
            created = repair.replicas_created + self.replicas_repaired_early
            self._emit("repair_done", f"{created} replica(s) re-created, "
                       f"{repair.under_replicated} chunk(s) still under-replicated",
                       level="warning" if repair.under_replicated else "info",
                       replicas_created=created,
                       under_replicated=repair.under_replicated, lost=repair.lost)
        under = await storage.under_replicated()
        by_cloud, by_node = await storage.usage_by_place()
        self.metrics.record_stage(Stage.PROCESSING, self.metrics.stages["processing"].succeeded)
        self.metrics.record_stage(Stage.DISTRIBUTION,
                                  self.metrics.stages["distribution"].succeeded)
        self.metrics.record_stage(Stage.STORAGE, self.metrics.stages["storage"].succeeded)
        traffic = TrafficLedger.difference(self.node_registry.transport.ledger.snapshot(),
                                           ledger_before)
        duration = time.perf_counter() - (self._started or time.perf_counter())
        dist = self.distribution_coordinator
        summary = self.metrics.get_summary()
        summary["ingestion"].update(files=stats.files, chunks=stats.chunks,
                                    bytes=stats.bytes)
        summary["distribution"].update(
            replica_success_rate=dist.replica_success_rate,
            replica_writes=dist.replica_writes, replica_failures=dist.replica_failures,
            replacements=dist.replacements,
            cross_cloud_transfers=sum(t.transfers for t in traffic.values() if t.cross_cloud),
            cross_cloud_bytes=sum(t.bytes for t in traffic.values() if t.cross_cloud),
            bytes_by_link={name: t.bytes for name, t in sorted(traffic.items())},
            egress_cost_usd=round(sum(t.egress_usd for t in traffic.values()), 6),
            emulated_network_seconds=round(sum(t.emulated_seconds for t in traffic.values()), 3),
            timeouts=dist.timeouts.snapshot(),
        )
        summary["storage"].update(
            by_cloud=by_cloud, by_node=by_node, under_replicated=under,
            replicas_repaired=(repair.replicas_created if repair else 0)
            + self.replicas_repaired_early,
            chunks_lost=repair.lost if repair else 0,
        )
        summary["node_failures_handled"] = self.node_failures_handled
        summary["duration_seconds"] = round(duration, 6)
        summary["throughput_mb_s"] = round(stats.bytes / MB / duration, 3) if duration else 0.0
        summary["events"] = [{"at": e.at, "kind": e.kind, "detail": e.detail}
                             for e in self.events]
        summary["timeline"] = _downsample(self.timeline, 200)
        result = PipelineResult(status="success", batch_id=batch_id, duration_seconds=duration,
                                chunks_processed=stats.chunks, bytes_processed=stats.bytes,
                                files=stats.files, metrics=summary)
        self._stage_complete(Stage.STORAGE, summary["storage"])
        await asyncio.to_thread(storage.manifest.finish_batch, batch_id, "success",
                                result.to_dict())
        self.pipeline_status = PipelineStatus.COMPLETED
        self.current_stage = None
        self._emit("pipeline_finished", f"batch {batch_id}: success, {stats.chunks} chunks "
                   f"in {duration:.2f}s", status="success", duration_seconds=duration,
                   chunks=stats.chunks, bytes=stats.bytes, error=None)
        return result

    async def _fail(self, batch_id: str, error: BaseException, begun: bool) -> PipelineResult:
        self.pipeline_status = PipelineStatus.FAILED
        await self.distribution_coordinator.drain()
        await self._settle_repairs()
        summary = self.metrics.get_summary()
        summary["node_failures_handled"] = self.node_failures_handled
        duration = time.perf_counter() - (self._started or time.perf_counter())
        result = PipelineResult(status="failed", batch_id=batch_id, duration_seconds=duration,
                                chunks_processed=self.committed_chunks,
                                bytes_processed=self.committed_bytes, metrics=summary,
                                error=str(error))
        if begun:
            try:
                await self.storage_manager.flush()
                await asyncio.to_thread(self.storage_manager.manifest.finish_batch, batch_id,
                                        "failed", result.to_dict())
            except MulticloudError as exc:  # the run's own error is the one to report
                log.error("could not record the failure of batch %s: %s", batch_id, exc)
        self.current_stage = None
        self._emit("pipeline_finished", f"batch {batch_id}: failed: {error}", level="error",
                   status="failed", duration_seconds=duration, chunks=self.committed_chunks,
                   bytes=self.committed_bytes, error=str(error))
        return result

    def _progressed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:  # a broken watcher must not fail the batch
                log.exception("progress listener %r failed", listener)
        self._wake_waiters()

    def _wake_waiters(self, force: bool = False) -> None:
        progress = self.progress_percent
        still = []
        for percent, future in self._waiters:
            if force or progress >= percent:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((percent, future))
        self._waiters = still

    def _on_node_status(self, node: WorkerNode, old: NodeStatus, reason: str) -> None:
        if node.status is NodeStatus.UNHEALTHY:
            # Distribution re-places the node's in-flight writes at once; repair re-creates
            # the replicas it held before the run returns.
            self.node_failures_handled += 1
            self._emit("node_unhealthy", f"{node.id} ({node.cloud}/{node.region}): {reason}",
                       level="warning", node_id=node.id, cloud=node.cloud, region=node.region,
                       reason=reason)
            self._start_repair(node.id)
        else:
            self._emit("node_recovered", f"{node.id}: {reason}", node_id=node.id,
                       reason=reason)

    async def _load_node_usage(self) -> None:
        """What each node already holds, so placement skips a node without room for a chunk."""
        usage = await asyncio.to_thread(self.storage_manager.manifest.node_usage)
        for node_id, node in self.node_registry.nodes.items():
            node.used_bytes = usage.get(node_id, (0, 0))[1]

    def _start_repair(self, node_id: str) -> None:
        """Re-replicate the committed chunks the failed node held, now, not at the end."""
        if self.pipeline_status is not PipelineStatus.RUNNING or not self.config.storage.repair:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # marked from outside the event loop: the final repair covers it
        task = loop.create_task(self._repair_after_failure(node_id))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _repair_after_failure(self, node_id: str) -> None:
        storage = self.storage_manager
        await storage.flush()
        ids = sorted(storage.chunk_ids)
        holders = await asyncio.to_thread(storage.manifest.replicas, ids)
        affected = [chunk_id for chunk_id, nodes in holders.items() if node_id in nodes]
        if affected:
            with self.metrics.busy("storage"):
                report = await storage.repair(affected)
            self.replicas_repaired_early += report.replicas_created

    async def _settle_repairs(self) -> None:
        """Wait for the repairs started by failures (the final pass must not race them)."""
        while self._repairs:
            for outcome in await asyncio.gather(*list(self._repairs), return_exceptions=True):
                if isinstance(outcome, BaseException):
                    log.warning("repair after a node failure failed: %s (the final repair "
                                "pass covers its chunks)", outcome)

    def _emit(self, kind: str, detail: str, *, level: str = "info", **fields: Any) -> None:
        self.bus.emit(kind, detail, batch_id=self.current_batch, level=level, **fields)

    def _stage_complete(self, stage: Stage, metrics: dict[str, Any] | None = None) -> None:
        stage_metrics = metrics or self.metrics.get_summary()[stage.value]
        self._emit("stage_complete", f"{stage.value} complete", stage=stage.value,
                   metrics=stage_metrics)

    def add_event_sink(self, sink: EventSink) -> Callable[[], None]:
        """Call sink(event) for every pipeline event; returns a remover."""
        return self.bus.subscribe(sink)

    def _restorer(self) -> BatchRestorer:
        return BatchRestorer(self.node_registry, self.storage_manager.manifest,
                             key=load_key(self.config.processing.encryption))


def _downsample(points: list[tuple[float, int]], most: int) -> list[list[float]]:
    """At most `most` evenly spaced points (always keeping the last), as JSON-ready pairs."""
    if len(points) <= most:
        return [[round(t, 4), b] for t, b in points]
    step = len(points) / most
    picked = [points[int(i * step)] for i in range(most - 1)] + [points[-1]]
    return [[round(t, 4), b] for t, b in picked]
