"""The live view of a run: what the dashboard, `/status` and `/metrics` show.

The orchestrator reports progress here (a batch begins, a chunk commits, a stage starts,
the run ends) and emits its events through the view's bus; watchers read one frozen
`LiveSnapshot` at a time instead of reaching into the orchestrator and its stages. Progress
listeners and waiters are called on every commit; a listener that fails is logged and
kept out of the run's way, as event sinks are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multicloud.control.registry import NodeRegistry
from multicloud.core import clock
from multicloud.core.network import LinkTraffic, TrafficLedger
from multicloud.core.types import PipelineStatus
from multicloud.pipeline.events import EventBus, EventSink, PipelineEvent
from multicloud.pipeline.metrics import PipelineMetrics, ReplicaStats, StageCounters
from multicloud.pipeline.timeouts import AdaptiveTimeouts

log = logging.getLogger(__name__)

MB = 1_000_000

ProgressListener = Callable[["LiveView"], None]


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One node as a watcher sees it."""

    id: str
    cloud: str
    region: str
    healthy: bool


@dataclass(frozen=True, slots=True)
class LiveSnapshot:
    """A run (or the last one) at one moment: everything a dashboard or a scrape shows.

    The figures are copies; `stages` and `replicas` are the run's own counters, shared
    rather than copied so a scrape can read latency lists incrementally: watchers read
    them and never change them.
    """

    status: PipelineStatus
    batch_id: str | None
    stage: str | None
    progress_percent: float  # of the batch's bytes committed, 0-100
    total_bytes: int
    committed_bytes: int
    committed_chunks: int
    elapsed_seconds: float
    throughput_mb_s: float  # committed MB (10^6 bytes) per second
    eta_seconds: float | None  # None before the first commit
    nodes: tuple[NodeHealth, ...]
    stages: dict[str, StageCounters]  # the run's live counters: read, never change
    stage_breakdown: dict[str, float]  # busy seconds per stage
    replicas: ReplicaStats  # the run's replica writes (live, read only)
    links: dict[str, LinkTraffic]  # traffic per link over the cluster's life
    link_rto: dict[str, dict[str, float]]  # the adaptive timeout estimate per link
    node_failures_handled: int
    events: tuple[PipelineEvent, ...]  # the latest, oldest first

    @property
    def healthy_nodes(self) -> int:
        """Nodes in service."""
        return sum(1 for n in self.nodes if n.healthy)

    @property
    def unhealthy_nodes(self) -> int:
        """Nodes out of service."""
        return len(self.nodes) - self.healthy_nodes

    @property
    def stage_bytes(self) -> dict[str, int]:
        """What each stage's progress bar shows: bytes through ingestion and processing,
        committed bytes for distribution and storage (a chunk leaves both at its commit)."""
        return {name: min(c.bytes if name in ("ingestion", "processing")
                          else self.committed_bytes, self.total_bytes or c.bytes)
                for name, c in self.stages.items()}


class LiveView:
    """Progress, health and events of the current (or last) run of one orchestrator."""

    def __init__(self, registry: NodeRegistry, metrics: PipelineMetrics,
                 ledger: TrafficLedger, timeouts: AdaptiveTimeouts) -> None:
        self.registry = registry
        self.metrics = metrics
        self.ledger = ledger
        self.timeouts = timeouts
        self.bus = EventBus()
        self.status = PipelineStatus.IDLE
        self.batch_id: str | None = None
        self.stage: str | None = None
        self.total_bytes = 0
        self.committed_bytes = 0
        self.committed_chunks = 0
        self.node_failures_handled = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, committed bytes)
        self._started: float | None = None
        self._finished: float | None = None
        self._listeners: list[ProgressListener] = []
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    # -- what the orchestrator reports ----------------------------------------------------

    def begin(self, batch_id: str, stage: str) -> None:
        """A run starts."""
        self.bus.clear()
        self.status = PipelineStatus.RUNNING
        self.batch_id = batch_id
        self.stage = stage
        self.total_bytes = self.committed_bytes = self.committed_chunks = 0
        self.node_failures_handled = 0
        self.timeline = []
        self._started = clock.monotonic()
        self._finished = None

    def committed(self, nbytes: int) -> None:
        """A chunk of nbytes committed: tell listeners and wake waiters."""
        self.committed_bytes += nbytes
        self.committed_chunks += 1
        self.timeline.append((self.elapsed_seconds, self.committed_bytes))
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:  # a broken watcher must not fail the batch
                log.exception("progress listener %r failed", listener)
        self._wake_waiters()

    def end(self, status: PipelineStatus) -> None:
        """The run ended (completed or failed); waiters are released either way."""
        self.status = status
        self.stage = None
        self._finished = clock.monotonic()
        self._wake_waiters(force=True)

    def emit(self, kind: str, detail: str, *, level: str = "info", **fields: Any) -> None:
        """Record an event of the current batch (see multicloud.pipeline.events)."""
        self.bus.emit(kind, detail, batch_id=self.batch_id, level=level, **fields)

    # -- what watchers read ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a run is under way."""
        return self.status is PipelineStatus.RUNNING

    @property
    def progress_percent(self) -> float:
        """Share of the batch's bytes committed, 0-100."""
        if self.status is PipelineStatus.COMPLETED:
            return 100.0
        if not self.total_bytes:
            return 0.0
        return round(100.0 * self.committed_bytes / self.total_bytes, 2)

    @property
    def elapsed_seconds(self) -> float:
        """Seconds since the current (or last) run started."""
        if self._started is None:
            return 0.0
        return (self._finished or clock.monotonic()) - self._started

    @property
    def throughput_mb_s(self) -> float:
        """Committed MB per second so far."""
        elapsed = self.elapsed_seconds
        return round(self.committed_bytes / MB / elapsed, 2) if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the current throughput, None before the first commit."""
        if self.status is not PipelineStatus.RUNNING or not self.committed_bytes:
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

    @property
    def events(self) -> list[PipelineEvent]:
        """The latest events of the current (or last) run, oldest first."""
        return list(self.bus.recent)

    def snapshot(self) -> LiveSnapshot:
        """Everything a watcher shows, as of now (cheap: in-memory state only)."""
        return LiveSnapshot(
            status=self.status, batch_id=self.batch_id, stage=self.stage,
            progress_percent=self.progress_percent, total_bytes=self.total_bytes,
            committed_bytes=self.committed_bytes, committed_chunks=self.committed_chunks,
            elapsed_seconds=self.elapsed_seconds, throughput_mb_s=self.throughput_mb_s,
            eta_seconds=self.eta_seconds,
            nodes=tuple(NodeHealth(n.id, n.cloud, n.region, n.healthy)
                        for _, n in sorted(self.registry.nodes.items())),
            stages=self.metrics.stages, stage_breakdown=self.metrics.get_stage_breakdown(),
            replicas=self.metrics.replicas, links=self.ledger.snapshot(),
            link_rto=self.timeouts.snapshot(),
            node_failures_handled=self.node_failures_handled,
            events=tuple(self.bus.recent))

    def add_progress_listener(self, listener: ProgressListener) -> Callable[[], None]:
        """Call listener(view) after every committed chunk; returns a remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def add_event_sink(self, sink: EventSink) -> Callable[[], None]:
        """Call sink(event) for every event; returns a remover."""
        return self.bus.subscribe(sink)

    async def wait_for_progress(self, percent: float) -> None:
        """Return once progress_percent reaches percent (or the run ends)."""
        if self.progress_percent >= percent or self.status in (
                PipelineStatus.COMPLETED, PipelineStatus.FAILED):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((percent, future))
        await future

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
