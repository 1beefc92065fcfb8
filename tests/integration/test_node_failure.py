"""Failure handling: nodes fail at exact points of a run, replicas rot or vanish, clouds split.

Every fault is injected at a progress point or a held write, never after a fixed sleep,
and every test runs twice: on the embedded cluster and on the same nodes over HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cluster_kinds import KINDS, make_cluster, temp_files
from multicloud import (
    Cluster,
    NodeRegistry,
    NodeStatus,
    PipelineConfig,
    PipelineOrchestrator,
    PipelineStatus,
    RestoreError,
    RestoreReport,
)
from multicloud.run.live import LiveView

Restorer = Callable[..., Awaitable[RestoreReport]]  # the assert_restored fixture


@pytest.fixture(params=KINDS)
async def node_registry(request: pytest.FixtureRequest,
                        tmp_path: Path) -> AsyncIterator[Cluster]:
    """3 AWS and 3 GCP nodes, in-process or over HTTP (the test id says which)."""
    cluster = await make_cluster(request.param, tmp_path / "cluster", {"aws": 3, "gcp": 3})
    yield cluster
    await cluster.close()


@pytest.fixture
async def orchestrator(node_registry: Cluster,
                       config: PipelineConfig) -> AsyncIterator[PipelineOrchestrator]:
    """An orchestrator with 64 KiB chunks on the cluster of the test's kind."""
    orch = PipelineOrchestrator(node_registry, config=config)
    yield orch
    await orch.close()


def healthy_replicas(orchestrator: PipelineOrchestrator, registry: NodeRegistry,
                     batch_id: str) -> dict[str, list[str]]:
    """Chunk id -> the nodes holding it that are in service."""
    manifest = orchestrator.storage_manager.manifest
    replicas = manifest.replicas(manifest.chunk_ids(batch_id))
    return {chunk_id: [n for n in holders if registry.nodes[n].healthy]
            for chunk_id, holders in replicas.items()}


def assert_fully_replicated(orchestrator: PipelineOrchestrator, registry: NodeRegistry,
                            batch_id: str, chunks: int) -> None:
    """Every chunk has >= 3 replicas on healthy nodes, in both clouds."""
    holders = healthy_replicas(orchestrator, registry, batch_id)
    assert len(holders) == chunks
    for chunk_id, nodes in holders.items():
        assert len(nodes) >= 3, (chunk_id, nodes)
        assert {registry.nodes[n].cloud for n in nodes} == {"aws", "gcp"}, (chunk_id, nodes)


async def test_pipeline_continues_with_node_failure(node_registry: NodeRegistry,
                                                    orchestrator: PipelineOrchestrator,
                                                    make_dataset: Callable[..., Path],
                                                    assert_restored: Restorer,
                                                    ) -> None:
    """Test pipeline handles node failure gracefully (the request's test, on progress)."""
    source = make_dataset("aws_s3_simulation", size=3 * 1024 * 1024, seed=21)
    test_config = {"batch_id": "node_failure", "data_source": str(source)}
    killed_at: list[float] = []

    def kill_at_half(orch: LiveView) -> None:
        # Kill one node at exactly 50% completion (instead of sleeping and hoping).
        if not killed_at and orch.progress_percent >= 50:
            node_registry.nodes["aws-node-2"].status = "unhealthy"
            killed_at.append(orch.progress_percent)

    orchestrator.add_progress_listener(kill_at_half)

    # Start pipeline
    pipeline_task = asyncio.create_task(orchestrator.run_pipeline(test_config))

    # Pipeline should complete despite failure
    result = await pipeline_task

    assert result.status == "success", result.error
    assert "node_failures_handled" in result.metrics
    assert 50 <= killed_at[0] < 100
    assert result.metrics["node_failures_handled"] >= 1
    assert result.metrics["storage"]["under_replicated"] == 0
    assert orchestrator.unhealthy_nodes == 1
    kinds = [(e["kind"], e["detail"].split()[0]) for e in result.metrics["events"]]
    assert ("node_unhealthy", "aws-node-2") in kinds
    assert_fully_replicated(orchestrator, node_registry, "node_failure",
                            result.chunks_processed)
    # Chunks committed after the failure never went to aws-node-2.
    manifest = orchestrator.storage_manager.manifest
    assert len(manifest.chunks_on_node("aws-node-2")) < result.chunks_processed
    await assert_restored(orchestrator, "node_failure", source)


