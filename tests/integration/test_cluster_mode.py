"""Cluster mode with real processes: `multicloud registry` and six `multicloud node`s on loopback.

One cluster of processes serves the whole module (starting six interpreters takes a while on
a small machine); before each test every process that a previous test killed is started
again with its data dir and the test waits until the registry reports all six healthy.
Faults are injected at progress points (a progress listener, `wait_for_progress`), and every
wait polls a condition (a ready file, the registry's view, a process exiting) to a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_fixtures import (
    FAILURE_TIMEOUT_S,
    MAX_BODY_MB,
    ProcessCluster,
    assert_same_tree,
    eventually,
    pid_gone,
    wait_until,
    write_config_dir,
)

from multicloud import NodeRegistry, PipelineOrchestrator
from multicloud.blob import TransformChain, blob_checksum
from multicloud.cluster.anti_entropy import AntiEntropy
from multicloud.cluster.remote import connect_cluster
from multicloud.comm.wire import BODY_HEADER, META_HEADER, decode_meta, encode_meta
from multicloud.core.config import ProcessingConfig
from multicloud.core.types import Chunk, NodeStatus
from multicloud.ui.cli import main

pytestmark = pytest.mark.timeout(300)

NODE_IDS = {f"{cloud}-node-{i}" for cloud in ("aws", "gcp") for i in (1, 2, 3)}
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def process_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    """The registry and six nodes as processes, shared by the module; all stopped at the end."""
    root = tmp_path_factory.mktemp("cluster")
    cluster = ProcessCluster(root / "data", write_config_dir(root / "cfg"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(process_cluster: ProcessCluster) -> ProcessCluster:
    """The shared cluster with every process running and every node healthy."""
    process_cluster.revive()
    return process_cluster


Connect = Callable[[], Any]


@pytest.fixture
def connect(cluster: ProcessCluster, tmp_path: Path) -> Callable[[], Any]:
    """An async context manager: (NodeRegistry, PipelineOrchestrator) on the running cluster."""

    @asynccontextmanager
    async def connected() -> AsyncIterator[tuple[NodeRegistry, PipelineOrchestrator]]:
        registry = await connect_cluster(cluster.registry_url, cluster.token,
                                         cluster.config.cluster, data_dir=tmp_path / "orch")
        orch = PipelineOrchestrator(registry, config=cluster.config)
        try:
            yield registry, orch
        finally:
            await orch.close()
            await registry.close()

    return connected


def held_by(orch: PipelineOrchestrator, batch_id: str) -> dict[str, list[str]]:
    """Chunk id -> the nodes the manifest records a replica on."""
    manifest = orch.storage_manager.manifest
    return manifest.replicas(manifest.chunk_ids(batch_id))


def assert_fully_replicated(orch: PipelineOrchestrator, registry: NodeRegistry,
                            batch_id: str, chunks: int) -> None:
    """Every chunk has >= 3 replicas on healthy nodes, spanning both clouds."""
    holders = held_by(orch, batch_id)
    assert len(holders) == chunks
    for chunk_id, nodes in holders.items():
        healthy = [n for n in nodes if registry.nodes[n].healthy]
        assert len(healthy) >= 3, (chunk_id, nodes)
        assert {registry.nodes[n].cloud for n in healthy} == {"aws", "gcp"}, (chunk_id, nodes)


async def restore_and_compare(orch: PipelineOrchestrator, batch_id: str, source: Path,
                              dest: Path) -> None:
    report = await orch.restore_batch(batch_id, dest)
    assert report.failed_files == []
    assert_same_tree(source, dest)


# -- 1. the full pipeline -------------------------------------------------------------------

async def test_full_pipeline_in_cluster_mode(cluster: ProcessCluster, connect: Connect,
                                             make_dataset: Callable[..., Path],
                                             tmp_path: Path) -> None:
    """Six node processes: success, every rate 1.0, cross-cloud bytes, byte-exact restore."""
    source = make_dataset("full", size=2 * MIB, seed=31)
    async with connect() as (registry, orch):
        assert set(registry.nodes) == NODE_IDS
        assert all(n.url and n.url.startswith("http://127.0.0.1:") for n in registry.nodes.values())
        result = await orch.run_pipeline({"batch_id": "full", "data_source": str(source)})
        assert result.status == "success", result.error
        m = result.metrics
        for stage in ("ingestion", "processing", "storage"):
            assert m[stage]["success_rate"] == 1.0, (stage, m[stage])
        assert m["distribution"]["replica_success_rate"] == 1.0
        assert m["distribution"]["cross_cloud_transfers"] > 0
        assert m["distribution"]["cross_cloud_bytes"] > 0
        assert m["storage"]["under_replicated"] == 0
        assert m["node_failures_handled"] == 0
        assert result.bytes_processed == sum(p.stat().st_size for p in source.rglob("*")
                                             if p.is_file())
        assert_fully_replicated(orch, registry, "full", result.chunks_processed)

        # The bytes are in the node processes' stores: every recorded replica is an object
        # file under <data>/nodes/<id>/objects, and every chunk is on >= 3 of them.
        holders = held_by(orch, "full")
        for chunk_id, nodes in holders.items():
            for node_id in nodes:
                assert cluster.object_path(node_id, chunk_id).is_file(), (node_id, chunk_id)
            on_disk = [n for n in NODE_IDS if cluster.object_path(n, chunk_id).is_file()]
            assert len(on_disk) >= 3, (chunk_id, on_disk)
        assert len(cluster.object_files()) >= 3 * result.chunks_processed
        assert all(cluster.object_files(n) for n in NODE_IDS)

        await restore_and_compare(orch, "full", source, tmp_path / "restored")
        report = await orch.verify_batch("full")
        assert report.ok, report.problems[:5]
        assert report.chunks == result.chunks_processed
        # ...and the replicas of the batch's own manifest, stored on the nodes like data.
        manifest = orch.storage_manager.manifest
        own = manifest.batch("full").manifest_object
        assert own is not None
        assert report.replicas_checked == sum(len(v) for v in holders.values()) + len(
            manifest.replicas([own])[own])


# -- 2. SIGKILL of a node mid-run -----------------------------------------------------------

async def test_sigkill_of_a_node_mid_run(cluster: ProcessCluster, connect: Connect,
                                         make_dataset: Callable[..., Path], tmp_path: Path,
                                         record_property: Callable[[str, object], None],
                                         ) -> None:
    """A node killed at 30% is noticed, routed around and re-replicated; restore is exact."""
    victim = "aws-node-1"  # in the source cloud: a processing node and a replica target
    source = make_dataset("sigkill", size=4 * MIB, seed=32)
    async with connect() as (registry, orch):
        killed: dict[str, float] = {}
        unhealthy: dict[str, Any] = {}

        def kill_at_30(o: PipelineOrchestrator) -> None:
            if not killed and o.progress_percent >= 30:
                cluster.kill(victim, signal.SIGKILL)
                killed.update(at=time.monotonic(), wall=time.time(),
                              progress=o.progress_percent)

        transitions: list[str] = []

        def noticed(node: Any, old: NodeStatus, reason: str) -> None:
            if node.id != victim:
                return
            transitions.append(f"{node.status.value} ({reason})")
            if not node.healthy and "at" not in unhealthy:
                unhealthy.update(at=time.monotonic(), reason=reason)

        async def registry_detection() -> float:
            """Seconds from the kill until the registry's heartbeat detector reports it."""
            await eventually(lambda: killed, 120, "the kill")
            await asyncio.to_thread(cluster.wait_status, {victim}, "unhealthy",
                                    10 * FAILURE_TIMEOUT_S)
            return time.monotonic() - killed["at"]

        orch.add_progress_listener(kill_at_30)
        registry.subscribe(noticed)
        detector = asyncio.create_task(registry_detection())
        try:
            result = await orch.run_pipeline({"batch_id": "sigkill", "data_source": str(source)})
            finished = time.monotonic()
            assert killed, "the run never reached 30%"
            # The registry's own failure detector notices the silence too (missed heartbeats):
            # failure_timeout_s after the last heartbeat it got (about one interval before
            # the kill), plus at most a sweep and a poll.
            registry_detection_s = await detector
        finally:
            detector.cancel()  # a no-op unless an assertion above failed

        assert 30 <= killed["progress"] < 100
        assert result.status == "success", result.error
        assert result.metrics["node_failures_handled"] >= 1
        assert result.metrics["storage"]["under_replicated"] == 0
        assert not registry.nodes[victim].healthy
        assert "at" in unhealthy, "the NodeRegistry never marked the killed node unhealthy"
        detection_s = unhealthy["at"] - killed["at"]
        assert registry_detection_s < 5 * FAILURE_TIMEOUT_S

        assert_fully_replicated(orch, registry, "sigkill", result.chunks_processed)
        repaired = [e for e in result.metrics["events"] if e["kind"] == "repair_done"]
        back_at_rf_s = (repaired[-1]["at"] - killed["wall"]) if repaired else \
            finished - killed["at"]
        record_property("failure_detection_s", round(detection_s, 3))
        record_property("registry_heartbeat_detection_s", round(registry_detection_s, 3))
        record_property("failure_detection_reason", unhealthy["reason"])
        record_property("back_at_replication_factor_s", round(back_at_rf_s, 3))
        record_property("replicas_repaired", result.metrics["storage"]["replicas_repaired"])
        record_property("victim_transitions", transitions)
        # Failed transfers or the heartbeat timeout, whichever comes first, well within a
        # few failure timeouts.
        assert detection_s < 5 * FAILURE_TIMEOUT_S, (
            f"detection took {detection_s:.2f}s ({unhealthy['reason']})")
        await restore_and_compare(orch, "sigkill", source, tmp_path / "restored")


