"""Quorum means quorum: with a node of three down, a batch commits at write quorum, reports
its under-replicated chunks, keeps a hint for each missing replica, and a hint replay brings
every chunk to the replication factor once the node is back, without a rerun.

The cluster is the user's walkthrough: aws, gcp, aws (RF 3, quorum 2, min_clouds 2).
Faults strike before the run or at a progress point, never after a sleep; every test runs
on the embedded cluster and on the same nodes over HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from rich.console import Console

from cluster_kinds import KINDS, make_cluster
from multicloud import (
    Cluster,
    NodeStatus,
    PipelineConfig,
    PipelineOrchestrator,
    PipelineResult,
    create_local_cluster,
)
from multicloud.control.registry import WorkerNode
from multicloud.core.errors import StorageError
from multicloud.pipeline.placement import rank_nodes
from multicloud.pipeline.repair import HintReplays
from multicloud.ui.render import print_summary

VICTIM = "aws-node-2"
RF = 3


@pytest.fixture(params=KINDS)
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    """aws-node-1, aws-node-2 and gcp-node-1, in-process or over HTTP."""
    made = await make_cluster(request.param, tmp_path / "cluster", {"aws": 2, "gcp": 1})
    yield made
    await made.close()


@pytest.fixture
async def orchestrator(cluster: Cluster,
                       config: PipelineConfig) -> AsyncIterator[PipelineOrchestrator]:
    """The default policy (RF 3, quorum 2, 2 clouds) with 64 KiB chunks."""
    dist = config.distribution
    assert (dist.replication_factor, dist.write_quorum, dist.min_clouds) == (RF, 2, 2)
    orch = PipelineOrchestrator(cluster, config=config)
    yield orch
    await orch.close()


def chunk_ids(orchestrator: PipelineOrchestrator, batch_id: str) -> list[str]:
    """The batch's distinct chunk ids."""
    return orchestrator.storage_manager.manifest.chunk_ids(batch_id)


def stored_ids(orchestrator: PipelineOrchestrator, batch_id: str) -> list[str]:
    """The batch's chunk ids and its manifest object's: what the nodes keep for it."""
    manifest = orchestrator.storage_manager.manifest
    manifest_object = manifest.batch(batch_id).manifest_object
    assert manifest_object is not None
    return [*manifest.chunk_ids(batch_id), manifest_object]


def hints(orchestrator: PipelineOrchestrator) -> dict[str, list[str]]:
    """Chunk id -> hinted node ids, as the manifest has them."""
    return orchestrator.storage_manager.manifest.hints()


def events(result: PipelineResult, kind: str) -> list[dict[str, object]]:
    """The run's events of one kind."""
    return [e for e in result.metrics["events"] if e["kind"] == kind]


async def assert_back_at_rf(orchestrator: PipelineOrchestrator, cluster: Cluster,
                            batch_id: str) -> None:
    """Every chunk (the manifest object too) has RF verified replicas on healthy nodes, and
    no hint is left."""
    ids = stored_ids(orchestrator, batch_id)
    holders = orchestrator.storage_manager.manifest.replicas(ids)
    assert all(len(nodes) == RF for nodes in holders.values()), holders
    assert all(cluster.nodes[n].healthy for nodes in holders.values() for n in nodes)
    assert all({cluster.nodes[n].cloud for n in nodes} == {"aws", "gcp"}
               for nodes in holders.values())
    verify = await orchestrator.verify_batch(batch_id)
    assert verify.problems == []
    assert verify.replicas_ok >= RF * len(ids)
    assert hints(orchestrator) == {}


@pytest.mark.parametrize("victim", [VICTIM, "gcp-node-1"], ids=["aws-down", "gcp-down"])
async def test_a_node_down_before_the_run_commits_at_quorum_and_hints_every_chunk(
        cluster: Cluster, orchestrator: PipelineOrchestrator,
        make_dataset: Callable[..., Path], victim: str) -> None:
    """With gcp-node-1 down, its whole cloud is: min_clouds is relaxed to aws alone, and
    the replay puts each chunk's third replica in gcp."""
    source = make_dataset("crashed_before", size=1024 * 1024, seed=81)
    await cluster.faults.crash(victim)

    result = await orchestrator.run_pipeline({"batch_id": "b1", "data_source": str(source)})

    assert result.status == "success", result.error
    ids = chunk_ids(orchestrator, "b1")
    assert len(ids) > 4
    assert cluster.nodes[victim].status == "unhealthy"
    assert result.metrics["storage"]["under_replicated"] == len(ids)
    holders = orchestrator.storage_manager.manifest.replicas(ids)
    survivors = sorted(n for n in cluster.nodes if n != victim)
    assert all(nodes == survivors for nodes in holders.values())
    hinted = hints(orchestrator)
    assert sorted(hinted) == sorted(stored_ids(orchestrator, "b1"))
    assert {n for nodes in hinted.values() for n in nodes} <= {victim, "*"}
    (short,) = events(result, "under_replicated")
    assert f"{len(ids)} chunk(s) committed with fewer than 3 replicas" in str(short["detail"])
    out = Console(record=True, width=200, file=io.StringIO())
    print_summary(out, result)
    assert f"warning: {len(ids)} chunk(s) have fewer healthy replicas" in out.export_text()

    await cluster.faults.restart(victim)
    report = await orchestrator.repairer.replay_hints()

    assert report.replicas_created == len(ids) + 1  # and the manifest object's
    assert report.hints_left == 0
    await assert_back_at_rf(orchestrator, cluster, "b1")


