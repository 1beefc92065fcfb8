"""Pipeline events: what happened during a run, for the dashboard, the logs and tests.

The orchestrator emits events on one bus; sinks (the JSON logger, the dashboard) subscribe.
A sink that fails is logged and dropped from nothing else: an event never stops a run.

Catalogue (every event also has `ts`, `level`, `event` and `batch_id` in the logs):

- `pipeline_started`: source, source_cloud, files, total_bytes, resumed_chunks
- `files_skipped`: skipped (each: file, kind, reason; FIFOs, sockets, devices, broken links)
- `stage_complete`: stage, metrics (that stage's summary)
- `records_invalid`: file, line, reason, line_in_file, index, chunk_id (the file is stored
  anyway and listed as quarantined, unless `processing.on_invalid_records` is `fail`)
- `chunk_failed`: file, index, chunk_id, stage, error
- `node_unhealthy`: node_id, cloud, region, reason
- `node_recovered`: node_id, reason
- `replica_replaced`: chunk_id, failed_node, replacement, reason
- `under_replicated`: count, chunk_ids, replication_factor (committed at quorum but short
  of the replication factor; hinted, repaired when a node comes back or joins)
- `repair_done`: replicas_created, under_replicated, lost
- `pipeline_finished`: status, duration_seconds, chunks, bytes, error
- `pipeline_interrupted`: status (Ctrl-C or SIGTERM: the batch resumes on the next run)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from multicloud.core import clock
from multicloud.core.units import display_path, is_utf8

log = logging.getLogger(__name__)

EVENT_KINDS = ("pipeline_started", "files_skipped", "stage_complete", "records_invalid",
               "chunk_failed", "node_unhealthy", "node_recovered", "replica_replaced",
               "under_replicated", "repair_done", "pipeline_finished", "pipeline_interrupted")


@dataclass(frozen=True, slots=True)
class PipelineEvent:
    """Something worth showing an operator: a node failure, a repair, a finished stage."""

    at: float  # clock.wall()
    kind: str  # one of EVENT_KINDS
    detail: str  # one human-readable line
    batch_id: str | None = None
    level: str = "info"  # "info", "warning" or "error"
    fields: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[PipelineEvent], None]


class Emit(Protocol):
    """How a stage reports an event to the orchestrator's bus."""

    def __call__(self, kind: str, detail: str, *, level: str = "info",
                 **fields: Any) -> None: ...


def no_events(kind: str, detail: str, *, level: str = "info", **fields: Any) -> None:
    """The Emit of a stage used on its own: events go to the debug log only."""
    log.debug("%s: %s", kind, detail if is_utf8(detail) else display_path(detail))


class EventBus:
    """Fans events out to sinks and keeps the latest ones for a live view."""

    def __init__(self, keep: int = 200) -> None:
        self.recent: deque[PipelineEvent] = deque(maxlen=keep)
        self._sinks: list[EventSink] = []

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Call sink(event) for every event from now on; returns an unsubscribe function."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink) if sink in self._sinks else None

    def emit(self, kind: str, detail: str, *, batch_id: str | None = None,
             level: str = "info", **fields: Any) -> PipelineEvent:
        """Record an event and hand it to every sink."""
        event = PipelineEvent(clock.wall(), kind, detail, batch_id, level, fields)
        self.recent.append(event)
        # The detail may name a file whose bytes are not UTF-8: a handler writing strict
        # UTF-8 (a log file) would fail on it, so the log gets the escaped form.
        log.log(logging.WARNING if level == "warning" else
                logging.ERROR if level == "error" else logging.INFO, "%s: %s", kind,
                detail if is_utf8(detail) else display_path(detail))
        for sink in list(self._sinks):
            try:
                sink(event)
            except Exception:  # a broken sink must not break the run
                log.exception("event sink %r failed on %s", sink, kind)
        return event

    def clear(self) -> None:
        """Forget the kept events (a new run starts)."""
        self.recent.clear()