# -- 3. registry restarted mid-run ----------------------------------------------------------

async def test_registry_restart_mid_run(cluster: ProcessCluster, connect: Connect,
                                        make_dataset: Callable[..., Path],
                                        tmp_path: Path) -> None:
    """SIGTERM the registry at 30%, start a new one on the same port: the run completes and
    membership survives."""
    source = make_dataset("registry-restart", size=4 * MIB, seed=33)
    port = cluster.registry_port
    old_pid = cluster.pid("registry")
    async with connect() as (registry, orch):
        run = asyncio.create_task(orch.run_pipeline({"batch_id": "registry-restart",
                                                     "data_source": str(source)}))

        async def restart_registry() -> float:
            await orch.wait_for_progress(30)
            progress = orch.progress_percent
            cluster.kill("registry", signal.SIGTERM)
            await asyncio.to_thread(cluster.wait_exit, "registry")
            process = cluster.spawn_registry(port)
            url = await asyncio.to_thread(cluster.wait_ready, "registry", process)
            assert url == cluster.registry_url
            return progress

        try:
            killed_at = await restart_registry()
        finally:
            result = await run  # it must finish whatever happened to the registry
        assert killed_at < 100, "the run finished before the registry went away"
        assert result.status == "success", result.error
        assert result.metrics["storage"]["under_replicated"] == 0
        assert cluster.pid("registry") != old_pid

        # The new registry loaded membership from its data dir; the nodes heartbeat again.
        views = await asyncio.to_thread(cluster.wait_healthy, NODE_IDS, 10 * FAILURE_TIMEOUT_S)
        assert set(views) == NODE_IDS
        await eventually(lambda: all(n.healthy for n in registry.nodes.values()),
                         10 * FAILURE_TIMEOUT_S, "the orchestrator to see all six healthy")
        assert set(registry.nodes) == NODE_IDS
        await restore_and_compare(orch, "registry-restart", source, tmp_path / "restored")