async def test_a_node_crashing_mid_run_leaves_the_batch_whole_and_hinted(
        cluster: Cluster, orchestrator: PipelineOrchestrator,
        make_dataset: Callable[..., Path]) -> None:
    source = make_dataset("crash_mid_run", size=3 * 1024 * 1024, seed=82)
    run = asyncio.create_task(orchestrator.run_pipeline({"batch_id": "mid",
                                                         "data_source": str(source)}))
    await orchestrator.wait_for_progress(50)
    assert orchestrator.live.running, "the run ended before the crash: the test proves nothing"
    await cluster.faults.crash(VICTIM)

    result = await run

    assert result.status == "success", result.error
    ids = chunk_ids(orchestrator, "mid")
    # Chunks written before the crash have a replica on the crashed node, the rest none:
    # every chunk is short of RF on healthy nodes, and hinted.
    assert result.metrics["storage"]["under_replicated"] == len(ids)
    assert result.metrics["node_failures_handled"] >= 1
    assert events(result, "under_replicated")
    assert sorted(hints(orchestrator)) == sorted(stored_ids(orchestrator, "mid"))

    # The lead's trigger, as the orchestrator wires it: a node back to healthy replays.
    replays = HintReplays(orchestrator.repairer)

    def on_status(node: WorkerNode, old: NodeStatus, reason: str) -> None:
        if node.status is NodeStatus.HEALTHY and old is not NodeStatus.HEALTHY:
            replays.start()

    unsubscribe = cluster.subscribe(on_status)
    try:
        await cluster.faults.restart(VICTIM)
        await replays.settle()
    finally:
        unsubscribe()
    assert replays.last is not None
    assert replays.last.hints_left == 0
    await assert_back_at_rf(orchestrator, cluster, "mid")


async def test_one_healthy_node_of_three_is_below_quorum_and_fails_clearly(
        cluster: Cluster, orchestrator: PipelineOrchestrator,
        make_dataset: Callable[..., Path]) -> None:
    source = make_dataset("too_few", size=256 * 1024, seed=83)
    for node_id in (VICTIM, "gcp-node-1"):
        cluster.nodes[node_id].status = "unhealthy"

    result = await orchestrator.run_pipeline({"batch_id": "few", "data_source": str(source)})

    assert result.status == "failed"
    assert result.error is not None
    for needle in ("replication_factor is 3", "write_quorum 2", "only 1 healthy node(s)",
                   "aws-node-1", "start more nodes or lower write_quorum"):
        assert needle in result.error
    assert hints(orchestrator) == {}


async def test_two_nodes_crashing_mid_run_fail_the_batch_at_quorum(
        cluster: Cluster, orchestrator: PipelineOrchestrator,
        make_dataset: Callable[..., Path]) -> None:
    source = make_dataset("two_crash", size=3 * 1024 * 1024, seed=84)
    run = asyncio.create_task(orchestrator.run_pipeline({"batch_id": "two",
                                                         "data_source": str(source)}))
    await orchestrator.wait_for_progress(30)
    assert orchestrator.live.running, "the run ended before the crash: the test proves nothing"
    await asyncio.gather(cluster.faults.crash(VICTIM), cluster.faults.crash("gcp-node-1"))

    result = await run

    assert result.status == "failed"
    assert "write_quorum" in (result.error or ""), result.error


@pytest.fixture
async def six(tmp_path: Path) -> AsyncIterator[Cluster]:
    """3 AWS and 3 GCP nodes, in-process."""
    made = create_local_cluster(tmp_path / "six", {"aws": 3, "gcp": 3})
    yield made
    await made.close()