async def test_node_crash_mid_run_is_detected_and_survived(node_registry: NodeRegistry,
                                                           orchestrator: PipelineOrchestrator,
                                                           make_dataset: Callable[..., Path],
                                                           assert_restored: Restorer,
                                                           ) -> None:
    """A crash nobody reports: failed transfers mark the node unhealthy, the run goes on."""
    faults = node_registry.faults
    source = make_dataset("aws_s3_simulation", size=3 * 1024 * 1024, seed=22)
    task = asyncio.create_task(orchestrator.run_pipeline({"batch_id": "crash",
                                                          "data_source": str(source)}))
    await orchestrator.wait_for_progress(50)
    assert orchestrator.pipeline_status is PipelineStatus.RUNNING
    await faults.crash("aws-node-2")

    result = await task

    assert result.status == "success", result.error
    assert node_registry.nodes["aws-node-2"].status == "unhealthy"
    assert result.metrics["node_failures_handled"] >= 1
    assert result.metrics["storage"]["under_replicated"] == 0
    assert_fully_replicated(orchestrator, node_registry, "crash", result.chunks_processed)
    await assert_restored(orchestrator, "crash", source)

    await faults.restart("aws-node-2")
    assert node_registry.nodes["aws-node-2"].status == "healthy"
    verify = await orchestrator.verify_batch("crash")
    assert verify.ok, verify.problems[:3]


@pytest.mark.parametrize("how", ["crash_during_write", "hold_then_crash"])
async def test_node_crashing_mid_write_leaves_no_partial_object(
        node_registry: NodeRegistry, orchestrator: PipelineOrchestrator,
        make_dataset: Callable[..., Path], assert_restored: Restorer,
        how: str) -> None:
    faults = node_registry.faults
    gcp1 = node_registry.get("gcp-node-1")
    source = make_dataset("aws_s3_simulation", size=1024 * 1024, seed=23)
    batch = {"batch_id": how, "data_source": str(source)}
    if how == "crash_during_write":
        await faults.crash_during_write("gcp-node-1")
        result = await orchestrator.run_pipeline(batch)
        assert temp_files(node_registry, "gcp-node-1") == ["interrupted-write.partial"]
    else:
        gate = await faults.hold_writes("gcp-node-1")
        task = asyncio.create_task(orchestrator.run_pipeline(batch))
        arrived = asyncio.create_task(gate.arrived())
        # Wake when a write to gcp-node-1 is in flight, held at the node (or, if the run
        # ended without one, fail instead of waiting forever).
        await asyncio.wait({arrived, task}, return_when=asyncio.FIRST_COMPLETED)
        arrived.cancel()
        await asyncio.gather(arrived, return_exceptions=True)
        assert await gate.held() >= 1, "no write reached gcp-node-1"
        await faults.crash("gcp-node-1")
        await gate.release()
        result = await task
    assert (await faults.state("gcp-node-1"))["crashed"]

    assert result.status == "success", result.error
    assert result.metrics["storage"]["under_replicated"] == 0
    await assert_restored(orchestrator, how, source)

    await faults.restart("gcp-node-1")
    assert temp_files(node_registry, "gcp-node-1") == []  # the interrupted write is gone
    # Whatever the node holds is whole: every object on it verifies.
    client = node_registry.client
    for chunk_id in await client.inventory(gcp1):
        assert await client.check(gcp1, chunk_id) == "ok"
    verify = await orchestrator.verify_batch(how)
    assert verify.ok, verify.problems[:3]


async def test_corrupt_replica_is_reported_and_skipped(node_registry: NodeRegistry,
                                                       orchestrator: PipelineOrchestrator,
                                                       make_dataset: Callable[..., Path],
                                                       assert_restored: Restorer,
                                                       ) -> None:
    source = make_dataset("aws_s3_simulation", size=1024 * 1024, seed=24)
    result = await orchestrator.run_pipeline({"batch_id": "rot", "data_source": str(source)})
    assert result.status == "success", result.error
    manifest = orchestrator.storage_manager.manifest
    chunk_id = manifest.chunk_ids("rot")[0]
    holders = manifest.replicas([chunk_id])[chunk_id]
    # Rot both AWS copies: a restore (nearest replica first, AWS by default) must skip both.
    rotten = sorted((chunk_id, n) for n in holders if node_registry.nodes[n].cloud == "aws")
    assert len(rotten) == 2
    for _, node_id in rotten:
        await node_registry.faults.corrupt(node_id, chunk_id)

    verify = await orchestrator.verify_batch("rot")

    assert not verify.ok
    assert sorted((p.chunk_id, p.node_id) for p in verify.problems) == rotten
    assert {p.problem for p in verify.problems} == {"corrupt"}
    assert verify.replicas_ok == verify.replicas_checked - 2

    report = await assert_restored(orchestrator, "rot", source)
    assert sorted((p.chunk_id, p.node_id) for p in report.skipped_replicas) == rotten
    assert {p.problem for p in report.skipped_replicas} == {"corrupt"}


