"""The JSON-lines pipeline log: every line parses, every documented event has its fields."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from multicloud import (
    NodeRegistry,
    PipelineConfig,
    PipelineOrchestrator,
    PipelineResult,
    PipelineStatus,
    create_local_cluster,
)
from multicloud.pipeline.events import EVENT_KINDS, PipelineEvent
from multicloud.pipeline.metrics import STAGES
from multicloud.ui.logger import COMMON_FIELDS, LOG_EVENTS, PipelineLogger


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log as JSON (fails on any line that is not)."""
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]


def assert_well_formed(line: dict[str, Any]) -> None:
    """The common keys come first, ts is ISO 8601 UTC, and a catalogued event has its fields."""
    assert list(line)[:len(COMMON_FIELDS)] == list(COMMON_FIELDS), line
    assert dt.datetime.fromisoformat(line["ts"]).tzinfo is not None, line
    assert line["level"] in {"info", "warning", "error"}, line
    missing = [f for f in LOG_EVENTS.get(line["event"], ()) if f not in line]
    assert not missing, (line["event"], missing)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NodeRegistry]:
    registry = create_local_cluster(tmp_path / "c", {"aws": 3, "gcp": 3})
    yield registry
    await registry.close()


async def run_logged(registry: NodeRegistry, config: PipelineConfig, source: Path,
                     log_path: Path, batch_id: str,
                     at_half: Callable[[], Awaitable[None]]) -> PipelineResult:
    """Run one batch with a logger attached; at_half() runs once at >= 50% progress."""
    orch = PipelineOrchestrator(registry, config=config)  # small_config(): 64 KiB chunks
    try:
        with PipelineLogger(log_path) as logger:
            logger.attach(orch)
            run = asyncio.create_task(orch.run_pipeline({"batch_id": batch_id,
                                                         "data_source": str(source)}))
            await orch.wait_for_progress(50)
            assert orch.pipeline_status is PipelineStatus.RUNNING, \
                "the run never reached 50% with chunks left"
            await at_half()
            result = await run
    finally:
        await orch.close()
    assert result.status == "success", result.error
    return result


async def test_every_line_is_json_with_the_documented_fields(
        cluster: NodeRegistry, config: PipelineConfig, make_dataset: Callable[..., Path],
        tmp_path: Path) -> None:
    source = make_dataset("aws_s3_simulation", size=2 * 1024 * 1024, seed=31)
    log_path = tmp_path / "logs" / "pipeline.log"

    async def mark_unhealthy() -> None:
        cluster.nodes["aws-node-2"].status = "unhealthy"

    result = await run_logged(cluster, config, source, log_path, "logged", mark_unhealthy)

    lines = read_lines(log_path)
    for line in lines:
        assert_well_formed(line)
        assert line["batch_id"] == "logged", line
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)

    [started] = by_event["pipeline_started"]
    assert started["source"] == str(source)
    assert started["source_cloud"] == "aws"
    assert started["total_bytes"] == result.bytes_processed
    assert started["files"] == result.files

    stages = by_event["stage_complete"]
    assert [s["stage"] for s in stages] == STAGES
    for line in stages:
        assert line["metrics"]["succeeded"] == result.metrics[line["stage"]]["succeeded"]
    assert stages[-1]["metrics"]["under_replicated"] == 0  # storage: its full summary

    [unhealthy] = by_event["node_unhealthy"]
    assert unhealthy["level"] == "warning"
    assert (unhealthy["node_id"], unhealthy["cloud"]) == ("aws-node-2", "aws")
    assert unhealthy["reason"] == "set by operator"

    [repair] = by_event["repair_done"]
    assert repair["replicas_created"] == result.metrics["storage"]["replicas_repaired"]
    assert repair["under_replicated"] == 0
    assert repair["lost"] == 0

    [finished] = by_event["pipeline_finished"]
    assert lines[-1] is finished
    assert finished["status"] == "success"
    assert finished["chunks"] == result.chunks_processed
    assert finished["bytes"] == result.bytes_processed
    assert finished["error"] is None
    assert finished["duration_seconds"] > 0
    # The log holds exactly the run's events, in order (the result's list is taken before
    # the storage stage completes and the run finishes).
    assert [line["event"] for line in lines] == [
        *(e["kind"] for e in result.metrics["events"]), "stage_complete", "pipeline_finished"]


