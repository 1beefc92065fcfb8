"""The five-part demo, and the observability commands, driven as a user would."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from multicloud.core.units import parse_size
from multicloud.ui.cli import main
from multicloud.ui.demo import DemoOptions, run_demo


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """Chunks of 256 KiB, so a few MiB give enough chunks to fail a node half-way."""
    path = tmp_path / "config"
    path.mkdir()
    (path / "ingestion_config.yml").write_text("chunk_size_mb: 0.25\n")
    return path


async def test_demo_runs_its_five_parts_and_proves_the_result(tmp_path: Path,
                                                              config_dir: Path) -> None:
    out = Console(record=True, width=110, file=io.StringIO())
    options = DemoOptions(workdir=tmp_path / "demo", config_dir=config_dir,
                          size=parse_size("6MiB"))

    ok = await run_demo(options, out)

    text = " ".join(out.export_text().split())  # rich wraps long lines
    assert ok, text
    for part in ("1. Cluster status", "2. Running the pipeline", "3. Results",
                 "4. Failure recovery", "5. Final statistics"):
        assert part in text
    assert "marking aws-node-2 unhealthy" in text
    assert "failure detected: aws-node-2 is unhealthy" in text
    assert "run finished: success; node failures handled: 1" in text
    assert "under-replicated chunks: 0" in text
    assert "every chunk back at 3 replicas" in text
    assert "byte-identical to the source: yes" in text


async def test_demo_on_three_nodes_fails_one_and_recovers_through_hints(
        tmp_path: Path, config_dir: Path) -> None:
    """The walkthrough's aws, gcp, aws: no node to spare for 3 replicas, but 2 are a quorum."""
    (config_dir / "cluster_config.yml").write_text("nodes_per_cloud: {aws: 2, gcp: 1}\n")
    out = Console(record=True, width=110, file=io.StringIO())
    options = DemoOptions(workdir=tmp_path / "demo", config_dir=config_dir,
                          size=parse_size("6MiB"))

    ok = await run_demo(options, out)

    text = " ".join(out.export_text().split())
    assert ok, text
    assert "skipped" not in text
    assert "not fewer than the write quorum (2)" in text
    assert "marking aws-node-2 unhealthy" in text
    assert "run finished: success" in text
    assert "under-replicated chunks: 0" not in text
    assert "have fewer healthy replicas than the replication factor" in text
    assert "aws-node-2 is back" in text
    assert "0 chunk(s) still hinted" in text
    assert re.search(r"chunks of demo-2 at 3 healthy replicas: (\d+)/\1\b", text), text
    assert "0 missing or corrupt" in text
    assert "byte-identical to the source: yes" in text


async def test_demo_skips_failure_recovery_below_write_quorum(
        tmp_path: Path, config_dir: Path) -> None:
    (config_dir / "cluster_config.yml").write_text("nodes_per_cloud: {aws: 1, gcp: 1}\n")
    out = Console(record=True, width=110, file=io.StringIO())
    options = DemoOptions(workdir=tmp_path / "demo", config_dir=config_dir,
                          size=parse_size("2MiB"))

    ok = await run_demo(options, out)

    text = " ".join(out.export_text().split())
    assert ok, text
    assert "skipped: taking a node away would leave fewer healthy nodes than write_quorum" \
        in text
    assert "byte-identical to the source: yes" in text


def test_demo_command_exits_0(tmp_path: Path, config_dir: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--size", "2MiB", "--workdir", str(tmp_path / "w"),
                 "--config-dir", str(config_dir)])
    assert code == 0, capsys.readouterr().err