async def test_lost_replica_is_reported_missing(node_registry: NodeRegistry,
                                                orchestrator: PipelineOrchestrator,
                                                make_dataset: Callable[..., Path],
                                                assert_restored: Restorer) -> None:
    source = make_dataset("aws_s3_simulation", size=1024 * 1024, seed=25)
    result = await orchestrator.run_pipeline({"batch_id": "lost", "data_source": str(source)})
    assert result.status == "success", result.error
    manifest = orchestrator.storage_manager.manifest
    chunk_id = manifest.chunk_ids("lost")[-1]
    node_id = manifest.replicas([chunk_id])[chunk_id][0]
    assert await node_registry.faults.lose(node_id, chunk_id)

    verify = await orchestrator.verify_batch("lost")

    assert not verify.ok
    assert [(p.chunk_id, p.node_id, p.problem) for p in verify.problems] == [
        (chunk_id, node_id, "missing")]
    report = await assert_restored(orchestrator, "lost", source)
    assert all(p.problem == "missing" for p in report.skipped_replicas)


async def test_partition_between_clouds_mid_run_ends_coherently(
        node_registry: NodeRegistry, orchestrator: PipelineOrchestrator,
        make_dataset: Callable[..., Path], assert_restored: Restorer,
        tmp_path: Path) -> None:
    """min_clouds 2 cannot be met across a partition: fail cleanly, or finish at full RF in
    the clouds that are reachable (min_clouds is relaxed, the chunks are hinted), and the
    spread comes back with the network."""
    faults = node_registry.faults
    source = make_dataset("aws_s3_simulation", size=1024 * 1024, seed=26)
    batch = {"batch_id": "split", "data_source": str(source)}
    task = asyncio.create_task(orchestrator.run_pipeline(batch))
    await orchestrator.wait_for_progress(30)
    assert orchestrator.pipeline_status is PipelineStatus.RUNNING
    await faults.partition("aws", "gcp")
    result = await task  # must return, not raise

    manifest = orchestrator.storage_manager.manifest
    assert result.status in ("success", "failed")
    assert manifest.batch("split").status == result.status
    if result.status == "failed":
        assert orchestrator.pipeline_status is PipelineStatus.FAILED
        assert result.error
        with pytest.raises(RestoreError):
            await orchestrator.restore_batch("split", tmp_path / "partial")
    else:
        holders = healthy_replicas(orchestrator, node_registry, "split")
        assert len(holders) == result.chunks_processed
        assert all(len(nodes) >= 3 for nodes in holders.values()), holders
        await assert_restored(orchestrator, "split", source)

    # Once the network heals, the hints are replayed (the orchestrator does so when a node
    # comes back) and the same batch runs through and restores exactly.
    await faults.heal()
    for node in node_registry.nodes.values():
        if not node.healthy:
            node.set_status(NodeStatus.HEALTHY, "partition healed")
    await orchestrator.repairer.replay_hints()
    again = await orchestrator.run_pipeline(batch)
    assert again.status == "success", again.error
    assert manifest.batch("split").status == "success"
    assert_fully_replicated(orchestrator, node_registry, "split", again.chunks_processed)
    await assert_restored(orchestrator, "split", source)


async def test_repair_recreates_replicas_of_a_lost_node(node_registry: NodeRegistry,
                                                        orchestrator: PipelineOrchestrator,
                                                        make_dataset: Callable[..., Path],
                                                        assert_restored: Restorer,
                                                        ) -> None:
    source = make_dataset("aws_s3_simulation", size=1024 * 1024, seed=27)
    result = await orchestrator.run_pipeline({"batch_id": "heal", "data_source": str(source)})
    assert result.status == "success", result.error
    storage = orchestrator.storage_manager
    ids = storage.manifest.chunk_ids("heal")
    on_lost = storage.manifest.chunks_on_node("aws-node-1")
    assert on_lost  # the node held part of the batch

    # The node is gone for good: its process and its disk.
    await node_registry.faults.crash("aws-node-1")
    node_registry.nodes["aws-node-1"].status = "unhealthy"
    assert await storage.under_replicated(ids) == len(set(on_lost) & set(ids))

    report = await orchestrator.repairer.repair(ids)
    await storage.flush()

    assert report.checked == len(ids)
    assert report.replicas_created == len(set(on_lost) & set(ids))
    assert report.lost == 0
    assert report.under_replicated == 0
    assert await storage.under_replicated(ids) == 0
    assert_fully_replicated(orchestrator, node_registry, "heal", len(ids))
    for chunk_id, nodes in healthy_replicas(orchestrator, node_registry, "heal").items():
        assert len(nodes) == 3, chunk_id
        assert "aws-node-1" not in nodes
    await assert_restored(orchestrator, "heal", source)
    # A second pass has nothing left to do.
    again = await orchestrator.repairer.repair(ids)
    assert again.replicas_created == 0
