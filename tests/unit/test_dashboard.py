"""The status dashboard: rendered into a recording console, from views, a live run and JSON."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console, RenderableType

from multicloud import PipelineConfig, PipelineOrchestrator, create_local_cluster
from multicloud.run.live import LiveView
from multicloud.ui.dashboard import (
    DashboardView,
    StatusDashboard,
    run_with_dashboard,
    should_use_dashboard,
    watch_status,
)

NOW = 1_700_000_000.0  # a fixed wall clock for the ETA's time of day
TITLE = "multicloud pipeline"


def text_of(renderable: RenderableType, width: int = 100) -> str:
    """What a non-terminal console of that width shows for renderable."""
    console = Console(record=True, width=width, force_terminal=False, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def last_frame(console: Console) -> str:
    """The last frame a Live display drew on a recording console."""
    text = console.export_text()
    assert TITLE in text
    return text[text.rindex(TITLE):]


def sample_view(**changes: Any) -> DashboardView:
    """A mid-run view: 6 nodes in two clouds, aws-node-2 down, a few events."""
    gib = 1024**3
    nodes = [{"id": f"{cloud}-node-{i}", "cloud": cloud, "region": region,
              "status": "unhealthy" if (cloud, i) == ("aws", 2) else "healthy"}
             for cloud, region in (("aws", "us-east-1"), ("gcp", "us-central1"))
             for i in (1, 2, 3)]
    events = [
        {"at": NOW - 3, "kind": "pipeline_started", "level": "info", "detail": "batch b1: 9 files"},
        {"at": NOW - 2, "kind": "stage_complete", "level": "info", "detail": "ingestion complete"},
        {"at": NOW - 1, "kind": "node_unhealthy", "level": "warning",
         "detail": "aws-node-2 (aws/us-east-1): connection refused"},
    ]
    view = DashboardView(
        status="running", batch_id="b1", stage="processing", progress_percent=42.5,
        elapsed_s=12.34, throughput_mb_s=85.3, eta_s=16.7, total_bytes=2 * gib,
        stage_bytes={"ingestion": 3 * gib // 2, "processing": gib, "distribution": gib // 2,
                     "storage": gib // 2},
        nodes=nodes, events=events)
    for key, value in changes.items():
        setattr(view, key, value)
    return view


def test_render_shows_the_live_numbers() -> None:
    text = text_of(StatusDashboard(clock=lambda: NOW).render(sample_view()))
    eta_clock = dt.datetime.fromtimestamp(NOW + 16.7).astimezone().strftime("%H:%M:%S")

    assert "RUNNING" in text
    assert re.search(r"stage\s+processing", text)
    assert re.search(r"progress\s+42\.5%", text)
    assert "85.3 MB/s" in text
    assert f"16.7s (at {eta_clock})" in text
    assert "5 healthy, 1 unhealthy" in text
    assert re.search(r"aws\s+2\s+1 \(aws-node-2\)", text)
    assert re.search(r"gcp\s+3\s+0\b", text)
    assert "aws-node-2 (aws/us-east-1): connection refused" in text
    # one bar per stage with its share and bytes
    assert re.search(r"ingestion .* 75\.0%\s+1\.5 GiB / 2\.0 GiB", text)
    assert re.search(r"storage .* 25\.0%\s+512\.0 MiB / 2\.0 GiB", text)


@pytest.mark.parametrize("width", [60, 80, 120])
def test_render_fits_common_terminal_widths(width: int) -> None:
    text = text_of(StatusDashboard().render(sample_view()), width=width)

    assert max(len(line) for line in text.splitlines()) <= width
    for needle in ("42.5%", "85.3 MB/s", "aws-node-2", "node_unhealthy", "distribution"):
        assert needle in text, (width, needle)


def test_render_keeps_only_the_latest_events() -> None:
    events = [{"at": NOW + i, "kind": "replica_replaced", "level": "info",
               "detail": f"event number {i:02d}"} for i in range(12)]
    text = text_of(StatusDashboard().render(sample_view(events=events)))

    shown = re.findall(r"event number (\d\d)", text)
    assert shown == [f"{i:02d}" for i in range(4, 12)]


def test_render_of_an_idle_view_has_placeholders() -> None:
    text = text_of(StatusDashboard().render(DashboardView()))

    assert "IDLE" in text
    assert re.search(r"ETA\s+—", text)
    assert "none yet" in text


def test_from_status_maps_the_endpoint_json() -> None:
    status = {"status": "running", "batch_id": "b7", "stage": "distribution",
              "progress_percent": 60, "healthy_nodes": 5, "unhealthy_nodes": 1,
              "throughput_mb_s": 12.5, "eta_seconds": 8, "elapsed_seconds": 12,
              "total_bytes": 1000, "committed_bytes": 600,
              "stage_bytes": {"ingestion": 900, "processing": 800},
              "events": [{"at": "2024-05-01T12:00:00+00:00", "kind": "node_unhealthy",
                          "level": "warning", "detail": "gcp-node-1 down"}]}

    view = DashboardView.from_status(status, nodes=[])

    assert (view.status, view.batch_id, view.stage) == ("running", "b7", "distribution")
    assert (view.progress_percent, view.eta_s, view.elapsed_s) == (60.0, 8.0, 12.0)
    assert view.stage_bytes == {"ingestion": 900, "processing": 800, "distribution": 600,
                                "storage": 600}
    assert view.node_counts() == (5, 1)  # no node list: the endpoint's counts
    text = text_of(StatusDashboard().render(view))
    assert "gcp-node-1 down" in text
    assert "5 healthy, 1 unhealthy" in text


def test_from_status_tolerates_missing_and_odd_keys() -> None:
    empty = DashboardView.from_status({}, nodes=[])
    odd = DashboardView.from_status(
        {"status": None, "progress_percent": "n/a", "eta_seconds": None, "stage_bytes": [],
         "events": [{"kind": "repair_done"}, "not an event"], "total_bytes": "2048"},
        nodes=[{"id": "aws-node-1", "cloud": "aws", "region": "us-east-1",
                "status": "unhealthy"}])

    assert empty == DashboardView(stage_bytes={"distribution": 0, "storage": 0})
    assert (odd.status, odd.progress_percent, odd.eta_s, odd.total_bytes) == ("idle", 0.0,
                                                                              None, 2048)
    assert odd.events == [{"at": None, "kind": "repair_done", "level": "info", "detail": ""}]
    assert odd.node_counts() == (0, 1)
    for view in (empty, odd):
        assert TITLE in text_of(StatusDashboard().render(view))


def test_should_use_dashboard_only_on_an_interactive_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    assert not should_use_dashboard(Console(file=io.StringIO(), force_terminal=False))
    assert should_use_dashboard(Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setenv("TERM", "dumb")
    assert not should_use_dashboard(Console(file=io.StringIO(), force_terminal=True))


async def test_from_snapshot_mid_run_and_after(tmp_path: Path, config: PipelineConfig,
                                                   make_dataset: Callable[..., Path]) -> None:
    registry = create_local_cluster(tmp_path / "c", {"aws": 3, "gcp": 3})
    orch = PipelineOrchestrator(registry, config=config)  # small_config(): 64 KiB chunks
    source = make_dataset("aws_s3_simulation", size=2 * 1024 * 1024, seed=3)
    mid: list[DashboardView] = []

    def capture(live: LiveView) -> None:
        if not mid and 40 <= live.progress_percent < 100:
            registry.nodes["aws-node-2"].set_status("unhealthy", reason="failed in a test")
            mid.append(DashboardView.from_snapshot(live.snapshot()))

    orch.add_progress_listener(capture)
    try:
        result = await orch.run_pipeline({"batch_id": "dash", "data_source": str(source)})
        after = DashboardView.from_snapshot(orch.live.snapshot())
    finally:
        await orch.close()
        await registry.close()

    assert result.status == "success", result.error
    view = mid[0]
    assert view.status == "running"
    assert view.batch_id == "dash"
    assert 0 < view.progress_percent < 100
    assert 0 < view.stage_bytes["storage"] < view.total_bytes
    assert view.stage_bytes["ingestion"] >= view.stage_bytes["storage"]
    assert view.throughput_mb_s > 0
    assert view.eta_s is not None
    assert view.node_counts() == (5, 1)
    assert view.events[-1]["kind"] == "node_unhealthy"
    mid_text = text_of(StatusDashboard().render(view))
    assert re.search(r"aws\s+2\s+1 \(aws-node-2\)", mid_text)
    assert "aws-node-2 (aws/" in mid_text

    assert after.status == "completed"
    assert after.progress_percent == 100.0
    assert after.stage is None
    assert after.eta_s is None
    assert all(after.stage_bytes[s] >= after.total_bytes for s in after.stage_bytes)
    assert after.events[-1]["kind"] == "pipeline_finished"
    assert len(after.nodes) == 6


async def test_run_with_dashboard_leaves_the_final_frame(
        orchestrator: PipelineOrchestrator, make_dataset: Callable[..., Path]) -> None:
    console = Console(force_terminal=True, record=True, width=100, file=io.StringIO())
    source = make_dataset(size=1024 * 1024, seed=5)

    result = await run_with_dashboard(orchestrator, {"batch_id": "live",
                                                     "data_source": str(source)}, console)

    assert result.status == "success", result.error
    frame = last_frame(console)
    assert "COMPLETED" in frame
    assert re.search(r"progress\s+100\.0%", frame)
    assert len(re.findall(r"100\.0%\s+1\.0 MiB / 1\.0 MiB", frame)) == 4
    assert "pipeline_finished" in frame
    # the refresh task is gone and no listener is left behind
    assert [t for t in asyncio.all_tasks() if t.get_name() == "dashboard-refresh"] == []
    assert orchestrator.live.bus._sinks == []


async def test_run_with_dashboard_shows_a_failed_run(
        orchestrator: PipelineOrchestrator, tmp_path: Path) -> None:
    console = Console(force_terminal=True, record=True, width=100, file=io.StringIO())

    result = await run_with_dashboard(
        orchestrator, {"batch_id": "nope", "data_source": str(tmp_path / "missing")}, console)

    assert result.status == "failed"
    frame = last_frame(console)
    assert "FAILED" in frame
    assert "does not exist" in frame


class BrokenDashboard(StatusDashboard):
    """A dashboard whose every frame fails to render."""

    def render(self, view: DashboardView) -> RenderableType:
        raise RuntimeError("render bug")


async def test_a_dashboard_bug_does_not_stop_the_run(
        orchestrator: PipelineOrchestrator, make_dataset: Callable[..., Path],
        caplog: pytest.LogCaptureFixture) -> None:
    console = Console(force_terminal=True, record=True, width=100, file=io.StringIO())
    source = make_dataset(size=256 * 1024, seed=6)

    with caplog.at_level(logging.ERROR, logger="multicloud.ui.dashboard"):
        result = await run_with_dashboard(orchestrator, {"data_source": str(source)}, console,
                                          dashboard=BrokenDashboard())

    assert result.status == "success", result.error
    assert "dashboard refresh failed" in caplog.text


async def test_watch_status_once_prints_one_frame() -> None:
    console = Console(record=True, width=100, force_terminal=False, file=io.StringIO())

    async def fetch() -> DashboardView:
        return sample_view()

    await watch_status(fetch, console, once=True)

    text = console.export_text()
    assert text.count(TITLE) == 1
    assert "42.5%" in text


async def test_watch_status_renders_until_cancelled() -> None:
    console = Console(force_terminal=True, record=True, width=100, file=io.StringIO())
    calls = 0
    third = asyncio.Event()

    async def fetch() -> DashboardView:
        nonlocal calls
        calls += 1
        if calls == 3:
            third.set()
        return sample_view(progress_percent=float(calls))

    watcher = asyncio.create_task(watch_status(fetch, console, interval_s=0))
    await third.wait()
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher

    assert re.search(r"progress\s+3\.0%", last_frame(console))