async def test_repair_beside_an_inflight_write_leaves_no_fourth_replica(
        six: Cluster, config: PipelineConfig, tmp_path: Path) -> None:
    """The third write of a committed chunk is held at its node while repair runs: repair
    counts it as a holder (the orchestrator wires `in_flight` so), so the chunk ends with
    exactly RF healthy replicas, not RF + 1."""
    data = os.urandom(300_000)
    source = tmp_path / "one"
    source.mkdir()
    (source / "f.bin").write_bytes(data)
    chunk_id = hashlib.sha256(data).hexdigest()
    # Long timeouts: the held write must stay in flight, not time out and be re-placed;
    # no automatic repair, so that the repair below is the only one.
    orch = PipelineOrchestrator(six, config=config.replace(
        ingestion={"chunk_size_mb": 1}, storage={"repair": False},
        distribution={"timeouts": {"min_s": 60.0, "max_s": 120.0}}))
    orch.repairer.in_flight = lambda c: [*orch.distribution_coordinator.writing(c),
                                         *orch.storage_manager.unrecorded(c)]
    src = rank_nodes(chunk_id, six.healthy_nodes("aws"))[0].id
    targets = orch.distribution_coordinator.placement.select_target_nodes(chunk_id, src, RF)
    held = next(t for t in reversed(targets) if t != src)
    acked = [t for t in targets if t != held]
    gate = await six.faults.hold_writes(held)
    try:
        run = asyncio.create_task(orch.run_pipeline({"batch_id": "b", "data_source":
                                                     str(source)}))
        await gate.arrived()
        await orch.wait_for_progress(100)  # committed at quorum, the third write held
        await orch.storage_manager.flush()
        async with asyncio.timeout(30):  # a repair that wrote to the held node would hang
            assert (await orch.repairer.repair([chunk_id])).replicas_created == 0
            six.nodes[next(t for t in acked if t != src)].status = "unhealthy"
            report = await orch.repairer.repair([chunk_id])
        assert report.replicas_created == 1
        await gate.release()
        result = await run
        assert result.status == "success", result.error
        holders = orch.storage_manager.manifest.replicas([chunk_id])[chunk_id]
        healthy = [n for n in holders if six.nodes[n].healthy]
        assert held in healthy
        assert len(healthy) == RF, holders
    finally:
        await gate.release()
        await orch.close()


async def test_a_cloud_down_relaxes_the_spread_and_its_return_restores_it(
        six: Cluster, config: PipelineConfig, make_dataset: Callable[..., Path]) -> None:
    """Three aws nodes carry RF alone while gcp is down; the chunks are whole but in one
    cloud, so they are hinted, and each gets a gcp replica when gcp is back (the one above
    RF is gc's to trim)."""
    source = make_dataset("one_cloud", size=512 * 1024, seed=85)
    gcp = [n for n in six.nodes if n.startswith("gcp")]
    for node_id in gcp:
        six.nodes[node_id].status = "unhealthy"
    orch = PipelineOrchestrator(six, config=config)
    try:
        result = await orch.run_pipeline({"batch_id": "aws", "data_source": str(source)})

        assert result.status == "success", result.error
        assert result.metrics["storage"]["under_replicated"] == 0  # RF is met, in one cloud
        ids = chunk_ids(orch, "aws")
        manifest = orch.storage_manager.manifest
        assert all(all(n.startswith("aws") for n in nodes) and len(nodes) == RF
                   for nodes in manifest.replicas(ids).values())
        assert sorted(hints(orch)) == sorted(stored_ids(orch, "aws"))

        for node_id in gcp:
            six.nodes[node_id].status = "healthy"
        report = await orch.repairer.replay_hints()

        assert report.replicas_created == len(ids) + 1  # and the manifest object's
        assert hints(orch) == {}
        for nodes in manifest.replicas(ids).values():
            assert sum(n.startswith("gcp") for n in nodes) == 1, nodes
        assert (await orch.verify_batch("aws")).problems == []
    finally:
        await orch.close()


async def test_a_replay_that_fails_part_way_keeps_its_hints_and_its_copies(
        cluster: Cluster, orchestrator: PipelineOrchestrator,
        make_dataset: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """One clear error (not an exception group), what it copied recorded, hints kept."""
    source = make_dataset("replay_fails", size=512 * 1024, seed=86)
    await cluster.faults.crash(VICTIM)
    result = await orchestrator.run_pipeline({"batch_id": "rf", "data_source": str(source)})
    assert result.status == "success", result.error
    await cluster.faults.restart(VICTIM)
    manifest = orchestrator.storage_manager.manifest
    hinted = sorted(hints(orchestrator))
    real_blob = manifest.blob

    def blob_or_locked(chunk_id: str) -> object:
        if chunk_id == hinted[-1]:
            raise StorageError("database is locked")
        return real_blob(chunk_id)

    monkeypatch.setattr(manifest, "blob", blob_or_locked)
    with pytest.raises(StorageError, match="locked"):
        await orchestrator.repairer.replay_hints()
    assert sorted(hints(orchestrator)) == hinted  # nothing forgotten
    # What is recorded is on the disks (a copy cancelled between the node's ack and its
    # record is an unrecorded extra: gc's to trim, never a recorded replica that is not).
    held = {n.id: set(await cluster.client.inventory(n)) for n in cluster.healthy_nodes()}
    for chunk_id in hinted:
        on_nodes = {n for n, ids in held.items() if chunk_id in ids}
        assert set(manifest.replicas([chunk_id])[chunk_id]) <= on_nodes, chunk_id[:12]
    replays = HintReplays(orchestrator.repairer)
    replays.start()
    await replays.settle()  # logged, not raised: the hints wait for the next replay
    assert replays.last is None

    monkeypatch.setattr(manifest, "blob", real_blob)
    report = await orchestrator.repairer.replay_hints()
    assert report.hints_left == 0
    await assert_back_at_rf(orchestrator, cluster, "rf")
