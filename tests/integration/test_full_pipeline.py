"""End to end on the embedded cluster: run a batch, then prove every byte came through."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cluster_fixtures import expected_chunks

from cluster_kinds import local_services
from multicloud import (
    ConfigError,
    NodeRegistry,
    PipelineConfig,
    PipelineOrchestrator,
    PipelineStatus,
    RestoreError,
    RestoreReport,
)
from multicloud.core.types import Stage

STAGES = [s.value for s in Stage]
ENCRYPT = {"transforms": ["validate", "compress", "encrypt"]}

Restorer = Callable[..., Awaitable[RestoreReport]]  # the assert_restored fixture




async def test_complete_pipeline_execution(setup_test_cluster: NodeRegistry,
                                           config: PipelineConfig,
                                           make_dataset: Callable[..., Path],
                                           monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    """Test complete end-to-end pipeline (the request's test, with exact rates)."""
    # Setup: the request's relative path, resolved against tmp_path.
    make_dataset("gcp_gcs_simulation")
    monkeypatch.chdir(tmp_path)
    node_registry = setup_test_cluster
    orchestrator = PipelineOrchestrator(node_registry, config=config)
    try:
        batch_config = {
            "batch_id": "test_batch_001",
            "data_source": "./test_data/gcp_gcs_simulation",
            "expected_size_mb": 500,
        }

        result = await orchestrator.run_pipeline(batch_config)

        assert result.status == "success", result.error
        assert result.chunks_processed > 0
        assert result.duration_seconds < 300  # Should complete in < 5 minutes

        # With no faults nothing may be lost or retried: the request's floors, and exactly 1.
        metrics = result.metrics
        assert metrics["ingestion"]["success_rate"] > 0.95
        assert metrics["processing"]["success_rate"] > 0.95
        assert metrics["distribution"]["replica_success_rate"] > 0.99
        assert metrics["storage"]["success_rate"] > 0.95
        assert metrics["ingestion"]["success_rate"] == 1.0
        assert metrics["processing"]["success_rate"] == 1.0
        assert metrics["distribution"]["replica_success_rate"] == 1.0
        assert metrics["storage"]["success_rate"] == 1.0
    finally:
        await orchestrator.close()


async def test_metrics_hold_every_documented_figure(orchestrator: PipelineOrchestrator,
                                                    make_dataset: Callable[..., Path]) -> None:
    source = make_dataset("gcp_gcs_simulation", seed=3)

    result = await orchestrator.run_pipeline({"batch_id": "metrics",
                                              "data_source": str(source)})

    assert result.status == "success", result.error
    metrics = result.metrics
    processing = metrics["processing"]
    for key in ("latency_p50_s", "latency_p95_s", "latency_p99_s"):
        assert processing[key] >= 0
    assert processing["latency_p50_s"] <= processing["latency_p95_s"] <= processing[
        "latency_p99_s"]
    distribution = metrics["distribution"]
    assert distribution["replica_success_rate"] == 1.0
    assert distribution["cross_cloud_transfers"] > 0  # min_clouds 2: every chunk crosses
    assert distribution["egress_cost_usd"] > 0
    assert sum(distribution["bytes_by_link"].values()) > result.bytes_processed
    storage = metrics["storage"]
    assert storage["under_replicated"] == 0
    assert set(storage["by_cloud"]) == {"aws", "gcp"}
    for cloud in ("aws", "gcp"):
        assert storage["by_cloud"][cloud]["chunk_count"] == result.chunks_processed
        assert storage["by_cloud"][cloud]["bytes"] > 0
    assert metrics["node_failures_handled"] == 0
    json.dumps(result.to_dict())  # the CLI prints it as JSON


async def test_result_fields_and_live_attributes(orchestrator: PipelineOrchestrator,
                                                 config: PipelineConfig,
                                                 make_dataset: Callable[..., Path]) -> None:
    source = make_dataset("aws_s3_simulation", size=3 * 1024 * 1024, seed=1)
    files = [p for p in source.rglob("*") if p.is_file()]
    seen: list[tuple[PipelineStatus, float, str | None]] = []
    orchestrator.add_progress_listener(
        lambda live: seen.append((live.status, live.progress_percent, live.batch_id)))
    assert (orchestrator.pipeline_status, orchestrator.progress_percent) == (
        PipelineStatus.IDLE, 0.0)

    result = await orchestrator.run_pipeline({"batch_id": "fields", "data_source": str(source)})

    assert result.status == "success", result.error
    assert result.error is None
    assert result.batch_id == "fields"
    assert result.files == len(files)
    assert result.bytes_processed == sum(p.stat().st_size for p in files)
    assert result.chunks_processed == expected_chunks(source, config.ingestion)
    assert result.duration_seconds > 0
    assert set(result.to_dict()) == {"status", "batch_id", "duration_seconds",
                                     "chunks_processed", "bytes_processed", "files",
                                     "metrics", "error"}

    # One listener call per committed chunk, while running, with progress never going back.
    assert len(seen) == result.chunks_processed
    assert all(status is PipelineStatus.RUNNING and batch == "fields"
               for status, _, batch in seen)
    progress = [p for _, p, _ in seen]
    assert progress == sorted(progress)
    assert progress[-1] == 100.0

    assert orchestrator.pipeline_status is PipelineStatus.COMPLETED
    assert orchestrator.progress_percent == 100
    assert orchestrator.current_throughput > 0
    assert orchestrator.current_stage is None
    assert orchestrator.live.eta_seconds is None
    assert orchestrator.estimated_completion is None
    assert orchestrator.healthy_nodes == 6
    assert orchestrator.unhealthy_nodes == 0
    breakdown = orchestrator.metrics.get_stage_breakdown()
    assert list(breakdown) == STAGES
    assert all(seconds >= 0 for seconds in breakdown.values())
    assert breakdown["processing"] > 0


async def test_wait_for_progress_returns_once_reached(orchestrator: PipelineOrchestrator,
                                                      make_dataset: Callable[..., Path],
                                                      ) -> None:
    source = make_dataset("aws_s3_simulation", seed=2)
    run = asyncio.create_task(orchestrator.run_pipeline({"batch_id": "wait",
                                                         "data_source": str(source)}))
    await orchestrator.wait_for_progress(50)
    assert orchestrator.progress_percent >= 50
    result = await run
    assert result.status == "success", result.error
    await orchestrator.wait_for_progress(100)  # already done: returns at once


async def test_every_file_restores_byte_exact(orchestrator: PipelineOrchestrator,
                                              make_dataset: Callable[..., Path],
                                              assert_restored: Restorer,
                                              tmp_path: Path) -> None:
    source = make_dataset("gcp_gcs_simulation", seed=4)
    # The dataset has what restore must get right: an empty file and nested folders.
    assert (source / "misc" / "empty.txt").stat().st_size == 0
    assert any(len(p.relative_to(source).parts) >= 4 for p in source.rglob("*.jsonl"))

    result = await orchestrator.run_pipeline({"batch_id": "restore", "data_source": str(source)})
    assert result.status == "success", result.error

    dest = tmp_path / "restored"
    report = await assert_restored(orchestrator, "restore", source, dest)
    assert report.skipped_replicas == []
    assert (dest / "misc" / "empty.txt").read_bytes() == b""
    verify = await orchestrator.verify_batch("restore")
    assert verify.ok, verify.problems
    assert verify.chunks == result.chunks_processed
    # Every chunk's three replicas, and the three of the batch's manifest on the nodes.
    assert verify.replicas_checked == verify.replicas_ok == 3 * (result.chunks_processed + 1)


async def test_every_chunk_has_three_replicas_spanning_two_clouds(
        orchestrator: PipelineOrchestrator, node_registry: NodeRegistry,
        make_dataset: Callable[..., Path]) -> None:
    source = make_dataset("aws_s3_simulation", seed=5)
    result = await orchestrator.run_pipeline({"batch_id": "rf", "data_source": str(source)})
    assert result.status == "success", result.error
    assert result.metrics["storage"]["under_replicated"] == 0

    manifest = orchestrator.storage_manager.manifest
    ids = manifest.chunk_ids("rf")
    assert len(ids) == result.chunks_processed
    replicas = manifest.replicas(ids)
    for chunk_id in ids:
        holders = replicas[chunk_id]
        assert len(holders) == 3, (chunk_id, holders)
        clouds = {node_registry.nodes[n].cloud for n in holders}
        assert clouds == {"aws", "gcp"}, (chunk_id, holders)
        # The manifest is not just bookkeeping: every listed node holds the object.
        for node_id in holders:
            assert local_services(node_registry)[node_id].has(chunk_id)


async def test_rerun_of_a_batch_id_succeeds_on_the_same_nodes(
        orchestrator: PipelineOrchestrator, make_dataset: Callable[..., Path],
        assert_restored: Restorer) -> None:
    source = make_dataset("aws_s3_simulation", seed=6)
    batch = {"batch_id": "again", "data_source": str(source)}
    manifest = orchestrator.storage_manager.manifest

    first = await orchestrator.run_pipeline(batch)
    assert first.status == "success", first.error
    placed = manifest.replicas(manifest.chunk_ids("again"))

    second = await orchestrator.run_pipeline(batch)
    assert second.status == "success", second.error
    assert second.chunks_processed == first.chunks_processed
    assert second.metrics["distribution"]["replica_success_rate"] == 1.0
    # Rendezvous placement: the same chunks land on the same nodes, nothing new is added.
    assert manifest.replicas(manifest.chunk_ids("again")) == placed
    assert [b.batch_id for b in manifest.batches()].count("again") == 1
    assert manifest.batch("again").status == "success"
    await assert_restored(orchestrator, "again", source)


async def test_encrypted_run_restores_byte_exact(make_orchestrator: Callable[...,
                                                                             PipelineOrchestrator],
                                                 make_dataset: Callable[..., Path],
                                                 assert_restored: Restorer,
                                                 node_registry: NodeRegistry,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("MULTICLOUD_ENCRYPTION_KEY", os.urandom(32).hex())
    orchestrator = make_orchestrator(processing=ENCRYPT)
    source = make_dataset("gcp_gcs_simulation", seed=7)

    result = await orchestrator.run_pipeline({"batch_id": "sealed", "data_source": str(source)})

    assert result.status == "success", result.error
    assert result.metrics["processing"]["success_rate"] == 1.0
    records = orchestrator.storage_manager.manifest.chunks("sealed")
    assert records
    assert all(r.codec.endswith("+aes256gcm") for r in records)
    # No stored object contains a recognisable piece of the plaintext.
    sample = next(p for p in sorted(source.rglob("*.jsonl")) if p.stat().st_size > 200)
    needle = sample.read_bytes()[:64]
    for service in local_services(node_registry).values():
        for path in service.store.root.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes()
    await assert_restored(orchestrator, "sealed", source)

    # Without the key the blobs cannot be read, and restore says so instead of writing junk.
    monkeypatch.delenv("MULTICLOUD_ENCRYPTION_KEY")
    with pytest.raises(ConfigError, match="MULTICLOUD_ENCRYPTION_KEY"):
        await orchestrator.restore_batch("sealed", tmp_path / "no-key")


async def test_encryption_without_a_key_fails_the_run_cleanly(
        make_orchestrator: Callable[..., PipelineOrchestrator],
        make_dataset: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTICLOUD_ENCRYPTION_KEY", raising=False)
    orchestrator = make_orchestrator(processing=ENCRYPT)
    source = make_dataset("aws_s3_simulation", size=256 * 1024)

    result = await orchestrator.run_pipeline({"batch_id": "nokey", "data_source": str(source)})

    assert result.status == "failed"
    assert "MULTICLOUD_ENCRYPTION_KEY" in (result.error or "")
    assert orchestrator.pipeline_status is PipelineStatus.FAILED


async def test_single_file_source(orchestrator: PipelineOrchestrator, config: PipelineConfig,
                                  assert_restored: Restorer,
                                  tmp_path: Path) -> None:
    chunk = config.ingestion.chunk_size_bytes
    source = tmp_path / "aws_s3_simulation" / "one.bin"
    source.parent.mkdir()
    source.write_bytes(os.urandom(2 * chunk + 123))

    result = await orchestrator.run_pipeline({"batch_id": "single", "data_source": str(source)})

    assert result.status == "success", result.error
    assert result.files == 1
    assert result.chunks_processed == 3
    assert result.bytes_processed == 2 * chunk + 123
    await assert_restored(orchestrator, "single", source)


async def test_invalid_jsonl_line_fails_the_run(
        make_orchestrator: Callable[..., PipelineOrchestrator], tmp_path: Path) -> None:
    orchestrator = make_orchestrator(processing={"on_invalid_records": "fail"})
    source = tmp_path / "aws_s3_simulation"
    (source / "logs").mkdir(parents=True)
    (source / "blob.bin").write_bytes(os.urandom(10_000))
    lines = [json.dumps({"n": i, "msg": "ok"}).encode() for i in range(200)]
    lines[120] = b'{"n": 120, "msg": "truncated'
    (source / "logs" / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    result = await orchestrator.run_pipeline({"batch_id": "bad", "data_source": str(source)})

    assert result.status == "failed"
    assert result.error is not None
    assert "logs/bad.jsonl" in result.error
    assert "line 121" in result.error
    assert orchestrator.pipeline_status is PipelineStatus.FAILED
    assert result.metrics["processing"]["success_rate"] < 1.0
    manifest = orchestrator.storage_manager.manifest
    assert manifest.batch("bad").status == "failed"
    recorded = manifest.batch("bad").result
    assert recorded is not None
    assert recorded["error"] == result.error
    with pytest.raises(RestoreError, match="bad"):
        await orchestrator.restore_batch("bad", tmp_path / "restored")
    assert not (tmp_path / "restored" / "blob.bin").exists()


async def test_missing_source_fails_before_anything_is_recorded(
        orchestrator: PipelineOrchestrator, tmp_path: Path) -> None:
    result = await orchestrator.run_pipeline({"batch_id": "nothing",
                                              "data_source": str(tmp_path / "absent")})

    assert result.status == "failed"
    assert "does not exist" in (result.error or "")
    assert "nothing" not in [b.batch_id for b in orchestrator.storage_manager.manifest.batches()]


def write_duplicates(root: Path, chunk: int) -> None:
    """Many files with identical content: identical chunks share one chunk id."""
    root.mkdir(parents=True)
    block = os.urandom(chunk)
    for i in range(30):
        (root / f"tiny-{i:02d}.bin").write_bytes(b"\0")
        (root / f"big-{i:02d}.bin").write_bytes(block * 3 + b"end")


async def test_identical_chunks_in_one_batch_restore_byte_exact(
        orchestrator: PipelineOrchestrator, config: PipelineConfig,
        assert_restored: Restorer, tmp_path: Path) -> None:
    source = tmp_path / "aws_s3_simulation"
    write_duplicates(source, config.ingestion.chunk_size_bytes)

    result = await orchestrator.run_pipeline({"batch_id": "dups", "data_source": str(source)})

    assert result.status == "success", result.error
    assert result.chunks_processed == 30 * 4 + 1  # the 30 one-byte files share a pack
    assert len(set(orchestrator.storage_manager.manifest.chunk_ids("dups"))) == 3
    assert result.metrics["storage"]["under_replicated"] == 0
    await assert_restored(orchestrator, "dups", source)


async def test_identical_chunks_in_one_batch_need_no_retries(
        orchestrator: PipelineOrchestrator, config: PipelineConfig, tmp_path: Path) -> None:
    source = tmp_path / "aws_s3_simulation"
    write_duplicates(source, config.ingestion.chunk_size_bytes)

    result = await orchestrator.run_pipeline({"batch_id": "dups", "data_source": str(source)})

    assert result.status == "success", result.error
    assert result.metrics["distribution"]["replica_failures"] == 0
    assert result.metrics["distribution"]["replica_success_rate"] == 1.0


@pytest.mark.parametrize("where", ["starts_at_boundary", "straddles_boundary"])
async def test_invalid_jsonl_line_at_a_chunk_boundary_fails_the_run(
        make_orchestrator: Callable[..., PipelineOrchestrator], config: PipelineConfig,
        tmp_path: Path, where: str) -> None:
    orchestrator = make_orchestrator(processing={"on_invalid_records": "fail"})
    chunk = config.ingestion.chunk_size_bytes
    line = b'{"k": "' + b"a" * 1014 + b'"}\n'
    assert chunk % len(line) == 0
    good = line * (chunk // len(line))  # ends exactly at the chunk boundary
    bad = b'{"broken": ' + b"x" * 1000 + b"\n"
    if where == "starts_at_boundary":
        data = good + bad + line * 10
    else:
        data = good[:-512] + bad + line * 10
    source = tmp_path / "aws_s3_simulation"
    source.mkdir()
    (source / "edge.jsonl").write_bytes(data)

    result = await orchestrator.run_pipeline({"batch_id": where, "data_source": str(source)})

    assert result.status == "failed"
    assert "edge.jsonl" in (result.error or "")


async def test_cancelled_run_leaves_the_orchestrator_usable(
        orchestrator: PipelineOrchestrator, make_dataset: Callable[..., Path]) -> None:
    source = make_dataset("aws_s3_simulation", seed=8)
    batch = {"batch_id": "cancelled", "data_source": str(source)}
    task = asyncio.create_task(orchestrator.run_pipeline(batch))
    await orchestrator.wait_for_progress(30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert orchestrator.pipeline_status is not PipelineStatus.RUNNING
    assert orchestrator.storage_manager.manifest.batch("cancelled").status == "interrupted"
    again = await orchestrator.run_pipeline(batch)
    assert again.status == "success", again.error
    # The second run resumed: what the first committed was neither read nor sent again.
    assert again.metrics["resumed_chunks"] > 0


async def test_a_new_run_knows_what_nodes_already_hold(
        setup_test_cluster: NodeRegistry, config: PipelineConfig,
        make_dataset: Callable[..., Path]) -> None:
    """Placement's room check sees the data earlier runs (or processes) stored."""
    first = PipelineOrchestrator(setup_test_cluster, config=config)
    try:
        done = await first.run_pipeline({"batch_id": "earlier",
                                         "data_source": str(make_dataset("earlier"))})
        assert done.status == "success", done.error
        held = first.storage_manager.manifest.node_usage()
    finally:
        await first.close()
    for node in setup_test_cluster.nodes.values():
        node.used_bytes = 0  # as in a new process
    second = PipelineOrchestrator(setup_test_cluster, config=config)
    try:
        result = await second.run_pipeline({"batch_id": "later", "data_source": str(
            make_dataset("later", size=64 * 1024, seed=9))})
    finally:
        await second.close()
    assert result.status == "success", result.error
    for node_id, (_, nbytes) in held.items():
        assert setup_test_cluster.nodes[node_id].used_bytes >= nbytes


async def test_a_directory_where_a_file_goes_is_one_restore_error(
        orchestrator: PipelineOrchestrator, tmp_path: Path) -> None:
    """The other files come back; the one in the way is named, with no temp file left."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_bytes(b"alpha\n")
    (source / "b.txt").write_bytes(b"beta\n")
    result = await orchestrator.run_pipeline({"batch_id": "way", "data_source": str(source)})
    assert result.status == "success", result.error
    dest = tmp_path / "restored"
    (dest / "b.txt").mkdir(parents=True)  # in the way

    with pytest.raises(RestoreError, match=r"b\.txt"):
        await orchestrator.restore_batch("way", dest)

    assert (dest / "a.txt").read_bytes() == b"alpha\n"
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "b.txt"]
