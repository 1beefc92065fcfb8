"""Membership in one event loop: a real registry, real node servers, the orchestrator's watcher.

Nodes register (or are named), heartbeat with their live usage, fall silent when they stop
or are told to crash, and join again when a registry forgets them; `connect_cluster` and its
`MembershipWatcher` mirror all of it into the orchestrator's registry. Waits are on events
(a status change, a log line) or on a condition, each with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from multicloud import PipelineConfig, PipelineOrchestrator
from multicloud.blob import TransformChain
from multicloud.cluster.node_server import NodeServer
from multicloud.cluster.remote import connect_cluster
from multicloud.comm.http import HttpComm
from multicloud.control.membership import MembershipWatcher, fetch_nodes, worker_from_view
from multicloud.control.registry import GIB, NodeRegistry, WorkerNode
from multicloud.control.registry_server import RegistryServer
from multicloud.core.config import (
    ClusterConfig,
    NodeSpec,
    ProcessingConfig,
    ServiceConfig,
    load_config,
)
from multicloud.core.errors import ClusterError, NodeUnavailable
from multicloud.core.messages import NodeAddress, Request
from multicloud.core.network import Location
from multicloud.core.types import Chunk, NodeStatus
from wire_support import odd_server

TOKEN = "unit-token"
SERVICE = ServiceConfig(heartbeat_interval_s=0.05, failure_timeout_s=0.4)
WAIT_S = 10.0
REGISTRY_LOG = "multicloud.control.registry_server"
NODE_LOG = "multicloud.cluster.node_server"
WATCHER_LOG = "multicloud.control.membership"
SPECS = [NodeSpec(id="aws-node-1", cloud="aws", region="us-east-1"),
         NodeSpec(id="gcp-node-1", cloud="gcp", region="us-central1")]


async def within(waiting: Awaitable[Any]) -> None:
    """Await waiting, failing the test after WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        await waiting


