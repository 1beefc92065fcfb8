"""Replica writes at their edges: encrypted blobs that differ per processing, a node that
missed the run's configuration, a full disk, quorum reached while the source fails, and
repair from holders whose copy is gone or from another batch.

Each case was a defect a review of the one data plane found; they stay as regressions.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from multicloud import Cluster, PipelineConfig, PipelineOrchestrator, create_local_cluster
from multicloud.pipeline.placement import rank_nodes
from multicloud.run.live import LiveView

ENCRYPT = {"transforms": ["validate", "compress", "encrypt"]}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """3 AWS and 3 GCP nodes, in-process."""
    made = create_local_cluster(tmp_path / "cluster", {"aws": 3, "gcp": 3})
    yield made
    await made.close()


@pytest.fixture
def encrypted(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The processing section that encrypts, with a key in the environment."""
    monkeypatch.setenv("MULTICLOUD_ENCRYPTION_KEY", "5a" * 32)
    return ENCRYPT


@pytest.fixture
def files(tmp_path: Path) -> Callable[..., Path]:
    """Write random files under tmp_path/<name>: count files of size bytes (or given bytes)."""
    def make(name: str, count: int, size: int = 200_000, payload: bytes | None = None) -> Path:
        root = tmp_path / name
        root.mkdir()
        for i in range(count):
            (root / f"f{i:03}.bin").write_bytes(payload if payload is not None
                                                else os.urandom(size))
        return root
    return make


async def until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition of the run's own state (short polls against a deadline)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_identical_files_with_encryption_store_every_copy(
        cluster: Cluster, config: PipelineConfig, encrypted: dict[str, object],
        files: Callable[..., Path]) -> None:
    """Four files of the same bytes: one chunk processed four times, each time with a new
    nonce; every push must go out with the checksum of the blob actually staged."""
    source = files("same", 4, payload=os.urandom(150_000))
    orch = PipelineOrchestrator(cluster, config=config.replace(processing=encrypted))
    try:
        result = await orch.run_pipeline({"batch_id": "same", "data_source": str(source)})
        assert result.status == "success", result.error
        assert result.metrics["distribution"]["replica_failures"] == 0
        assert all(node.healthy for node in cluster.nodes.values())
        assert (await orch.verify_batch("same")).ok
    finally:
        await orch.close()


async def test_repair_copies_an_encrypted_replica_written_by_another_batch(
        cluster: Cluster, config: PipelineConfig, encrypted: dict[str, object],
        files: Callable[..., Path], tmp_path: Path) -> None:
    """The manifest keeps the checksum of the last batch's blob; a holder from the first
    batch holds other (equally good) bytes, and repair must still copy them."""
    source = files("one", 1)
    orch = PipelineOrchestrator(cluster, config=config.replace(
        processing=encrypted, ingestion={"chunk_size_mb": 1}, storage={"repair": False}))
    try:
        assert (await orch.run_pipeline({"batch_id": "b1", "data_source": str(source)})
                ).status == "success"
        manifest = orch.storage_manager.manifest
        (chunk_id,) = manifest.chunk_ids("b1")
        first = manifest.replicas([chunk_id])[chunk_id]
        old = first[-1]
        cluster.nodes[old].status = "unhealthy"  # misses batch 2, keeps batch 1's blob
        assert (await orch.run_pipeline({"batch_id": "b2", "data_source": str(source)})
                ).status == "success"
        for node in cluster.nodes.values():  # only the batch-1 holder is left
            node.status = "healthy" if node.id == old else "unhealthy"
        for node in cluster.nodes.values():
            if node.id not in manifest.replicas([chunk_id])[chunk_id]:
                node.status = "healthy"
        report = await orch.repairer.repair([chunk_id])
        assert report.replicas_created >= 2, report
        assert report.under_replicated == 0
        await orch.storage_manager.flush()
        assert (await orch.restore_batch("b2", tmp_path / "back")).files_restored == 1
    finally:
        await orch.close()


async def test_a_node_that_missed_the_configuration_encrypts_anyway(
        cluster: Cluster, config: PipelineConfig, encrypted: dict[str, object],
        files: Callable[..., Path]) -> None:
    """aws-node-1 is down when the run configures the nodes and back during it: the chunks
    it processes must still go through the run's transform chain, not its default."""
    source = files("many", 40, size=100_000)
    orch = PipelineOrchestrator(cluster, config=config.replace(processing=encrypted))
    cluster.nodes["aws-node-1"].status = "unhealthy"

    def back(view: LiveView) -> None:
        cluster.nodes["aws-node-1"].status = "healthy"

    orch.add_progress_listener(back)
    try:
        result = await orch.run_pipeline({"batch_id": "enc", "data_source": str(source)})
        assert result.status == "success", result.error
        manifest = orch.storage_manager.manifest
        replicas = manifest.replicas(manifest.chunk_ids("enc"))
        assert any("aws-node-1" in holders for holders in replicas.values())
        codecs = {manifest.blob(c).codec for c in replicas}  # type: ignore[union-attr]
        assert codecs
        assert all(codec.endswith("+aes256gcm") for codec in codecs), codecs
    finally:
        await orch.close()


