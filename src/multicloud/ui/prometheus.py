"""Prometheus metrics and the status endpoint of an orchestrator, built when scraped.

`OrchestratorCollector` reads the orchestrator's live state (its `PipelineMetrics`, the
distribution coordinator, the traffic ledger, the node registry) only when Prometheus
scrapes, so the data path pays nothing for being watched. `MetricsServer` serves it on
`GET /metrics` and a JSON snapshot for `multicloud status` on `GET /status`.

Series (all names start with `multicloud_`):

    stage_chunks_total{stage,outcome}        counter   outcome: succeeded | failed
    stage_bytes_total{stage}                 counter   bytes that left the stage
    stage_busy_seconds{stage}                gauge     wall time with >= 1 chunk in the stage
    stage_latency_seconds{stage}             histogram per chunk (stages that time chunks)
    replica_writes_total{outcome}            counter   outcome: ok | failed | replaced
    link_bytes_total{link,cross_cloud}       counter   cumulative over the cluster's life
    link_transfers_total{link}               counter
    link_egress_usd_total{link}              counter
    link_latency_seconds{link}               histogram per replica write
    link_rto_seconds_per_mib{link}           gauge     the adaptive timeout estimate
    node_up{node,cloud,region}               gauge     1 healthy, 0 not
    pipeline_progress_ratio                  gauge     0-1 of the batch's bytes committed
    pipeline_throughput_mb_s                 gauge
    pipeline_info{batch_id,status,stage}     gauge     always 1
    node_failures_handled_total              counter

Stage, replica and failure counters belong to the current run and start again from zero
when the next run starts (Prometheus' rate() treats that as a counter reset); link
counters come from the transport's ledger and only grow.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from multicloud.core.auth import auth_header, auth_middleware
from multicloud.core.errors import ConfigError
from multicloud.core.runfiles import ready_file

if TYPE_CHECKING:
    from multicloud.run.orchestrator import PipelineOrchestrator

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the latency histograms: a local 64 KiB read to a slow
# cross-cloud write of a large chunk.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_EVENTS = 20  # events in a /status reply


def histogram_buckets(values: Sequence[float],
                      bounds: Sequence[float] = LATENCY_BUCKETS) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs for values, ending with "+Inf", as Prometheus wants."""
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    return _cumulative(counts, bounds)


def _cumulative(counts: list[int], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one above every bound) as cumulative (le, count) pairs."""
    running = 0
    buckets = []
    for le, count in zip([*(repr(float(b)) for b in bounds), "+Inf"], counts, strict=True):
        running += count
        buckets.append((le, float(running)))
    return buckets


@dataclass
class _Tally:
    """Bucket counts of one latency list, as far as it was read."""

    values: list[float]  # the list itself: a new run brings a new list
    read: int
    counts: list[int]
    total: float


class _Histograms:
    """Histograms of growing latency lists; each scrape reads only the values added since.

    The pipeline appends to its latency lists and starts new ones each run, so a scrape
    costs the new samples, not the whole run: a long run is not stalled by its scrapes.
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._used: set[tuple[str, str]] = set()

    def observe(self, key: tuple[str, str], values: list[float],
                ) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets, sum) of values, which may have grown since the last call."""
        tally = self._tallies.get(key)
        if tally is None or tally.values is not values or tally.read > len(values):
            tally = self._tallies[key] = _Tally(values, 0, [0] * (len(self.bounds) + 1), 0.0)
        new = values[tally.read:]
        for v in new:
            tally.counts[bisect.bisect_left(self.bounds, v)] += 1
        tally.read += len(new)
        tally.total += sum(new)
        self._used.add(key)
        return _cumulative(tally.counts, self.bounds), tally.total

    def forget_unused(self) -> None:
        """Drop the lists not asked for since the last call (a finished run's links)."""
        self._tallies = {k: t for k, t in self._tallies.items() if k in self._used}
        self._used = set()


class CallbackCollector(Collector):
    """A prometheus_client collector that calls a function at scrape time.

    For servers whose few metrics are easiest to write as one function (a node, the
    registry): register it on a private `CollectorRegistry`.
    """

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        """The metrics, as of now."""
        return self._collect()


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """A `/metrics` reply: registry rendered in the Prometheus text format 0.0.4."""
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
                                 "X-Content-Type-Options": "nosniff"})


