"""Prometheus metrics and /status: a scrape parses, and its counters are the run's result."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from multicloud import (
    NodeRegistry,
    PipelineConfig,
    PipelineOrchestrator,
    PipelineResult,
)
from multicloud.cluster.node_server import NodeServer
from multicloud.control.registry_server import RegistryServer
from multicloud.core.auth import auth_header
from multicloud.core.config import ServiceConfig
from multicloud.core.errors import ConfigError
from multicloud.pipeline.metrics import STAGES
from multicloud.run.live import LiveView
from multicloud.ui.prometheus import (
    LATENCY_BUCKETS,
    MetricsServer,
    histogram_buckets,
    status_snapshot,
)

TOKEN = "s3cret"
Families = dict[str, list[Sample]]


def parse(text: str) -> tuple[Families, dict[str, str]]:
    """Samples by family name, and each family's type, via prometheus_client's parser."""
    samples: Families = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        samples[family.name] = list(family.samples)
        types[family.name] = family.type
    return samples, types


def value(samples: Families, family: str, sample: str | None = None, **labels: str) -> float:
    """The one sample of family named sample (default: family) with exactly these labels."""
    name = sample or family
    found = [s.value for s in samples[family] if s.name == name and s.labels == labels]
    assert len(found) == 1, (family, name, labels, samples[family])
    return found[0]


def by_label(samples: Families, family: str, label: str, sample: str | None = None,
             ) -> dict[str, float]:
    """label value -> sample value, for a family with one varying label."""
    name = sample or family
    return {s.labels[label]: s.value for s in samples[family] if s.name == name}


@pytest.fixture
def cluster(setup_test_cluster: NodeRegistry) -> NodeRegistry:
    """The shared embedded test cluster (tests/conftest.py)."""
    return setup_test_cluster


@pytest.fixture
async def run(cluster: NodeRegistry, config: PipelineConfig,
              make_dataset: Callable[..., Path],
              ) -> AsyncIterator[tuple[PipelineOrchestrator, PipelineResult, dict[str, Any]]]:
    """A finished run with a node marked unhealthy at 50%, and what was seen at that moment."""
    source = make_dataset("aws_s3_simulation", size=2 * 1024 * 1024, seed=41)
    orch = PipelineOrchestrator(cluster, config=config)  # small_config(): 64 KiB chunks
    server = MetricsServer(orch.live)
    seen: dict[str, Any] = {}

    def at_half(live: LiveView) -> None:
        if not seen and live.progress_percent >= 50:
            # The collector and the snapshot are plain reads: call them mid-run, in the loop.
            seen["metrics"] = generate_latest(server.registry).decode()
            seen["status"] = status_snapshot(live.snapshot())
            cluster.nodes["aws-node-2"].status = "unhealthy"

    orch.add_progress_listener(at_half)
    result = await orch.run_pipeline({"batch_id": "scraped", "data_source": str(source)})
    assert result.status == "success", result.error
    assert seen, "the run never reached 50% with chunks left"
    yield orch, result, seen
    await orch.close()


async def test_a_scrape_matches_the_run(
        run: tuple[PipelineOrchestrator, PipelineResult, dict[str, Any]]) -> None:
    orch, result, _ = run
    m = result.metrics
    async with MetricsServer(orch.live) as server, aiohttp.ClientSession() as http:
        assert server.url.startswith("http://127.0.0.1:")
        async with http.get(f"{server.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await resp.text()
    samples, types = parse(text)

    assert all(name.startswith("multicloud_") for name in samples)
    for stage in STAGES:
        assert value(samples, "multicloud_stage_chunks", "multicloud_stage_chunks_total",
                     stage=stage, outcome="succeeded") == m[stage]["succeeded"]
        assert value(samples, "multicloud_stage_chunks", "multicloud_stage_chunks_total",
                     stage=stage, outcome="failed") == m[stage]["failed"]
        assert value(samples, "multicloud_stage_bytes", "multicloud_stage_bytes_total",
                     stage=stage) == m[stage]["bytes"]
        assert value(samples, "multicloud_stage_busy_seconds", stage=stage) == \
            pytest.approx(m[stage]["busy_seconds"], abs=1e-5)
    assert m["ingestion"]["succeeded"] == result.chunks_processed
    assert m["storage"]["succeeded"] == result.chunks_processed
    assert value(samples, "multicloud_stage_bytes", "multicloud_stage_bytes_total",
                 stage="ingestion") == result.bytes_processed

    # Latency histograms: one observation per chunk of a stage that times chunks.
    assert types["multicloud_stage_latency_seconds"] == "histogram"
    for stage in ("ingestion", "processing"):
        count = value(samples, "multicloud_stage_latency_seconds",
                      "multicloud_stage_latency_seconds_count", stage=stage)
        assert count == m[stage]["succeeded"] > 0
        buckets = {s.labels["le"]: s.value for s in samples["multicloud_stage_latency_seconds"]
                   if s.name.endswith("_bucket") and s.labels["stage"] == stage}
        assert len(buckets) == len(LATENCY_BUCKETS) + 1
        assert buckets["+Inf"] == count
        ordered = [buckets[le] for le in sorted(buckets, key=float)]
        assert ordered == sorted(ordered)

    # Distribution: replica writes by outcome, bytes and dollars by link.
    dist = m["distribution"]
    writes = by_label(samples, "multicloud_replica_writes", "outcome",
                      "multicloud_replica_writes_total")
    assert writes == {"ok": dist["replica_writes"], "failed": dist["replica_failures"],
                      "replaced": dist["replacements"]}
    assert writes["ok"] >= 2 * result.chunks_processed  # write_quorum acks at least
    link_bytes = by_label(samples, "multicloud_link_bytes", "link", "multicloud_link_bytes_total")
    assert link_bytes == dist["bytes_by_link"]
    cross = {s.labels["link"] for s in samples["multicloud_link_bytes"]
             if s.labels["cross_cloud"] == "true"}
    assert cross
    for link in cross:
        src, dst = link.split("->")
        assert src.split("/")[0] != dst.split("/")[0], link
    assert sum(link_bytes[link] for link in cross) == dist["cross_cloud_bytes"]
    transfers = by_label(samples, "multicloud_link_transfers", "link",
                         "multicloud_link_transfers_total")
    assert sum(transfers[link] for link in cross) == dist["cross_cloud_transfers"]
    egress = by_label(samples, "multicloud_link_egress_usd", "link",
                      "multicloud_link_egress_usd_total")
    assert round(sum(egress.values()), 6) == pytest.approx(dist["egress_cost_usd"], abs=1e-6)
    assert dist["egress_cost_usd"] > 0

    latency_counts = by_label(samples, "multicloud_link_latency_seconds", "link",
                              "multicloud_link_latency_seconds_count")
    assert latency_counts == {link: len(v) for link, v in
                              orch.metrics.replicas.link_latencies.items()}
    rto = by_label(samples, "multicloud_link_rto_seconds_per_mib", "link")
    assert rto == pytest.approx({link: t["rto_s_per_mib"] for link, t in
                                 dist["timeouts"].items()})

    # Nodes and the pipeline as a whole.
    up = by_label(samples, "multicloud_node_up", "node")
    assert up == {n: 0.0 if n == "aws-node-2" else 1.0 for n in orch.node_registry.nodes}
    assert {s.labels["cloud"] for s in samples["multicloud_node_up"]} == {"aws", "gcp"}
    assert value(samples, "multicloud_node_failures_handled",
                 "multicloud_node_failures_handled_total") == m["node_failures_handled"] == 1
    assert value(samples, "multicloud_pipeline_progress_ratio") == 1.0
    assert value(samples, "multicloud_pipeline_throughput_mb_s") == orch.current_throughput > 0
    assert value(samples, "multicloud_pipeline_info", batch_id="scraped", status="completed",
                 stage="") == 1


async def test_status_reports_the_run(
        run: tuple[PipelineOrchestrator, PipelineResult, dict[str, Any]]) -> None:
    orch, result, seen = run
    async with MetricsServer(orch.live) as server, aiohttp.ClientSession() as http, \
            http.get(f"{server.url}/status") as resp:
        assert resp.status == 200
        status = await resp.json()

    assert status["status"] == "completed"
    assert status["batch_id"] == "scraped"
    assert status["stage"] is None
    assert status["progress_percent"] == 100.0
    assert (status["healthy_nodes"], status["unhealthy_nodes"]) == (5, 1)
    assert status["nodes_by_cloud"] == {"aws": {"healthy": 2, "unhealthy": 1},
                                        "gcp": {"healthy": 3, "unhealthy": 0}}
    assert status["unhealthy_node_ids"] == ["aws-node-2"]
    assert status["throughput_mb_s"] == orch.current_throughput
    assert status["eta_seconds"] is None
    assert status["committed_bytes"] == status["total_bytes"] == result.bytes_processed
    assert status["committed_chunks"] == result.chunks_processed
    assert status["node_failures_handled"] == 1
    assert {s: v["succeeded"] for s, v in status["stages"].items()} == \
        {s: result.metrics[s]["succeeded"] for s in STAGES}
    events = status["events"]
    assert 0 < len(events) <= 20
    assert events[-1]["kind"] == "pipeline_finished"
    assert set(events[-1]) == {"at", "kind", "level", "detail"}
    assert any(e["kind"] == "node_unhealthy" and e["level"] == "warning" for e in events)
    assert [e["kind"] for e in events] == [e.kind for e in orch.live.events[-20:]]

    # Mid-run (at 50%, just before the node was marked unhealthy) the same views said:
    mid = seen["status"]
    assert mid["status"] == "running"
    assert mid["batch_id"] == "scraped"
    assert 50 <= mid["progress_percent"] < 100
    assert mid["eta_seconds"] is not None
    assert mid["eta_seconds"] >= 0
    assert mid["unhealthy_nodes"] == 0
    mid_samples, _ = parse(seen["metrics"])
    assert 0.5 <= value(mid_samples, "multicloud_pipeline_progress_ratio") < 1
    [info] = mid_samples["multicloud_pipeline_info"]
    assert info.labels["status"] == "running"
    assert info.labels["stage"] in STAGES
    assert value(mid_samples, "multicloud_node_failures_handled",
                 "multicloud_node_failures_handled_total") == 0


async def test_an_idle_orchestrator_scrapes_cleanly(cluster: NodeRegistry,
                                                    config: PipelineConfig) -> None:
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        samples, _ = parse(generate_latest(MetricsServer(orch.live).registry).decode())
        snapshot = status_snapshot(orch.live.snapshot())
    finally:
        await orch.close()
    assert value(samples, "multicloud_pipeline_info", batch_id="", status="idle", stage="") == 1
    assert value(samples, "multicloud_pipeline_progress_ratio") == 0
    assert samples["multicloud_link_bytes"] == []
    assert value(samples, "multicloud_stage_latency_seconds",
                 "multicloud_stage_latency_seconds_count", stage="processing") == 0
    assert snapshot["status"] == "idle"
    assert snapshot["events"] == []
    assert snapshot["healthy_nodes"] == 6


async def test_scrapes_follow_growing_latency_lists_and_new_runs(
        cluster: NodeRegistry, config: PipelineConfig) -> None:
    orch = PipelineOrchestrator(cluster, config=config)
    registry = MetricsServer(orch.live).registry

    def processing_histogram() -> tuple[dict[str, float], float]:
        samples, _ = parse(generate_latest(registry).decode())
        rows = [s for s in samples["multicloud_stage_latency_seconds"]
                if s.labels["stage"] == "processing"]
        buckets = {s.labels["le"]: s.value for s in rows if s.name.endswith("_bucket")}
        [total] = [s.value for s in rows if s.name.endswith("_sum")]
        return buckets, total

    try:
        latencies = orch.metrics.stages["processing"].latencies
        latencies.extend([0.002, 0.2, 7.0])
        processing_histogram()
        latencies.extend([0.0001, 0.2, 90.0])  # read incrementally by the next scrape
        buckets, total = processing_histogram()
        assert buckets == dict(histogram_buckets(latencies))
        assert buckets["+Inf"] == 6
        assert buckets["0.25"] == 4
        assert total == pytest.approx(sum(latencies))
        orch.metrics.reset()  # what a new run does
        buckets, total = processing_histogram()
        assert set(buckets.values()) == {0.0}
        assert total == 0
    finally:
        await orch.close()


async def test_the_token_guards_both_endpoints(cluster: NodeRegistry,
                                               config: PipelineConfig) -> None:
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        async with MetricsServer(orch.live, token=TOKEN) as server, \
                aiohttp.ClientSession() as http:
            for path in ("/metrics", "/status"):
                async with http.get(f"{server.url}{path}") as resp:
                    assert resp.status == 401, path
                async with http.get(f"{server.url}{path}", headers=auth_header(TOKEN)) as resp:
                    assert resp.status == 200, path
            taken = MetricsServer(orch.live, port=int(server.url.rsplit(":", 1)[1]))
            with pytest.raises(ConfigError, match="cannot listen"):
                await taken.start()
        await server.stop()  # twice is fine
    finally:
        await orch.close()


def test_histogram_buckets_are_cumulative() -> None:
    buckets = histogram_buckets([0.0005, 0.001, 0.003, 2.0, 100.0], bounds=(0.001, 0.01, 1.0))
    assert buckets == [("0.001", 2.0), ("0.01", 3.0), ("1.0", 3.0), ("+Inf", 5.0)]
    assert histogram_buckets([], bounds=(1.0,)) == [("1.0", 0.0), ("+Inf", 0.0)]
    assert all(math.isfinite(float(le)) for le, _ in histogram_buckets([1.0])[:-1])


async def test_node_and_registry_metrics_parse(tmp_path: Path) -> None:
    service = ServiceConfig(heartbeat_interval_s=60.0, failure_timeout_s=120.0)
    registry = RegistryServer(tmp_path / "reg", TOKEN, service, host="127.0.0.1", port=0)
    reg_url = await registry.start()
    node = NodeServer(tmp_path / "node", TOKEN, "aws", 'us-"east"-1', registry_url=reg_url,
                      service=service, host="127.0.0.1", fsync=False)
    try:
        node_url = await node.start()
        async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http:
            async with http.get(f"{node_url}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                node_samples, node_types = parse(await resp.text())
            async with http.get(f"{reg_url}/metrics") as resp:
                reg_samples, reg_types = parse(await resp.text())
            async with aiohttp.ClientSession() as anonymous, \
                    anonymous.get(f"{node_url}/metrics") as resp:
                assert resp.status == 401
    finally:
        await node.stop()
        await registry.stop()

    labels = {"node": "aws-node-1", "cloud": "aws", "region": 'us-"east"-1'}
    assert value(node_samples, "multicloud_node_info", **labels) == 1
    assert value(node_samples, "multicloud_node_stored_chunks") == 0
    assert value(node_samples, "multicloud_node_stored_bytes") == 0
    assert value(node_samples, "multicloud_node_disk_free_bytes") > 0
    assert node_types["multicloud_node_requests"] == "counter"
    assert node_types["multicloud_node_request_seconds"] == "histogram"

    assert by_label(reg_samples, "multicloud_registry_nodes", "status") == \
        {"healthy": 1, "unhealthy": 0}
    assert reg_types["multicloud_registry_heartbeats"] == "counter"
    assert value(reg_samples, "multicloud_registry_heartbeats",
                 "multicloud_registry_heartbeats_total") == 0  # none yet: 60 s interval
    assert value(reg_samples, "multicloud_registry_node_up", **labels) == 1
