"""Prometheus metrics and the status endpoint of an orchestrator, built when scraped.

`OrchestratorCollector` reads the orchestrator's live view (one `LiveSnapshot`: stage
counters, replica writes, traffic per link, node health, progress) only when Prometheus
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
counters come from the node client's traffic ledger and only grow.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from multicloud.core.auth import auth_header, auth_middleware
from multicloud.core.errors import ConfigError
from multicloud.core.exposition import metrics_response
from multicloud.core.runfiles import ready_file

if TYPE_CHECKING:
    from multicloud.run.live import LiveSnapshot, LiveView

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


class OrchestratorCollector(Collector):
    """Turns an orchestrator's live view into Prometheus metric families, per scrape.

    The metrics server scrapes on the event loop that runs the pipeline, so it reads
    consistent state; a scrape costs the latency samples added since the last one plus a
    few dozen series, well under a millisecond.
    """

    def __init__(self, live: LiveView) -> None:
        self.live = live
        self._histograms = _Histograms()

    def collect(self) -> Iterator[Metric]:
        """Every multicloud_ series of the orchestrator."""
        snap = self.live.snapshot()
        yield from self._stages(snap)
        yield from self._replicas(snap)
        yield from self._links(snap)
        yield from self._nodes(snap)
        yield from self._pipeline(snap)
        self._histograms.forget_unused()

    def _stages(self, snap: LiveSnapshot) -> Iterator[Metric]:
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
        for stage, counters in snap.stages.items():
            chunks.add_metric([stage, "succeeded"], counters.succeeded)
            chunks.add_metric([stage, "failed"], counters.failed)
            nbytes.add_metric([stage], counters.bytes)
            busy.add_metric([stage], snap.stage_breakdown[stage])
            buckets, total = self._histograms.observe(("stage", stage), counters.latencies)
            latency.add_metric([stage], buckets, total)
        yield from (chunks, nbytes, busy, latency)

    def _replicas(self, snap: LiveSnapshot) -> Iterator[Metric]:
        writes = CounterMetricFamily(
            "multicloud_replica_writes",
            "Replica writes: ok (verified), failed, replaced (re-placed on another node).",
            labels=["outcome"])
        writes.add_metric(["ok"], snap.replicas.writes)
        writes.add_metric(["failed"], snap.replicas.failures)
        writes.add_metric(["replaced"], snap.replicas.replacements)
        yield writes

    def _links(self, snap: LiveSnapshot) -> Iterator[Metric]:
        nbytes = CounterMetricFamily("multicloud_link_bytes", "Bytes moved over a link.",
                                     labels=["link", "cross_cloud"])
        transfers = CounterMetricFamily("multicloud_link_transfers",
                                        "Transfers over a link.", labels=["link"])
        egress = CounterMetricFamily("multicloud_link_egress_usd",
                                     "Egress dollars charged for a link.", labels=["link"])
        for name, link in sorted(snap.links.items()):
            nbytes.add_metric([name, "true" if link.cross_cloud else "false"], link.bytes)
            transfers.add_metric([name], link.transfers)
            egress.add_metric([name], link.egress_usd)
        latency = HistogramMetricFamily("multicloud_link_latency_seconds",
                                        "Seconds one replica write took over a link.",
                                        labels=["link"])
        for name, seconds in sorted(snap.replicas.link_latencies.items()):
            buckets, total = self._histograms.observe(("link", name), seconds)
            latency.add_metric([name], buckets, total)
        rto = GaugeMetricFamily("multicloud_link_rto_seconds_per_mib",
                                "The link's adaptive retransmission timeout, seconds per MiB.",
                                labels=["link"])
        for name, estimate in snap.link_rto.items():
            rto.add_metric([name], estimate["rto_s_per_mib"])
        yield from (nbytes, transfers, egress, latency, rto)

    def _nodes(self, snap: LiveSnapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily("multicloud_node_up", "Whether a node is in service (1) or not.",
                               labels=["node", "cloud", "region"])
        for node in snap.nodes:
            up.add_metric([node.id, node.cloud, node.region], 1 if node.healthy else 0)
        yield up

    def _pipeline(self, snap: LiveSnapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily("multicloud_pipeline_progress_ratio",
                                "Share of the batch's bytes committed, 0-1.",
                                value=snap.progress_percent / 100)
        yield GaugeMetricFamily("multicloud_pipeline_throughput_mb_s",
                                "Committed MB (10^6 bytes) per second of the current run.",
                                value=snap.throughput_mb_s)
        info = GaugeMetricFamily("multicloud_pipeline_info",
                                 "The current (or last) batch, status and stage; always 1.",
                                 labels=["batch_id", "status", "stage"])
        info.add_metric([snap.batch_id or "", snap.status.value, snap.stage or ""], 1)
        yield info
        yield CounterMetricFamily("multicloud_node_failures_handled",
                                  "Nodes that failed during the run and were worked around.",
                                  value=snap.node_failures_handled)


def status_snapshot(snap: LiveSnapshot, events: int = STATUS_EVENTS) -> dict[str, Any]:
    """A live snapshot as a JSON-ready dict (the `/status` reply).

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
    by_cloud: dict[str, dict[str, int]] = {}
    unhealthy: list[str] = []
    for node in snap.nodes:
        counts = by_cloud.setdefault(node.cloud, {"healthy": 0, "unhealthy": 0})
        counts["healthy" if node.healthy else "unhealthy"] += 1
        if not node.healthy:
            unhealthy.append(node.id)
    stages = {
        name: {"attempted": c.attempted, "succeeded": c.succeeded, "failed": c.failed,
               "bytes": c.bytes, "busy_seconds": round(snap.stage_breakdown[name], 6)}
        for name, c in snap.stages.items()
    }
    recent = snap.events[-events:] if events > 0 else ()
    eta = snap.eta_seconds
    return {
        "status": snap.status.value,
        "batch_id": snap.batch_id,
        "stage": snap.stage,
        "progress_percent": snap.progress_percent,
        "committed_bytes": snap.committed_bytes,
        "total_bytes": snap.total_bytes,
        "committed_chunks": snap.committed_chunks,
        "healthy_nodes": len(snap.nodes) - len(unhealthy),
        "unhealthy_nodes": len(unhealthy),
        "nodes_by_cloud": by_cloud,
        "unhealthy_node_ids": unhealthy,
        "throughput_mb_s": snap.throughput_mb_s,
        "elapsed_seconds": round(snap.elapsed_seconds, 3),
        "eta_seconds": None if eta is None else round(eta, 3),
        "stages": stages,
        "stage_bytes": snap.stage_bytes,
        "node_failures_handled": snap.node_failures_handled,
        "events": [{"at": e.at, "kind": e.kind, "level": e.level, "detail": e.detail}
                   for e in recent],
    }


class MetricsServer:
    """Serves an orchestrator's `GET /metrics` (Prometheus) and `GET /status` (JSON).

    Binds loopback by default. With a token, both endpoints want `Bearer <token>`, as
    the cluster's servers do; bind another host only with one.
    """

    def __init__(self, live: LiveView, host: str = "127.0.0.1",
                 port: int = 0, *, token: str | None = None) -> None:
        self.live = live
        self.host = host
        self.port = port
        self.token = token
        self.registry = CollectorRegistry()
        self.registry.register(OrchestratorCollector(live))
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
        return web.json_response(status_snapshot(self.live.snapshot()))


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