async def test_a_full_node_takes_no_new_replicas(cluster: Cluster, config: PipelineConfig,
                                                 files: Callable[..., Path]) -> None:
    source = files("full", 30, size=100_000)
    await cluster.faults.disk_full("gcp-node-1")
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        result = await orch.run_pipeline({"batch_id": "full", "data_source": str(source)})
        assert result.status == "success", result.error
        # The first refusal marks it full; placement sends it nothing after that: only the
        # writes already on their way when it refused can fail too.
        dist = result.metrics["distribution"]
        assert 1 <= dist["replica_failures"] <= config.distribution.max_concurrent_distributions
        assert dist["replacements"] == dist["replica_failures"]
        assert not list((cluster.data_dir / "nodes" / "gcp-node-1").glob("objects/*/*/*"))
        assert cluster.nodes["gcp-node-1"].healthy  # full is not down: it still serves reads
        assert (await orch.verify_batch("full")).ok
    finally:
        await orch.close()


async def test_quorum_reached_while_the_source_fails_commits_the_chunk(
        cluster: Cluster, config: PipelineConfig, files: Callable[..., Path]) -> None:
    """One replica acked, the source taken out, then the second ack: 2 of 2 is a commit,
    not a lost source to process again."""
    data = os.urandom(300_000)
    source = files("one", 1, payload=data)
    chunk_id = hashlib.sha256(data).hexdigest()
    orch = PipelineOrchestrator(cluster, config=config.replace(ingestion={"chunk_size_mb": 1}))
    src = rank_nodes(chunk_id, cluster.healthy_nodes("aws"))[0].id
    targets = orch.distribution_coordinator.placement.select_target_nodes(chunk_id, src, 3)
    assert src in targets
    others = [t for t in targets if t != src]
    gates = {node: await cluster.faults.hold_writes(node) for node in targets}
    metrics = orch.metrics  # its counters are new each run: read them through it
    try:
        run = asyncio.create_task(orch.run_pipeline({"batch_id": "q", "data_source": str(source)}))
        for node in targets:
            await gates[node].arrived()
        await gates[others[0]].release()
        await until(lambda: metrics.replicas.writes == 1, "the first replica's ack")
        cluster.nodes[src].status = "unhealthy"  # its own write is cancelled at once
        await until(lambda: metrics.replicas.failures >= 1, "the source's write to fail")
        await gates[others[1]].release()
        result = await run
        assert result.status == "success", result.error
        assert result.metrics["processing"]["attempted"] == 1  # not processed again
        assert not [e for e in result.metrics["events"] if e["kind"] == "chunk_failed"]
    finally:
        for gate in gates.values():
            await gate.release()
        await orch.close()


async def test_repair_makes_up_for_a_holder_whose_copy_is_gone(
        cluster: Cluster, config: PipelineConfig, files: Callable[..., Path]) -> None:
    source = files("one", 1)
    orch = PipelineOrchestrator(cluster, config=config.replace(ingestion={"chunk_size_mb": 1}))
    try:
        assert (await orch.run_pipeline({"batch_id": "b", "data_source": str(source)})
                ).status == "success"
        manifest = orch.storage_manager.manifest
        (chunk_id,) = manifest.chunk_ids("b")
        holders = manifest.replicas([chunk_id])[chunk_id]
        await cluster.faults.lose(holders[0], chunk_id)  # silently gone
        cluster.nodes[holders[2]].status = "unhealthy"  # and one holder down

        report = await orch.repairer.repair([chunk_id])
        await orch.storage_manager.flush()

        assert report.under_replicated == 0, report
        now = manifest.replicas([chunk_id])[chunk_id]
        assert holders[0] not in now  # forgotten, not counted
        healthy = [n for n in now if cluster.nodes[n].healthy]
        assert len(healthy) >= 3
        verify = await orch.verify_batch("b")
        # Only the down holder (the batch's manifest object may have a copy there too).
        assert [p.problem for p in verify.problems if p.chunk_id == chunk_id] == ["unavailable"]
        assert {p.problem for p in verify.problems} == {"unavailable"}
    finally:
        await orch.close()
