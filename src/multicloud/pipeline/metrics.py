"""Per-run pipeline metrics: counts, success rates, latencies and busy time per stage.

The stages overlap (chunks stream through all four at once), so a stage's time is its
busy time: the wall-clock time during which at least one chunk was in it. That is what
the profiler compares to find the bottleneck.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from multicloud.core import clock
from multicloud.core.types import Stage

STAGES = [s.value for s in Stage]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class StageCounters:
    """Counts and timing for one stage."""

    attempted: int = 0
    succeeded: int = 0
    failed: int = 0
    bytes: int = 0
    recorded: int = 0  # what record_stage() set: items the stage handed on
    latencies: list[float] = field(default_factory=list)
    busy_seconds: float = 0.0
    active: int = 0
    busy_since: float = 0.0

    @property
    def success_rate(self) -> float:
        """Succeeded over attempted; 1.0 when nothing was attempted."""
        return self.succeeded / self.attempted if self.attempted else 1.0


@dataclass
class ReplicaStats:
    """Replica writes of one run, by outcome, and how long they took per link."""

    writes: int = 0  # verified and durable
    failures: int = 0
    replacements: int = 0  # a failed target's write moved to another node
    link_latencies: dict[str, list[float]] = field(default_factory=dict)  # seconds, by link

    @property
    def success_rate(self) -> float:
        """Verified replica writes over all write attempts."""
        total = self.writes + self.failures
        return self.writes / total if total else 1.0


@dataclass(frozen=True, slots=True)
class QuarantinedRecord:
    """A record that does not parse, in a chunk stored as it is (on_invalid_records: quarantine)."""

    file: str
    chunk: int  # index of the chunk within the file
    line: int  # 1-based: in the file, or in the chunk when in_file is False
    reason: str  # e.g. "not valid JSON: unexpected end of data at column 29"
    in_file: bool = True  # False when the file's line could not be counted

    @property
    def where(self) -> str:
        """The line, as a person reads it: "line 1234" or "line 12 of chunk 3"."""
        return f"line {self.line}" if self.in_file else f"line {self.line} of chunk {self.chunk}"

    def to_json(self) -> dict[str, Any]:
        """The summary's view: file, line and reason (and chunk, when line is the chunk's)."""
        view: dict[str, Any] = {"file": self.file, "line": self.line, "reason": self.reason}
        if not self.in_file:
            view["chunk"] = self.chunk
        return view


class PipelineMetrics:
    """Counters and timers for one pipeline run, summarised as a plain dict."""

    def __init__(self) -> None:
        self.stages: dict[str, StageCounters] = {}
        self.replicas = ReplicaStats()
        # (file, chunk index) -> the chunk's first invalid record, for the chunks stored
        # although their records do not parse.
        self.invalid_chunks: dict[tuple[str, int], QuarantinedRecord] = {}
        self.started = 0.0
        self.reset()

    def reset(self) -> None:
        """Start counting a new run (the stages keep this object; its contents are new)."""
        self.stages = {s: StageCounters() for s in STAGES}
        self.replicas = ReplicaStats()
        self.invalid_chunks = {}
        self.started = clock.monotonic()

    def quarantine(self, record: QuarantinedRecord) -> bool:
        """Note a chunk stored with an invalid record; False if it was noted already (a chunk
        processed again, on another node, after its first node failed)."""
        key = (record.file, record.chunk)
        if key in self.invalid_chunks:
            return False
        self.invalid_chunks[key] = record
        return True

    def quarantined_files(self) -> dict[str, QuarantinedRecord]:
        """File -> its first invalid record (chunks finish out of order: the lowest wins)."""
        first: dict[str, QuarantinedRecord] = {}
        for record in sorted(self.invalid_chunks.values(), key=lambda r: (r.chunk, r.line)):
            first.setdefault(record.file, record)
        return first

    def record_stage(self, stage: str, count: int) -> None:
        """Note how many items a stage handed on (a count users can set themselves)."""
        self.stages[stage].recorded = count

    def attempt(self, stage: str) -> None:
        """One item entered a stage."""
        self.stages[stage].attempted += 1

    def success(self, stage: str, nbytes: int = 0, latency_s: float | None = None) -> None:
        """One item left a stage successfully."""
        counters = self.stages[stage]
        counters.succeeded += 1
        counters.bytes += nbytes
        if latency_s is not None:
            counters.latencies.append(latency_s)

    def failure(self, stage: str) -> None:
        """One attempt in a stage failed."""
        self.stages[stage].failed += 1

    @contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        """Count the enclosed time as busy time of stage (overlaps merge)."""
        counters = self.stages[stage]
        if counters.active == 0:
            counters.busy_since = clock.monotonic()
        counters.active += 1
        try:
            yield
        finally:
            counters.active -= 1
            if counters.active == 0:
                counters.busy_seconds += clock.monotonic() - counters.busy_since

    def get_stage_breakdown(self) -> dict[str, float]:
        """Stage -> busy seconds so far."""
        now = clock.monotonic()
        return {
            name: c.busy_seconds + (now - c.busy_since if c.active else 0.0)
            for name, c in self.stages.items()
        }

    def get_summary(self) -> dict[str, Any]:
        """Everything as a JSON-ready dict: one entry per stage plus run-wide figures."""
        breakdown = self.get_stage_breakdown()
        summary: dict[str, Any] = {}
        for name, c in self.stages.items():
            entry: dict[str, Any] = {
                "attempted": c.attempted,
                "succeeded": c.succeeded,
                "failed": c.failed,
                "success_rate": c.success_rate,
                "bytes": c.bytes,
                "busy_seconds": round(breakdown[name], 6),
                "count": c.recorded or c.succeeded,
            }
            if c.latencies:
                entry["latency_p50_s"] = percentile(c.latencies, 50)
                entry["latency_p95_s"] = percentile(c.latencies, 95)
                entry["latency_p99_s"] = percentile(c.latencies, 99)
            summary[name] = entry
        summary["processing"]["quarantined_files"] = [
            record.to_json() for _, record in sorted(self.quarantined_files().items())]
        summary["stage_breakdown_s"] = {k: round(v, 6) for k, v in breakdown.items()}
        return summary