# -- 4. a node restarted with its data dir rejoins ------------------------------------------

async def test_node_restarted_with_its_data_rejoins(cluster: ProcessCluster, connect: Connect,
                                                    make_dataset: Callable[..., Path]) -> None:
    """Its objects are still there, it turns healthy, and verify checks its replicas there."""
    node_id = "gcp-node-2"
    source = make_dataset("rejoin", size=1 * MIB, seed=34)
    async with connect() as (registry, orch):
        result = await orch.run_pipeline({"batch_id": "rejoin", "data_source": str(source)})
        assert result.status == "success", result.error
        holders = held_by(orch, "rejoin")
        manifest = orch.storage_manager.manifest
        manifest_object = manifest.batch("rejoin").manifest_object
        assert manifest_object is not None
        holders |= manifest.replicas([manifest_object])  # verify checks the batch's manifest too
        mine = sorted(c for c, nodes in holders.items() if node_id in nodes)
        assert mine, f"{node_id} holds no replica of the batch"
        old_url = registry.nodes[node_id].url

        cluster.kill(node_id, signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_status, {node_id}, "unhealthy",
                                10 * FAILURE_TIMEOUT_S)
        await eventually(lambda: not registry.nodes[node_id].healthy, 10 * FAILURE_TIMEOUT_S,
                         f"the orchestrator to see {node_id} unhealthy")
        # While it is down, verify cannot check its replicas and says so: the check goes to
        # the node, it is not taken from the manifest.
        down = await orch.verify_batch("rejoin")
        assert {(p.chunk_id, p.problem) for p in down.problems if p.node_id == node_id} == \
            {(c, "unavailable") for c in mine}
        assert all(p.node_id == node_id for p in down.problems)

        await asyncio.to_thread(cluster.start_node, node_id)
        views = await asyncio.to_thread(cluster.wait_healthy, {node_id}, 10 * FAILURE_TIMEOUT_S)
        new_url = views[node_id]["url"]
        await eventually(lambda: registry.nodes[node_id].healthy
                         and registry.nodes[node_id].url == new_url, 10 * FAILURE_TIMEOUT_S,
                         f"the orchestrator to see {node_id} back at {new_url}")
        assert new_url != old_url  # a new process on a new port: the URL came from the registry
        node = registry.nodes[node_id]
        assert set(mine) <= set(await registry.client.inventory(node))
        assert all(cluster.object_path(node_id, c).is_file() for c in mine)

        report = await orch.verify_batch("rejoin")
        assert report.ok, report.problems[:5]
        assert report.replicas_checked == sum(len(v) for v in holders.values())

        # Proof that the node itself answered: take one object away behind its back, and
        # verify finds exactly that replica missing on exactly that node.
        victim = cluster.object_path(node_id, mine[0])
        saved = victim.read_bytes()
        victim.unlink()
        try:
            report = await orch.verify_batch("rejoin")
            assert [(p.chunk_id, p.node_id, p.problem) for p in report.problems] == \
                [(mine[0], node_id, "missing")]
        finally:
            victim.write_bytes(saved)
        assert (await orch.verify_batch("rejoin")).ok


