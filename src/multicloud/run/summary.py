"""The metrics of a finished run: what `PipelineResult.metrics` holds, built in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multicloud.core.network import LinkTraffic
from multicloud.core.types import Stage
from multicloud.pipeline.events import PipelineEvent
from multicloud.pipeline.ingestion import IngestionStats
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.repair import RepairReport

MB = 1_000_000
TIMELINE_POINTS = 200


@dataclass
class RunFacts:
    """What the orchestrator measured of one run, beside the stages' own metrics."""

    duration_s: float
    ingestion: IngestionStats
    traffic: dict[str, LinkTraffic]  # what this run added, per link
    timeouts: dict[str, dict[str, float]]
    by_cloud: dict[str, Any]
    by_node: dict[str, Any]
    under_replicated: int
    repair: RepairReport | None
    replicas_repaired_early: int
    node_failures_handled: int
    events: list[PipelineEvent]
    timeline: list[tuple[float, int]]


def run_summary(metrics: PipelineMetrics, facts: RunFacts) -> dict[str, Any]:
    """The JSON-ready metrics of a successful run: per stage, then run-wide."""
    for stage in (Stage.PROCESSING, Stage.DISTRIBUTION, Stage.STORAGE):
        metrics.record_stage(stage, metrics.stages[stage.value].succeeded)
    traffic = facts.traffic
    cross = [t for t in traffic.values() if t.cross_cloud]
    replicas = metrics.replicas
    stats = facts.ingestion
    repair = facts.repair
    summary = metrics.get_summary()
    summary["ingestion"].update(files=stats.files, chunks=stats.chunks, bytes=stats.bytes)
    summary["distribution"].update(
        replica_success_rate=replicas.success_rate, replica_writes=replicas.writes,
        replica_failures=replicas.failures, replacements=replicas.replacements,
        cross_cloud_transfers=sum(t.transfers for t in cross),
        cross_cloud_bytes=sum(t.bytes for t in cross),
        bytes_by_link={name: t.bytes for name, t in sorted(traffic.items())},
        egress_cost_usd=round(sum(t.egress_usd for t in traffic.values()), 6),
        emulated_network_seconds=round(sum(t.emulated_seconds for t in traffic.values()), 3),
        timeouts=facts.timeouts,
    )
    summary["storage"].update(
        by_cloud=facts.by_cloud, by_node=facts.by_node,
        under_replicated=facts.under_replicated,
        replicas_repaired=(repair.replicas_created if repair else 0)
        + facts.replicas_repaired_early,
        chunks_lost=repair.lost if repair else 0,
    )
    duration = facts.duration_s
    summary["node_failures_handled"] = facts.node_failures_handled
    summary["duration_seconds"] = round(duration, 6)
    summary["throughput_mb_s"] = round(stats.bytes / MB / duration, 3) if duration else 0.0
    summary["events"] = [{"at": e.at, "kind": e.kind, "detail": e.detail}
                         for e in facts.events]
    summary["timeline"] = downsample(facts.timeline, TIMELINE_POINTS)
    return summary


def downsample(points: list[tuple[float, int]], most: int) -> list[list[float]]:
    """At most `most` evenly spaced points (always keeping the last), as JSON-ready pairs."""
    if len(points) <= most:
        return [[round(t, 4), b] for t, b in points]
    step = len(points) / most
    picked = [points[int(i * step)] for i in range(most - 1)] + [points[-1]]
    return [[round(t, 4), b] for t, b in picked]