async def eventually(check: Callable[[], Any], what: str) -> Any:
    """Wait until check() is truthy (and return it); fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return result


@contextlib.contextmanager
def logged(logger_name: str, text: str, times: int = 1) -> Iterator[asyncio.Event]:
    """An event set once logger_name has logged a message containing text `times` times."""
    event = asyncio.Event()
    seen = 0

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal seen
            if text in record.getMessage():
                seen += 1
                if seen >= times:
                    event.set()

    logger = logging.getLogger(logger_name)
    watch, level = Watch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        yield event
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


@contextlib.contextmanager
def turns(registry: NodeRegistry, node_id: str, status: NodeStatus) -> Iterator[asyncio.Event]:
    """An event set when node_id's status changes to status in registry."""
    event = asyncio.Event()

    def listener(node: WorkerNode, old: NodeStatus, reason: str) -> None:
        if node.id == node_id and node.status is status:
            event.set()

    unsubscribe = registry.subscribe(listener)
    try:
        yield event
    finally:
        unsubscribe()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def registry_server(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    server = RegistryServer(tmp_path / "registry", TOKEN, SERVICE, host="127.0.0.1", port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_node(root: Path, registry_url: str, cloud: str, region: str,
                       node_id: str | None = None, *,
                       allow_faults: bool = False) -> AsyncIterator[NodeServer]:
    server = NodeServer(root, TOKEN, cloud, region, node_id=node_id, registry_url=registry_url,
                        service=SERVICE, host="127.0.0.1", port=0, fsync=False,
                        allow_faults=allow_faults)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def two_node_config() -> PipelineConfig:
    return load_config(None).replace(ingestion={"chunk_size_mb": 0.0625},
                          distribution={"replication_factor": 2, "write_quorum": 2},
                          cluster={"service": SERVICE.model_dump()})


# -- end to end ------------------------------------------------------------------------------

async def test_pipeline_end_to_end_through_a_registry(
        tmp_path: Path, registry_server: RegistryServer,
        make_dataset: Callable[..., Path]) -> None:
    config = two_node_config()
    source = make_dataset("e2e", size=512 * 1024, seed=5)
    url = registry_server.url
    async with running_node(tmp_path, url, "aws", "us-east-1") as aws, \
            running_node(tmp_path, url, "gcp", "us-central1", "gcp-node-1") as gcp:
        assert aws.node_id == "aws-node-1"  # named by the registry
        cluster = await connect_cluster(url, TOKEN, config.cluster, data_dir=tmp_path / "orch")
        orch = PipelineOrchestrator(cluster, config=config)
        try:
            assert {n: (v.url, v.healthy) for n, v in cluster.nodes.items()} == {
                "aws-node-1": (aws.url, True), "gcp-node-1": (gcp.url, True)}
            result = await orch.run_pipeline({"batch_id": "e2e", "data_source": str(source)})
            assert result.status == "success", result.error
            assert result.metrics["distribution"]["replica_success_rate"] == 1.0
            assert result.metrics["distribution"]["cross_cloud_transfers"] > 0
            report = await orch.restore_batch("e2e", tmp_path / "restored")
            assert report.failed_files == []
            for path in source.rglob("*"):
                if path.is_file():
                    restored = tmp_path / "restored" / path.relative_to(source)
                    assert restored.read_bytes() == path.read_bytes()
            assert (await orch.verify_batch("e2e")).ok
            stored = {p.name for p in (tmp_path / "nodes").glob("*/objects/*/*/*")}
            # Every object is a chunk of the batch, or the batch's own manifest.
            manifest = orch.storage_manager.manifest
            assert stored == {*manifest.chunk_ids("e2e"), manifest.batch("e2e").manifest_object}

            # Heartbeats stop: the registry's detector, then the watcher, take it out.
            with turns(cluster, "gcp-node-1", NodeStatus.UNHEALTHY) as down:
                await gcp.stop()
                await within(down.wait())
            view = registry_server.state.get("gcp-node-1")
            assert view is not None
            assert view["status"] == "unhealthy"
            late = await connect_cluster(url, TOKEN, config.cluster)
            try:
                assert not late.nodes["gcp-node-1"].healthy  # joins knowing it is down
                assert late.nodes["aws-node-1"].healthy
            finally:
                await late.close()
            verify = await orch.verify_batch("e2e")
            assert {p.problem for p in verify.problems} == {"unavailable"}
            assert {p.node_id for p in verify.problems} == {"gcp-node-1"}

            # It comes back (same id, same data dir, a new port): healthy again, its
            # replicas check out.
            with turns(cluster, "gcp-node-1", NodeStatus.HEALTHY) as up:
                async with running_node(tmp_path, url, "gcp", "us-central1",
                                        "gcp-node-1") as back:
                    await within(up.wait())
                    assert cluster.nodes["gcp-node-1"].url == back.url
                    assert (await orch.verify_batch("e2e")).ok

                    # A node that joins later shows up in the orchestrator's registry too.
                    with logged(WATCHER_LOG, "node gcp-node-2 joined") as joined:
                        async with running_node(tmp_path, url, "gcp", "us-east1"):
                            await within(joined.wait())
                    assert cluster.nodes["gcp-node-2"].location == Location("gcp", "us-east1")
        finally:
            await orch.close()
            await cluster.close()


# -- a node's heartbeats ---------------------------------------------------------------------

async def test_heartbeats_carry_the_node_usage(tmp_path: Path,
                                              registry_server: RegistryServer) -> None:
    async with running_node(tmp_path, registry_server.url, "aws", "us-east-1") as server:
        assert server.node_id == "aws-node-1"
        data = b"usage\n" * 1000
        blob, info = TransformChain(ProcessingConfig()).apply(
            Chunk(hashlib.sha256(data).hexdigest(), "f", 0, 0, len(data), "aws"), data)
        comm = HttpComm(TOKEN)
        try:
            target = NodeAddress("aws-node-1", Location("aws", "us-east-1"), server.url)
            await comm.call(target, Request("put", {"chunk_id": info.chunk_id,
                                                    "checksum": info.blob_checksum}, blob))
        finally:
            await comm.close()
        view = await eventually(
            lambda: (v := registry_server.state.get("aws-node-1")) and v["chunks"] == 1 and v,
            "a heartbeat reporting the stored chunk")
        assert view["bytes"] == len(blob)


async def test_a_crashed_node_stops_heartbeating(tmp_path: Path,
                                                 registry_server: RegistryServer) -> None:
    url = registry_server.url
    async with running_node(tmp_path, url, "aws", "us-east-1", allow_faults=True) as server:
        cluster = await connect_cluster(url, TOKEN, ClusterConfig(service=SERVICE))
        comm = HttpComm(TOKEN)
        target = NodeAddress("aws-node-1", Location("aws", "us-east-1"), server.url)
        try:
            with logged(REGISTRY_LOG, "node aws-node-1 unhealthy: no heartbeat") as silent, \
                    turns(cluster, "aws-node-1", NodeStatus.UNHEALTHY) as noticed:
                await cluster.faults.crash("aws-node-1")
                await within(silent.wait())
                await within(noticed.wait())
            # Still listening, but as a dead node would: it refuses everything.
            with pytest.raises(NodeUnavailable, match="crashed"):
                await comm.call(target, Request("health"))

            with logged(REGISTRY_LOG, "node aws-node-1 healthy again") as beating:
                await cluster.faults.restart("aws-node-1")
                await within(beating.wait())
            assert cluster.nodes["aws-node-1"].healthy
            assert (await comm.call(target, Request("health"))).meta["status"] == "ok"
        finally:
            await comm.close()
            await cluster.close()


async def test_a_node_joins_again_when_the_registry_forgets_it(tmp_path: Path) -> None:
    first = RegistryServer(tmp_path / "reg-1", TOKEN, SERVICE, host="127.0.0.1", port=0)
    url = await first.start()
    port = int(url.rsplit(":", 1)[1])
    async with running_node(tmp_path, url, "aws", "us-east-1", "aws-node-1"):
        with logged(NODE_LOG, "heartbeat from aws-node-1 failed") as failed:
            await first.stop()
            await within(failed.wait())  # it keeps beating while the registry is away
        # A registry with an empty data dir on the same port: the node's heartbeat gets
        # 404, and it registers again.
        second = RegistryServer(tmp_path / "reg-2", TOKEN, SERVICE, host="127.0.0.1",
                                port=port)
        with logged(REGISTRY_LOG, "node aws-node-1 registered") as joined:
            await second.start()
            try:
                await within(joined.wait())
                views = await fetch_nodes(url, TOKEN)
                assert [(v["id"], v["status"]) for v in views] == [("aws-node-1", "healthy")]
            finally:
                await second.stop()


# -- joining, and the errors on the way ------------------------------------------------------

async def test_connect_cluster_and_fetch_nodes_errors(registry_server: RegistryServer) -> None:
    url = registry_server.url
    with pytest.raises(ClusterError, match=r"has no nodes yet.*multicloud node --registry"):
        await connect_cluster(url, TOKEN)
    with pytest.raises(ClusterError, match="refused our token"):
        await fetch_nodes(url, "wrong")
    with pytest.raises(ClusterError, match="refused our token"):
        await connect_cluster(url, "wrong")
    with pytest.raises(ClusterError, match="cannot reach the registry"):
        await fetch_nodes(f"http://127.0.0.1:{free_port()}", TOKEN)


@pytest.fixture
async def odd_registry() -> AsyncIterator[tuple[str, list[web.StreamResponse]]]:
    """A server that answers each request with the next prepared response."""
    async with odd_server() as served:
        yield served


async def test_a_registry_that_answers_oddly(tmp_path: Path,
                                             odd_registry: tuple[str, list[web.Response]]) -> None:
    url, answers = odd_registry
    answers.append(web.json_response({"error": "busy"}, status=503))
    with pytest.raises(ClusterError, match="answered 503"):
        await fetch_nodes(url, TOKEN)
    # A proxy's error page, or a URL that is not a registry at all.
    answers.append(web.Response(status=502, text="<html>Bad Gateway</html>"))
    node = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", registry_url=url, service=SERVICE,
                      host="127.0.0.1", fsync=False)
    try:
        with pytest.raises(ClusterError, match="registry refused registration"):
            await node.start()
    finally:
        await node.stop()


async def test_a_node_the_registry_will_not_take(tmp_path: Path,
                                                 registry_server: RegistryServer) -> None:
    url = registry_server.url
    stranger = NodeServer(tmp_path, "wrong", "aws", "us-east-1", node_id="aws-node-1",
                          registry_url=url, service=SERVICE, host="127.0.0.1")
    with pytest.raises(ClusterError, match="registry refused registration"):
        await stranger.start()
    await stranger.stop()
    unnamed = NodeServer(tmp_path, TOKEN, "Not A Cloud", "r", registry_url=url,
                         service=SERVICE, host="127.0.0.1")
    with pytest.raises(ClusterError, match="cannot derive a node id"):
        await unnamed.start()
    await unnamed.stop()
    nowhere = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", node_id="aws-node-1",
                         registry_url=f"http://127.0.0.1:{free_port()}", service=SERVICE,
                         host="127.0.0.1")
    with pytest.raises(ClusterError, match="cannot reach the registry"):
        await nowhere.start()
    await nowhere.stop()
    assert registry_server.state.views() == []