# -- 5. security against real processes -----------------------------------------------------

def _blob(payload: bytes) -> tuple[str, bytes]:
    """A real blob (as processing makes it) for a fresh chunk: (chunk id, blob)."""
    import hashlib

    chunk_id = hashlib.sha256(payload).hexdigest()
    chunk = Chunk(chunk_id=chunk_id, file="sec.bin", index=0, offset=0,
                  size_bytes=len(payload), source_cloud="aws")
    blob, info = TransformChain(ProcessingConfig(transforms=["validate"])).apply(chunk, payload)
    assert info.blob_checksum == blob_checksum(blob)
    return chunk_id, bytes(blob)


async def test_nodes_and_registry_refuse_bad_requests(cluster: ProcessCluster) -> None:
    """No token: 401; wrong checksum: 422; bad id: 400; over max_body_mb: 413; nothing stored."""
    node_id = "aws-node-2"
    base = cluster.node_url(node_id)
    store = cluster.store(node_id)
    auth = {"Authorization": f"Bearer {cluster.token}"}
    before = {p.name for p in cluster.object_files(node_id)}

    def stored(chunk_id: str) -> bool:
        return cluster.object_path(node_id, chunk_id).exists()

    def meta(**fields: object) -> dict[str, str]:
        return {META_HEADER: encode_meta(fields), BODY_HEADER: "1"}

    async with aiohttp.ClientSession() as http:
        chunk_id, blob = _blob(secrets.token_bytes(4096))
        put = f"{base}/v1/put"
        good = meta(chunk_id=chunk_id, checksum=blob_checksum(blob))

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": cluster.token}):
            async with http.post(put, data=blob, headers={**good, **headers}) as resp:
                assert resp.status == 401, await resp.text()
                assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert not stored(chunk_id)
        for op in ("get", "inventory", "health", "push", "delete", "fault"):
            async with http.post(f"{base}/v1/{op}", headers=meta(chunk_id=chunk_id)) as resp:
                assert resp.status == 401, op
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 401

        wrong = {**meta(chunk_id=chunk_id, checksum="0" * 32), **auth}
        async with http.post(put, data=blob, headers=wrong) as resp:
            assert resp.status == 422
            body = await resp.json()
            assert body["error"] == "integrity"
            assert node_id in body["message"]
        # Damaged bytes sent with their own checksum are refused by the envelope check.
        damaged = blob[:-1] + bytes([blob[-1] ^ 1])
        async with http.post(put, data=damaged, headers={
                **meta(chunk_id=chunk_id, checksum=blob_checksum(damaged)), **auth}) as resp:
            assert resp.status == 422
        async with http.post(put, data=blob, headers={**meta(chunk_id=chunk_id), **auth}) as resp:
            assert resp.status == 400  # no checksum at all
        async with http.post(put, data=blob, headers={META_HEADER: "{not json", **auth}) as resp:
            assert resp.status == 400
        # Fault injection is off on a production node.
        async with http.post(f"{base}/v1/fault", headers={**meta(action="crash"), **auth}) as resp:
            assert resp.status == 400
            assert "--allow-faults" in (await resp.json())["message"]
        assert not stored(chunk_id)

        for bad in ("not-hex", "A" * 64, "0" * 63, chunk_id + "0"):
            async with http.post(put, data=blob, headers={
                    **meta(chunk_id=bad, checksum=blob_checksum(blob)), **auth}) as resp:
                assert resp.status == 400, bad
                assert (await resp.json())["error"] == "invalid_id"
        async with http.post(f"{base}/v1/get", headers={**meta(chunk_id="not-hex"),
                                                       **auth}) as resp:
            assert resp.status == 400

        big_id, big = _blob(secrets.token_bytes(2 * MIB))
        assert len(big) > MAX_BODY_MB * MIB
        async with http.post(put, data=big, headers={
                **meta(chunk_id=big_id, checksum=blob_checksum(big)), **auth}) as resp:
            assert resp.status == 413
        assert not stored(big_id)

        # Nothing half-written either: no new object and no temp file left behind.
        assert {p.name for p in cluster.object_files(node_id)} == before
        assert list((store / "tmp").iterdir()) == []

        # The control: the same blob with the token and its checksum is stored.
        async with http.post(put, data=blob, headers={**good, **auth}) as resp:
            assert resp.status == 200
            assert decode_meta(await resp.text())["ack"]["chunk_id"] == chunk_id
        assert stored(chunk_id)
        async with http.post(f"{base}/v1/delete", headers={**meta(chunk_id=chunk_id),
                                                          **auth}) as resp:
            assert decode_meta(await resp.text()) == {"deleted": True}
        assert not stored(chunk_id)

        # The registry: 401 without the token, and an unauthenticated registration is not kept.
        reg = cluster.registry_url
        fake = {"id": "intruder-1", "cloud": "aws", "region": "us-east-1",
                "url": "http://127.0.0.1:9", "capacity_bytes": 1}
        async with http.post(f"{reg}/v1/nodes", json=fake) as resp:
            assert resp.status == 401
        async with http.post(f"{reg}/v1/nodes/{node_id}/heartbeat", json={},
                             headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
        for path in ("/v1/nodes", "/v1/health", "/metrics"):
            async with http.get(f"{reg}{path}") as resp:
                assert resp.status == 401, path
        async with http.get(f"{reg}/v1/nodes", headers=auth) as resp:
            assert {v["id"] for v in (await resp.json())["nodes"]} == NODE_IDS


# -- 6. the CLI: cluster up / status / run / restore / verify / down -------------------------

def test_cli_cluster_up_run_restore_verify_down(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                make_dataset: Callable[..., Path]) -> None:
    """The user's commands against processes that `multicloud cluster up` started."""
    monkeypatch.delenv("MULTICLOUD_TOKEN", raising=False)
    config_dir = write_config_dir(tmp_path / "cfg")
    data_dir = tmp_path / "cluster"
    work = tmp_path / "work"
    source = make_dataset("cli", size=1 * MIB, seed=36)
    level = logging.getLogger("multicloud").level  # main() quietens the package logger

    def cli(*args: str | Path) -> tuple[int, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        return code, capsys.readouterr().out

    on_cluster = ("--data-dir", data_dir, "--config-dir", config_dir)
    pids: list[int] = []
    try:
        code, out = cli("cluster", "up", "--registry-port", "0", "--node-base-port", "0",
                        "--json", *on_cluster)
        assert code == 0, out
        state = json.loads(out)
        url = state["registry"]
        pids = [p["pid"] for p in state["processes"]]
        assert state["processes"][0]["name"] == "registry"
        assert {p["name"] for p in state["processes"][1:]} == NODE_IDS
        assert all(Path(p["log"]).exists() and p["url"] for p in state["processes"])
        assert (data_dir / "token").stat().st_mode & 0o777 == 0o600

        code, out = cli("cluster", "status", "--json", *on_cluster)
        assert code == 0
        status = json.loads(out)
        assert status["registry"] == url
        nodes = {n["id"]: n for n in status["nodes"]}
        assert set(nodes) == NODE_IDS
        assert all(n["status"] == "healthy" for n in nodes.values())
        expected_pids = {p["name"]: p["pid"] for p in state["processes"][1:]}
        assert {i: n.get("pid") for i, n in nodes.items()} == expected_pids

        client = ("--cluster", url, "--data-dir", work, "--config-dir", config_dir,
                  "--token-file", data_dir / "token")
        code, out = cli("run", "--source", source, "--batch-id", "cli-batch", "--json", *client)
        assert code == 0, out
        result = json.loads(out)
        assert result["status"] == "success"
        assert result["metrics"]["distribution"]["replica_success_rate"] == 1.0
        assert result["metrics"]["distribution"]["cross_cloud_transfers"] > 0
        assert len(list((data_dir / "nodes").glob("*/objects/*/*/*"))) >= \
            3 * result["chunks_processed"]

        code, out = cli("restore", "cli-batch", "--to", tmp_path / "restored", "--json",
                        *client)
        assert code == 0, out
        assert json.loads(out)["failed_files"] == []
        assert_same_tree(source, tmp_path / "restored")

        code, out = cli("verify", "cli-batch", "--json", *client)
        assert code == 0, out
        report = json.loads(out)
        assert report["ok"]
        assert report["replicas_checked"] >= 3 * result["chunks_processed"]

        code, out = cli("cluster", "down", *on_cluster)
        assert code == 0
        assert "stopped 7 processes" in out
        for pid in pids:
            wait_until(lambda pid=pid: pid_gone(pid), 30, f"pid {pid} to exit")
        assert not (data_dir / "run" / "cluster.json").exists()
    finally:
        logging.getLogger("multicloud").setLevel(level)
        for pid in pids:  # whatever a failed assertion left running
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)


# -- 6. anti-entropy: the registry's scheduled repair ---------------------------------------

async def test_anti_entropy_pass_repairs_what_it_finds(cluster: ProcessCluster,
                                                       connect: Connect,
                                                       make_dataset: Callable[..., Path],
                                                       tmp_path: Path) -> None:
    """A pass reads the catalogue from the nodes, replaces a rotten and a lost replica."""
    source = make_dataset("entropy", size=MIB, seed=37)
    async with connect() as (registry, orch):
        result = await orch.run_pipeline({"batch_id": "entropy", "data_source": str(source)})
        assert registry.healthy_nodes()
        assert result.status == "success", result.error
        holders = held_by(orch, "entropy")
    (rotten_chunk, rotten_nodes), (lost_chunk, lost_nodes) = sorted(holders.items())[:2]
    rotten = cluster.object_path(rotten_nodes[0], rotten_chunk)
    rotten.write_bytes(rotten.read_bytes()[:-1] + b"\x00")
    cluster.object_path(lost_nodes[0], lost_chunk).unlink()

    # The pass knows nothing but the registry: it rebuilds its own catalogue cache.
    config = cluster.config.replace(storage={"anti_entropy_interval_s": 0.2})
    entropy = AntiEntropy(cluster.registry_url, cluster.token, config, tmp_path / "registry")
    report = await entropy.pass_once()
    # The rotten copy is found by its scrub; the lost one never enters the rebuilt cache
    # (it takes replica locations from what the nodes hold), so its chunk is simply short.
    assert report.corrupt == 1, report.details
    assert report.replicas_created == 2
    assert report.under_replicated == 0

    # Scheduled: the loop runs passes on its own, and the batch stays whole.
    task = asyncio.create_task(entropy.run_forever())
    try:
        await eventually(lambda: entropy.passes >= 2, 60, "a scheduled anti-entropy pass")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    async with connect() as (_registry, orch):
        await orch.catalogue().recover()
        verify = await orch.verify_batch("entropy")
        assert verify.ok, verify.problems[:5]