class OrchestratorCollector(Collector):
    """Turns an orchestrator's live state into Prometheus metric families, per scrape.

    The metrics server scrapes on the event loop that runs the pipeline, so it reads
    consistent state; a scrape costs the latency samples added since the last one plus a
    few dozen series, well under a millisecond.
    """

    def __init__(self, orchestrator: PipelineOrchestrator) -> None:
        self.orchestrator = orchestrator
        self._histograms = _Histograms()

    def collect(self) -> Iterator[Metric]:
        """Every multicloud_ series of the orchestrator."""
        yield from self._stages()
        yield from self._replicas()
        yield from self._links()
        yield from self._nodes()
        yield from self._pipeline()
        self._histograms.forget_unused()

    def _stages(self) -> Iterator[Metric]:
        metrics = self.orchestrator.metrics  # replaced by every run: read it each scrape
        chunks = CounterMetricFamily("multicloud_stage_chunks",
                                     "Chunks that left a stage, by outcome.",
                                     labels=["stage", "outcome"])
        nbytes = CounterMetricFamily("multicloud_stage_bytes",
                                     "Bytes of the chunks that left a stage successfully.",
                                     labels=["stage"])
        busy = GaugeMetricFamily("multicloud_stage_busy_seconds",
                                 "Wall-clock seconds with at least one chunk in the stage.",
                                 labels=["stage"])
        latency = HistogramMetricFamily("multicloud_stage_latency_seconds",
                                        "Seconds one chunk spent in the stage.",
                                        labels=["stage"])
        breakdown = metrics.get_stage_breakdown()
        for stage, counters in metrics.stages.items():
            chunks.add_metric([stage, "succeeded"], counters.succeeded)
            chunks.add_metric([stage, "failed"], counters.failed)
            nbytes.add_metric([stage], counters.bytes)
            busy.add_metric([stage], breakdown[stage])
            buckets, total = self._histograms.observe(("stage", stage), counters.latencies)
            latency.add_metric([stage], buckets, total)
        yield from (chunks, nbytes, busy, latency)

    def _replicas(self) -> Iterator[Metric]:
        dist = self.orchestrator.distribution_coordinator
        writes = CounterMetricFamily(
            "multicloud_replica_writes",
            "Replica writes: ok (verified), failed, replaced (re-placed on another node).",
            labels=["outcome"])
        writes.add_metric(["ok"], dist.replica_writes)
        writes.add_metric(["failed"], dist.replica_failures)
        writes.add_metric(["replaced"], dist.replacements)
        yield writes

    def _links(self) -> Iterator[Metric]:
        dist = self.orchestrator.distribution_coordinator
        traffic = self.orchestrator.node_registry.transport.ledger.snapshot()
        nbytes = CounterMetricFamily("multicloud_link_bytes", "Bytes moved over a link.",
                                     labels=["link", "cross_cloud"])
        transfers = CounterMetricFamily("multicloud_link_transfers",
                                        "Transfers over a link.", labels=["link"])
        egress = CounterMetricFamily("multicloud_link_egress_usd",
                                     "Egress dollars charged for a link.", labels=["link"])
        for name, link in sorted(traffic.items()):
            nbytes.add_metric([name, "true" if link.cross_cloud else "false"], link.bytes)
            transfers.add_metric([name], link.transfers)
            egress.add_metric([name], link.egress_usd)
        latency = HistogramMetricFamily("multicloud_link_latency_seconds",
                                        "Seconds one replica write took over a link.",
                                        labels=["link"])
        for name, seconds in sorted(dist.link_latencies.items()):
            buckets, total = self._histograms.observe(("link", name), seconds)
            latency.add_metric([name], buckets, total)
        rto = GaugeMetricFamily("multicloud_link_rto_seconds_per_mib",
                                "The link's adaptive retransmission timeout, seconds per MiB.",
                                labels=["link"])
        for name, estimate in dist.timeouts.snapshot().items():
            rto.add_metric([name], estimate["rto_s_per_mib"])
        yield from (nbytes, transfers, egress, latency, rto)

    def _nodes(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("multicloud_node_up", "Whether a node is in service (1) or not.",
                               labels=["node", "cloud", "region"])
        for node_id, node in sorted(self.orchestrator.node_registry.nodes.items()):
            up.add_metric([node_id, node.cloud, node.region], 1 if node.healthy else 0)
        yield up

    def _pipeline(self) -> Iterator[Metric]:
        orch = self.orchestrator
        yield GaugeMetricFamily("multicloud_pipeline_progress_ratio",
                                "Share of the batch's bytes committed, 0-1.",
                                value=orch.progress_percent / 100)
        yield GaugeMetricFamily("multicloud_pipeline_throughput_mb_s",
                                "Committed MB (10^6 bytes) per second of the current run.",
                                value=orch.current_throughput)
        info = GaugeMetricFamily("multicloud_pipeline_info",
                                 "The current (or last) batch, status and stage; always 1.",
                                 labels=["batch_id", "status", "stage"])
        info.add_metric([orch.current_batch or "", orch.pipeline_status.value,
                         orch.current_stage or ""], 1)
        yield info
        yield CounterMetricFamily("multicloud_node_failures_handled",
                                  "Nodes that failed during the run and were worked around.",
                                  value=orch.node_failures_handled)


def status_snapshot(orchestrator: PipelineOrchestrator,
                    events: int = STATUS_EVENTS) -> dict[str, Any]:
    """The orchestrator's live view as a JSON-ready dict (the `/status` reply).

    Shape::

        {"status": "idle" | "running" | "completed" | "failed",
         "batch_id": str | null, "stage": str | null,
         "progress_percent": float,                  # 0-100 of the batch's bytes
         "committed_bytes": int, "total_bytes": int, "committed_chunks": int,
         "healthy_nodes": int, "unhealthy_nodes": int,
         "nodes_by_cloud": {cloud: {"healthy": int, "unhealthy": int}},
         "unhealthy_node_ids": [str],
         "throughput_mb_s": float, "elapsed_seconds": float,
         "eta_seconds": float | null,                # null before the first commit
         "stages": {stage: {"attempted": int, "succeeded": int, "failed": int,
                            "bytes": int, "busy_seconds": float}},
         "stage_bytes": {stage: int},                # what each stage's bar shows
         "node_failures_handled": int,
         "events": [{"at": float, "kind": str, "level": str, "detail": str}]}  # oldest first

    The dashboard renders the same dict, so a local run and `multicloud status` against
    a remote one look alike.
    """
    orch = orchestrator
    by_cloud: dict[str, dict[str, int]] = {}
    unhealthy: list[str] = []
    for node_id, node in sorted(orch.node_registry.nodes.items()):
        counts = by_cloud.setdefault(node.cloud, {"healthy": 0, "unhealthy": 0})
        counts["healthy" if node.healthy else "unhealthy"] += 1
        if not node.healthy:
            unhealthy.append(node_id)
    breakdown = orch.metrics.get_stage_breakdown()
    stages = {
        name: {"attempted": c.attempted, "succeeded": c.succeeded, "failed": c.failed,
               "bytes": c.bytes, "busy_seconds": round(breakdown[name], 6)}
        for name, c in orch.metrics.stages.items()
    }
    eta = orch.eta_seconds
    recent = orch.events[-events:] if events > 0 else []
    return {
        "status": orch.pipeline_status.value,
        "batch_id": orch.current_batch,
        "stage": orch.current_stage,
        "progress_percent": orch.progress_percent,
        "committed_bytes": orch.committed_bytes,
        "total_bytes": orch.total_bytes,
        "committed_chunks": orch.committed_chunks,
        "healthy_nodes": len(orch.node_registry.nodes) - len(unhealthy),
        "unhealthy_nodes": len(unhealthy),
        "nodes_by_cloud": by_cloud,
        "unhealthy_node_ids": unhealthy,
        "throughput_mb_s": orch.current_throughput,
        "elapsed_seconds": round(orch.elapsed_seconds, 3),
        "eta_seconds": None if eta is None else round(eta, 3),
        "stages": stages,
        # What the dashboard's per-stage bars show: bytes through the first two stages,
        # committed bytes for the last two (a chunk is distributed and stored together).
        "stage_bytes": {name: min(c.bytes if name in ("ingestion", "processing")
                                  else orch.committed_bytes, orch.total_bytes or c.bytes)
                        for name, c in orch.metrics.stages.items()},
        "node_failures_handled": orch.node_failures_handled,
        "events": [{"at": e.at, "kind": e.kind, "level": e.level, "detail": e.detail}
                   for e in recent],
    }


class MetricsServer:
    """Serves an orchestrator's `GET /metrics` (Prometheus) and `GET /status` (JSON).

    Binds loopback by default. With a token, both endpoints want `Bearer <token>`, as
    the cluster's servers do; bind another host only with one.
    """

    def __init__(self, orchestrator: PipelineOrchestrator, host: str = "127.0.0.1",
                 port: int = 0, *, token: str | None = None) -> None:
        self.orchestrator = orchestrator
        self.host = host
        self.port = port
        self.token = token
        self.registry = CollectorRegistry()
        self.registry.register(OrchestratorCollector(orchestrator))
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. "http://127.0.0.1:9464"."""
        if self._url is None:
            raise RuntimeError("MetricsServer.start() has not been called")
        return self._url

    async def start(self) -> str:
        """Listen (port 0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("MetricsServer is already started")
        middlewares = [auth_middleware(self.token)] if self.token else []
        app = web.Application(middlewares=middlewares)
        app.add_routes([web.get("/metrics", self._metrics), web.get("/status", self._status)])
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"metrics server cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}; pick another --metrics-port, or 0 for "
                              f"any free port") from exc
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._url = f"http://{host}:{port}"
        log.info("metrics on %s/metrics, status on %s/status", self._url, self._url)
        return self._url

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self.registry)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(status_snapshot(self.orchestrator))



async def fetch_status(data_dir: str | Path, token: str | None = None) -> dict[str, Any]:
    """The running orchestrator's /status (found by its ready file), or {} when none runs."""
    path = ready_file(data_dir, "orchestrator")
    try:
        url = json.loads(await asyncio.to_thread(path.read_text))["url"]
    except (OSError, ValueError, KeyError):
        return {}
    headers = auth_header(token) if token else {}
    try:
        async with aiohttp.ClientSession(headers=headers) as session, \
                session.get(f"{url}/status", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return {}
            body: dict[str, Any] = await resp.json()
            return body
    except (aiohttp.ClientError, TimeoutError):
        return {}  # the run ended (or crashed) after writing its ready file