# -- the watcher -----------------------------------------------------------------------------

def test_worker_from_view() -> None:
    view = {"id": "gcp-node-3", "cloud": "gcp", "region": "europe-west1",
            "url": "http://10.0.0.3:7411", "status": "unhealthy", "capacity_bytes": 2 * GIB}
    node = worker_from_view(view)
    assert (node.id, node.location, node.url) == ("gcp-node-3",
                                                  Location("gcp", "europe-west1"),
                                                  "http://10.0.0.3:7411")
    assert node.capacity_bytes == 2 * GIB
    assert not node.healthy
    del view["capacity_bytes"]
    view["status"] = "healthy"
    node = worker_from_view(view)
    assert node.healthy
    assert node.capacity_bytes == 100 * GIB


async def test_watcher_keeps_membership_while_the_registry_is_away() -> None:
    registry = NodeRegistry(ClusterConfig(nodes=SPECS),
                            [WorkerNode(s, url="http://127.0.0.1:1") for s in SPECS])
    watcher = MembershipWatcher(registry, f"http://127.0.0.1:{free_port()}", TOKEN, 0.01)
    with logged(WATCHER_LOG, "registry poll failed", times=3) as failed:
        watcher.start()
        try:
            await within(failed.wait())
        finally:
            await watcher.stop()
    assert not watcher.synced.is_set()
    assert set(registry.nodes) == {"aws-node-1", "gcp-node-1"}
    assert all(n.healthy and n.url == "http://127.0.0.1:1" for n in registry.nodes.values())