async def test_a_crash_logs_replacements_and_the_node_failure(
        cluster: NodeRegistry, config: PipelineConfig, make_dataset: Callable[..., Path],
        tmp_path: Path) -> None:
    source = make_dataset("aws_s3_simulation", size=2 * 1024 * 1024, seed=32)
    log_path = tmp_path / "crash.log"

    await run_logged(cluster, config, source, log_path, "crash",
                     lambda: cluster.faults.crash("aws-node-2"))

    lines = read_lines(log_path)
    for line in lines:
        assert_well_formed(line)
    events = {line["event"] for line in lines}
    assert {"replica_replaced", "node_unhealthy", "pipeline_finished"} <= events
    replaced = [line for line in lines if line["event"] == "replica_replaced"]
    assert all(r["failed_node"] == "aws-node-2" and r["replacement"] != "aws-node-2"
               and r["level"] == "warning" for r in replaced), replaced
    assert len(replaced[0]["chunk_id"]) == 64


def test_the_catalogue_matches_the_event_bus() -> None:
    assert set(LOG_EVENTS) == set(EVENT_KINDS)


def test_fields_are_flattened_and_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "p.log"  # parent dirs are created
    with PipelineLogger(path) as logger:
        logger.sink(PipelineEvent(1.0, "chunk_failed", "chunk 3 of a.csv: quorum", "b1",
                                  "warning", {"file": "a.csv", "index": 3, "chunk_id": "c",
                                              "stage": "distribution", "error": "quorum",
                                              "where": Path("/x"), "event": "clash",
                                              "nested": {1: [1.5, None]}}))
        logger.log_stage_complete("processing", {"succeeded": 4, "bytes": 10})
        logger.log_stage_complete("storage", {}, batch_id="b2")
    failed, stage, other = read_lines(path)

    assert failed["event"] == "chunk_failed"
    assert failed["level"] == "warning"
    assert failed["detail"] == "chunk 3 of a.csv: quorum"
    assert (failed["file"], failed["index"], failed["stage"]) == ("a.csv", 3, "distribution")
    assert failed["where"] == "/x"  # not JSON: written as a string
    assert failed["event_"] == "clash"  # a field never overwrites a common key
    assert failed["nested"] == {"1": [1.5, None]}
    assert stage == {**stage, "event": "stage_complete", "level": "info", "batch_id": "b1",
                     "stage": "processing", "metrics": {"succeeded": 4, "bytes": 10}}
    assert other["batch_id"] == "b2"
    for line in (failed, stage, other):
        assert_well_formed(line)


def test_the_file_is_appended_to_and_close_detaches(tmp_path: Path) -> None:
    path = tmp_path / "p.log"

    class Bus:
        """The slice of the orchestrator attach() uses."""

        def __init__(self) -> None:
            self.sinks: list[Callable[[PipelineEvent], None]] = []

        def add_event_sink(self, sink: Callable[[PipelineEvent], None]) -> Callable[[], None]:
            self.sinks.append(sink)
            return lambda: self.sinks.remove(sink)

    event = PipelineEvent(1.0, "node_recovered", "n1: ok", "b", "info",
                          {"node_id": "n1", "reason": "ok"})
    PipelineLogger(path).close()
    bus = Bus()
    logger = PipelineLogger(path)
    logger.attach(bus)  # type: ignore[arg-type]
    bus.sinks[0](event)
    logger.close()
    logger.close()
    assert bus.sinks == []
    assert logger.closed
    logger.sink(event)  # dropped, not raised
    with PipelineLogger(path) as again:
        again.sink(event)
    assert [line["event"] for line in read_lines(path)] == ["node_recovered"] * 2


def test_a_global_structlog_configuration_does_not_reach_the_log(tmp_path: Path) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
                        processors=[structlog.processors.KeyValueRenderer()])
    try:
        with PipelineLogger(tmp_path / "p.log") as logger:
            logger.log_stage_complete("ingestion", {"chunks": 1}, batch_id="b")
    finally:
        structlog.reset_defaults()
    [line] = read_lines(tmp_path / "p.log")
    assert line["event"] == "stage_complete"