def test_profile_command_writes_report_charts_and_applied_config(
        tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "data"
    assert main(["gen-data", str(source), "--size", "2MiB"]) == 0
    out_dir = tmp_path / "prof"
    code = main(["profile", "--source", str(source), "--runs", "2", "--out", str(out_dir),
                 "--config-dir", str(config_dir), "--apply", str(tmp_path / "tuned"),
                 "--nodes", "aws=3,gcp=3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Stage Breakdown" in printed
    assert (out_dir / "report.md").read_text().startswith("#")
    assert (out_dir / "stage_breakdown.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "tuned" / "processing_config.yml").exists()

    code = main(["profile", "--source", str(source), "--runs", "1", "--out", str(out_dir),
                 "--compare", str(config_dir), str(tmp_path / "tuned")])
    assert code == 0
    assert "comparison" in capsys.readouterr().out.lower()


def test_profile_rejects_a_bad_nodes_spec(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["profile", "--source", str(tmp_path), "--nodes", "aws:3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --nodes 'aws:3'")


def test_run_writes_the_event_log_and_status_reads_the_cluster(
        tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "data"
    assert main(["gen-data", str(source), "--size", "1MiB"]) == 0
    data_dir, log_file = tmp_path / "dd", tmp_path / "events.jsonl"
    code = main(["run", "--source", str(source), "--batch-id", "b1", "--no-dashboard",
                 "--log-file", str(log_file), "--data-dir", str(data_dir),
                 "--config-dir", str(config_dir)])
    assert code == 0, capsys.readouterr().err
    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert events[0] == "pipeline_started"
    assert events[-1] == "pipeline_finished"
    assert not (data_dir / "run" / "orchestrator.json").exists()  # gone with the run

    capsys.readouterr()
    assert main(["status", "--json", "--data-dir", str(data_dir),
                 "--config-dir", str(config_dir)]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["status"] == {}  # nothing running now
    assert sorted(n["id"] for n in view["nodes"])[:1] == ["aws-node-1"]
    assert sum(n["chunks"] for n in view["nodes"]) > 0

    assert main(["status", "--data-dir", str(data_dir), "--config-dir", str(config_dir)]) == 0
    assert "nodes by cloud" in capsys.readouterr().out


async def test_demo_in_cluster_mode_kills_a_node_process_and_recovers(
        tmp_path: Path, config_dir: Path) -> None:
    (config_dir / "cluster_config.yml").write_text(
        "service: {heartbeat_interval_s: 0.2, failure_timeout_s: 1.0}\n")
    out = Console(record=True, width=110, file=io.StringIO())
    options = DemoOptions(workdir=tmp_path / "demo", config_dir=config_dir,
                          size=parse_size("6MiB"), cluster_mode=True)

    ok = await run_demo(options, out)

    text = " ".join(out.export_text().split())
    assert ok, text
    assert "real processes over HTTP" in text
    assert "killed aws-node-2" in text
    assert "with SIGKILL" in text
    assert "failure detected: aws-node-2 is unhealthy" in text
    assert "under-replicated chunks: 0" in text
    assert "byte-identical to the source: yes" in text
    run_dir = tmp_path / "demo" / "cluster-mode" / "run"
    assert not (run_dir / "cluster.json").exists()  # cluster down ran


async def test_demo_in_cluster_mode_on_three_nodes_restarts_the_killed_node(
        tmp_path: Path, config_dir: Path) -> None:
    (config_dir / "cluster_config.yml").write_text(
        "nodes_per_cloud: {aws: 2, gcp: 1}\n"
        "service: {heartbeat_interval_s: 0.2, failure_timeout_s: 1.0}\n")
    out = Console(record=True, width=110, file=io.StringIO())
    options = DemoOptions(workdir=tmp_path / "demo", config_dir=config_dir,
                          size=parse_size("6MiB"), cluster_mode=True)

    ok = await run_demo(options, out)

    text = " ".join(out.export_text().split())
    assert ok, text
    assert "killed aws-node-2" in text
    assert "restarting aws-node-2 with its data" in text
    assert "0 chunk(s) still hinted" in text
    assert "0 on the failed node, 0 missing or corrupt" in text
    assert "byte-identical to the source: yes" in text
    assert not (tmp_path / "demo" / "cluster-mode" / "run" / "cluster.json").exists()