async def test_watcher_mirrors_the_registry(tmp_path: Path,
                                            registry_server: RegistryServer) -> None:
    url = registry_server.url
    registry = NodeRegistry(ClusterConfig(nodes=SPECS[:1]),
                            [WorkerNode(SPECS[0], url="http://127.0.0.1:1")])
    watcher = MembershipWatcher(registry, url, TOKEN, 0.01)
    async with running_node(tmp_path, url, "aws", "us-east-1", "aws-node-1") as aws, \
            running_node(tmp_path, url, "gcp", "us-central1") as gcp:
        with logged(WATCHER_LOG, "node gcp-node-1 joined") as joined:
            watcher.start()
            try:
                await within(joined.wait())
                await within(watcher.synced.wait())
            finally:
                await watcher.stop()
    assert registry.nodes["aws-node-1"].url == aws.url  # a node that moved is found again
    assert registry.nodes["gcp-node-1"].url == gcp.url
    assert registry.nodes["gcp-node-1"].healthy


async def test_watcher_does_not_revive_a_node_it_saw_fail() -> None:
    """A registry that has not noticed yet must not undo a failure we observed."""
    node = WorkerNode(SPECS[0], url="http://127.0.0.1:1")
    registry = NodeRegistry(ClusterConfig(nodes=SPECS[:1]), [node])
    watcher = MembershipWatcher(registry, "http://127.0.0.1:1", TOKEN, 60.0)  # never started
    changes: list[str] = []
    registry.subscribe(lambda n, old, reason: changes.append(f"{n.status.value}: {reason}"))

    def view(age: float | None, status: str = "healthy") -> dict[str, Any]:
        return {"id": "aws-node-1", "cloud": "aws", "region": "us-east-1",
                "url": "http://127.0.0.1:2", "status": status, "last_heartbeat_age_s": age}

    try:
        registry.record_failure("aws-node-1", 1, "connection refused")
        assert not node.healthy
        watcher.apply([view(age=5.0)])  # heard from before it failed: the registry is behind
        assert not node.healthy
        assert node.url == "http://127.0.0.1:2"
        watcher.apply([view(age=None)])  # a restarted registry that has not heard it yet
        assert not node.healthy
        watcher.apply([view(age=0.0)])  # a heartbeat after the failure: back in service
        assert node.healthy
        watcher.apply([view(age=9.0, status="unhealthy")])
        assert changes == ["unhealthy: 1 failed transfers, last: connection refused",
                           "healthy: heartbeats resumed", "unhealthy: missed heartbeats"]
        assert node.status is NodeStatus.UNHEALTHY
    finally:
        await watcher.stop()
