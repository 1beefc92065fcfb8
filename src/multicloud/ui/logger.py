"""Structured logs of a run: one JSON object per line (structlog), for operators and tools.

A `PipelineLogger` writes to `logs/pipeline.log` by default (relative to the working
directory). Attach it to an orchestrator and it logs every pipeline event; nothing is
logged per chunk unless a chunk fails, so the cost of a run's log is a few small writes.

Every line has `ts` (ISO 8601, UTC), `level` ("info", "warning" or "error"), `event`,
`batch_id` (null outside a run) and `detail` (one human-readable line), followed by the
event's own fields at the top level (a field whose name clashes with one of these five
gets a trailing underscore, e.g. `event_`). The event catalogue and each event's fields
are in `multicloud.pipeline.events` (and `LOG_EVENTS` below); `stage_complete` carries
the stage's `PipelineMetrics` summary.

A file name that is not UTF-8 is written escaped (b"bad\\xff" as "bad\\\\xff", see
`multicloud.core.units.display_path`), so every line is valid UTF-8 JSON that any tool
reads; the manifest keeps the exact bytes.

An example line::

    {"ts":"2025-01-01T12:00:00.123456Z","level":"warning","event":"node_unhealthy",
     "batch_id":"b1","detail":"aws-node-2 (aws/us-east-1): set by operator",
     "node_id":"aws-node-2","cloud":"aws","region":"us-east-1","reason":"set by operator"}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from multicloud.core.errors import storage_error
from multicloud.core.units import display_path, is_utf8
from multicloud.pipeline.events import PipelineEvent

if TYPE_CHECKING:
    from multicloud.run.orchestrator import PipelineOrchestrator

log = logging.getLogger(__name__)

DEFAULT_LOG_FILE = "logs/pipeline.log"

# The keys every line starts with, in this order.
COMMON_FIELDS = ("ts", "level", "event", "batch_id", "detail")

# Event kind -> the fields its lines carry besides COMMON_FIELDS (the documented catalogue).
LOG_EVENTS: dict[str, tuple[str, ...]] = {
    "pipeline_started": ("source", "source_cloud", "files", "total_bytes", "resumed_chunks"),
    "files_skipped": ("skipped",),
    "stage_complete": ("stage", "metrics"),
    "records_invalid": ("file", "line", "reason", "line_in_file", "index", "chunk_id"),
    "chunk_failed": ("file", "index", "chunk_id", "stage", "error"),
    "node_unhealthy": ("node_id", "cloud", "region", "reason"),
    "node_recovered": ("node_id", "reason"),
    "replica_replaced": ("chunk_id", "failed_node", "replacement", "reason"),
    "under_replicated": ("count", "chunk_ids", "replication_factor"),
    "repair_done": ("replicas_created", "under_replicated", "lost"),
    "pipeline_finished": ("status", "duration_seconds", "chunks", "bytes", "error"),
    "pipeline_interrupted": ("status",),
}

_LEVELS = {"debug", "info", "warning", "error", "critical"}
_RESERVED = frozenset(COMMON_FIELDS)


def _serialize(event_dict: Any, **_: Any) -> bytes:
    """orjson, with str() for anything it cannot encode, so a log line is never lost."""
    try:
        return orjson.dumps(event_dict, default=_text, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # e.g. an int beyond 64 bits
        return json.dumps(event_dict, default=_text, separators=(",", ":")).encode()


def _text(value: Any) -> str:
    """str(value), escaped when it is not UTF-8 (a Path of a non-UTF-8 name, say)."""
    text = str(value)
    return text if is_utf8(text) else display_path(text)


def _utf8(value: Any) -> Any:
    """value with every str that is not UTF-8 (a surrogate-escaped name) escaped for show.

    orjson refuses such a str, and json would write lone \\udcXX escapes that strict
    parsers reject; other strings are left exactly as they are.
    """
    if isinstance(value, str):
        return value if is_utf8(value) else display_path(value)
    if isinstance(value, dict):
        return {_utf8(k): _utf8(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_utf8(v) for v in value]
    return value


def _escape_names(logger: WrappedLogger, method_name: str,
                  event_dict: EventDict) -> EventDict:
    """The structlog processor for `_utf8`."""
    return {_utf8(key): _utf8(value) for key, value in event_dict.items()}


def _order(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Put the common keys first, so the lines read well in a terminal."""
    head = {key: event_dict.pop(key, None) for key in COMMON_FIELDS}
    head.update(event_dict)
    return head


class PipelineLogger:
    """Writes pipeline events as JSON lines to a file, through a private structlog logger.

    structlog is not configured globally: the processors, wrapper class and output are
    this logger's own, so other users of structlog in the process are unaffected.
    """

    def __init__(self, path: str | Path = DEFAULT_LOG_FILE) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Binary append; BytesLogger flushes after every line, so a crash loses nothing
            # already logged and a `tail -f` sees each event as it happens.
            self._file: IO[bytes] = self.path.open("ab")
        except OSError as exc:
            raise storage_error(exc, f"cannot open the event log {self.path}") from exc
        self._log: Any = structlog.wrap_logger(
            structlog.BytesLogger(self._file),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                _order,
                _escape_names,
                structlog.processors.JSONRenderer(serializer=_serialize),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            context_class=dict,
            cache_logger_on_first_use=True,
        )
        self._batch_id: str | None = None
        self._detachers: list[Callable[[], None]] = []

    def sink(self, event: PipelineEvent) -> None:
        """Write one line for a pipeline event (an `EventSink`)."""
        if event.batch_id is not None:
            self._batch_id = event.batch_id
        self._write(event.level, event.kind, event.batch_id, event.detail, event.fields)

    def log_stage_complete(self, stage: str, metrics: dict[str, Any],
                           batch_id: str | None = None) -> None:
        """Log that a stage finished, with its metrics.

        For code that runs stages itself: an attached logger already logs the
        orchestrator's own `stage_complete` events. Without batch_id, the batch of the
        last event seen is used.
        """
        self._write("info", "stage_complete", batch_id or self._batch_id,
                    f"{stage} complete", {"stage": stage, "metrics": metrics})

    def attach(self, orchestrator: PipelineOrchestrator) -> Callable[[], None]:
        """Log every event of orchestrator from now on; returns a function that detaches."""
        detach = orchestrator.add_event_sink(self.sink)
        self._detachers.append(detach)
        return detach

    def close(self) -> None:
        """Detach from every orchestrator and close the file; safe to call twice."""
        for detach in self._detachers:
            detach()
        self._detachers.clear()
        self._file.close()

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._file.closed

    def __enter__(self) -> PipelineLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _write(self, level: str, kind: str, batch_id: str | None, detail: str,
               fields: dict[str, Any]) -> None:
        if self._file.closed:
            log.debug("pipeline log %s is closed; dropped %s", self.path, kind)
            return
        method = level if level in _LEVELS else "info"
        extra = {f"{k}_" if k in _RESERVED else k: v for k, v in fields.items()}
        getattr(self._log, method)(kind, batch_id=batch_id, detail=detail, **extra)
