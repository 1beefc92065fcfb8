"""Tests for the cluster-mode registry: a real server on loopback, and its state on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from multicloud.control.registry_server import (
    REGISTRY_FILE,
    RegistryServer,
    RegistryState,
    serve_registry,
)
from multicloud.core.auth import auth_header
from multicloud.core.config import ServiceConfig
from multicloud.core.errors import ClusterError, ConfigError

TOKEN = "t0k"
TIMEOUT_S = 3.0
# A short interval makes the real server's sweep run every 25 ms; the fake clock decides health.
SERVICE = ServiceConfig(heartbeat_interval_s=0.05, failure_timeout_s=TIMEOUT_S)
class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def node(cloud: str = "aws", node_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A valid registration body."""
    return {"id": node_id, "cloud": cloud, "region": f"{cloud}-east-1",
            "url": "http://127.0.0.1:9000", "capacity_bytes": 1 << 30, **extra}


@contextlib.contextmanager
def logged(text: str) -> Iterator[asyncio.Event]:
    """An event set when the registry logs a message containing text."""
    event = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                event.set()

    logger = logging.getLogger("multicloud.control.registry_server")
    watch, level = Watch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        yield event
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


@pytest.fixture
def clock() -> FakeClock:
    """The clock the registry under test reads."""
    return FakeClock()


@pytest.fixture
async def start_registry(
    tmp_path: Path, clock: FakeClock,
) -> AsyncIterator[Callable[..., Awaitable[RegistryServer]]]:
    """Start registries on free loopback ports under tmp_path/registry; all stopped at the end."""
    servers: list[RegistryServer] = []

    async def start(service: ServiceConfig = SERVICE) -> RegistryServer:
        server = RegistryServer(tmp_path / "registry", TOKEN, service, host="127.0.0.1",
                                port=0, clock=clock)
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def registry(start_registry: Callable[..., Awaitable[RegistryServer]]) -> RegistryServer:
    """One running registry."""
    return await start_registry()


@pytest.fixture
async def client(registry: RegistryServer) -> AsyncIterator[aiohttp.ClientSession]:
    """An authenticated client of the registry."""
    async with aiohttp.ClientSession(registry.url, headers=auth_header(TOKEN)) as session:
        yield session


async def register(client: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    """Register a node and return its view."""
    async with client.post("/v1/nodes", json=body) as resp:
        assert resp.status == 200, await resp.text()
        view: dict[str, Any] = (await resp.json())["node"]
        return view


async def list_nodes(client: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """The registry's node list."""
    async with client.get("/v1/nodes") as resp:
        assert resp.status == 200
        nodes: list[dict[str, Any]] = (await resp.json())["nodes"]
        return nodes


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
async def test_requests_without_the_token_get_401_and_register_nothing(
    registry: RegistryServer, client: aiohttp.ClientSession, headers: dict[str, str],
) -> None:
    async with aiohttp.ClientSession(registry.url, headers=headers) as anon:
        for method, path in [("POST", "/v1/nodes"), ("GET", "/v1/nodes"),
                             ("POST", "/v1/nodes/aws-node-1/heartbeat"),
                             ("DELETE", "/v1/nodes/aws-node-1"), ("GET", "/v1/health"),
                             ("GET", "/metrics"), ("GET", "/no/such/path")]:
            async with anon.request(method, path, json=node()) as resp:
                assert resp.status == 401, (method, path)
                assert (await resp.json())["error"] == "unauthorized"
    assert await list_nodes(client) == []
    assert not (registry.data_dir / REGISTRY_FILE).exists()


async def test_register_assigns_the_next_free_id_per_cloud(
    client: aiohttp.ClientSession,
) -> None:
    assert (await register(client, node("aws")))["id"] == "aws-node-1"
    assert (await register(client, node("aws")))["id"] == "aws-node-2"
    assert (await register(client, node("gcp")))["id"] == "gcp-node-1"
    assert (await register(client, node("aws", "aws-node-4")))["id"] == "aws-node-4"
    body = node("aws")
    del body["id"]  # a missing id is the same as null
    assert (await register(client, body))["id"] == "aws-node-3"
    assert (await register(client, node("aws")))["id"] == "aws-node-5"
    async with client.delete("/v1/nodes/aws-node-1") as resp:
        assert resp.status == 200
    assert (await register(client, node("aws")))["id"] == "aws-node-1"  # freed ids are reused

    nodes = await list_nodes(client)
    assert [n["id"] for n in nodes] == sorted(n["id"] for n in nodes)
    view = nodes[0]
    assert set(view) == {"id", "cloud", "region", "url", "capacity_bytes", "status",
                         "last_heartbeat_age_s", "chunks", "bytes", "inflight",
                         "registered_at", "status_changes"}
    assert view["status"] == "healthy"
    assert view["last_heartbeat_age_s"] == 0.0
    assert view["capacity_bytes"] == 1 << 30


async def test_list_reports_the_detector_settings(client: aiohttp.ClientSession) -> None:
    async with client.get("/v1/nodes") as resp:
        body = await resp.json()
    assert body == {"nodes": [], "heartbeat_interval_s": 0.05, "failure_timeout_s": TIMEOUT_S}


async def test_registering_a_known_id_updates_it_and_counts_as_a_heartbeat(
    registry: RegistryServer, client: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    first = await register(client, node("aws", "aws-a"))
    clock.advance(TIMEOUT_S + 1)
    assert (await list_nodes(client))[0]["status"] == "unhealthy"

    again = await register(client, node("aws", "aws-a", url="http://10.0.0.7:9001/",
                                        region="us-west-2", capacity_bytes=5))
    assert again["url"] == "http://10.0.0.7:9001"
    assert (again["region"], again["capacity_bytes"]) == ("us-west-2", 5)
    assert again["registered_at"] == first["registered_at"]
    assert again["status"] == "healthy"
    assert again["last_heartbeat_age_s"] == 0.0
    assert again["status_changes"] == 2
    saved = json.loads((registry.data_dir / REGISTRY_FILE).read_text())
    assert saved["nodes"][0]["url"] == "http://10.0.0.7:9001"


@pytest.mark.parametrize(("body", "field"), [
    ({"cloud": "", "region": "r", "url": "http://h:1"}, "cloud"),
    ({"cloud": "aws", "url": "http://h:1"}, "region"),
    ({"cloud": "aws", "region": "  ", "url": "http://h:1"}, "region"),
    (node("aws", "Bad_Id"), "id"),
    (node("aws", "-leading"), "id"),
    (node("aws", "a" * 64), "id"),
    ({**node("aws"), "id": 7}, "id"),
    (node("aws", url="ftp://h/x"), "url"),
    (node("aws", url="127.0.0.1:9000"), "url"),
    (node("aws", url=None), "url"),
    (node("aws", capacity_bytes=-1), "capacity_bytes"),
    (node("aws", capacity_bytes="1 GB"), "capacity_bytes"),
    (node("AWS"), "cloud"),  # no valid id can be derived from it
])
async def test_bad_registrations_are_refused_with_400(
    registry: RegistryServer, client: aiohttp.ClientSession, body: dict[str, Any], field: str,
) -> None:
    async with client.post("/v1/nodes", json=body) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["error"] == "bad_request"
    assert field in answer["message"]
    assert await list_nodes(client) == []
    assert not (registry.data_dir / REGISTRY_FILE).exists()


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"aws"'])
async def test_a_body_that_is_not_a_json_object_is_refused(
    client: aiohttp.ClientSession, raw: bytes,
) -> None:
    async with client.post("/v1/nodes", data=raw,
                           headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"


async def test_a_known_id_cannot_move_to_another_cloud(client: aiohttp.ClientSession) -> None:
    await register(client, node("aws", "n1"))
    async with client.post("/v1/nodes", json=node("gcp", "n1")) as resp:
        assert resp.status == 400
        assert "DELETE" in (await resp.json())["message"]
    assert (await list_nodes(client))[0]["cloud"] == "aws"


async def test_an_oversized_body_is_refused(
    start_registry: Callable[..., Awaitable[RegistryServer]],
) -> None:
    tiny = ServiceConfig(heartbeat_interval_s=0.05, failure_timeout_s=TIMEOUT_S,
                         max_body_mb=0.001)
    server = await start_registry(tiny)
    async with aiohttp.ClientSession(server.url, headers=auth_header(TOKEN)) as session:
        async with session.post("/v1/nodes", json=node(region="r" * 4096)) as resp:
            assert resp.status == 413
        assert await list_nodes(session) == []


async def test_heartbeat_updates_the_load_counters(
    client: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    await register(client, node("aws"))
    clock.advance(1.5)
    async with client.post("/v1/nodes/aws-node-1/heartbeat",
                           json={"chunks": 12, "bytes": 3 << 20, "inflight": 2}) as resp:
        assert resp.status == 200
        view = (await resp.json())["node"]
    assert (view["chunks"], view["bytes"], view["inflight"]) == (12, 3 << 20, 2)
    assert view["last_heartbeat_age_s"] == 0.0
    clock.advance(0.5)
    async with client.post("/v1/nodes/aws-node-1/heartbeat", json={"inflight": 0}) as resp:
        view = (await resp.json())["node"]
    assert (view["chunks"], view["bytes"], view["inflight"]) == (12, 3 << 20, 0)
    async with client.post("/v1/nodes/aws-node-1/heartbeat") as resp:  # no body at all
        assert resp.status == 200
    clock.advance(0.25)
    async with client.get("/v1/nodes/aws-node-1") as resp:
        assert (await resp.json())["node"]["last_heartbeat_age_s"] == pytest.approx(0.25)


async def test_a_bad_heartbeat_is_refused(client: aiohttp.ClientSession) -> None:
    await register(client, node("aws"))
    async with client.post("/v1/nodes/aws-node-1/heartbeat", json={"chunks": -1}) as resp:
        assert resp.status == 400
        assert "chunks" in (await resp.json())["message"]
    async with client.post("/v1/nodes/aws-node-1/heartbeat", json={"bytes": True}) as resp:
        assert resp.status == 400


async def test_unknown_nodes_get_404(client: aiohttp.ClientSession) -> None:
    async with client.post("/v1/nodes/aws-node-9/heartbeat", json={"chunks": 1}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "unknown_node"
    async with client.get("/v1/nodes/aws-node-9") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "unknown_node"
    async with client.delete("/v1/nodes/aws-node-9") as resp:
        assert resp.status == 404
    assert await list_nodes(client) == []  # a heartbeat does not register


async def test_delete_removes_a_node_for_good(
    registry: RegistryServer, client: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    await register(client, node("aws"))
    await register(client, node("gcp"))
    async with client.delete("/v1/nodes/aws-node-1") as resp:
        assert resp.status == 200
        assert await resp.json() == {"removed": True}
    async with client.get("/v1/nodes/aws-node-1") as resp:
        assert resp.status == 404
    assert [n["id"] for n in await list_nodes(client)] == ["gcp-node-1"]
    reloaded = RegistryState(registry.data_dir, SERVICE, FakeClock())
    assert [v["id"] for v in reloaded.views()] == ["gcp-node-1"]


def test_detector_marks_silent_nodes_unhealthy_and_revives_them(tmp_path: Path,
                                                                clock: FakeClock) -> None:
    state = RegistryState(tmp_path, SERVICE, clock)
    state.register(node("aws"))
    state.register(node("gcp"))
    clock.advance(TIMEOUT_S)  # exactly at the timeout: still healthy
    state.heartbeat("gcp-node-1", {})
    assert state.sweep() == []

    clock.advance(0.5)
    views = {v["id"]: v for v in state.views()}  # a read may notice first; sweep still reports
    assert views["aws-node-1"]["status"] == "unhealthy"
    assert views["aws-node-1"]["last_heartbeat_age_s"] == pytest.approx(TIMEOUT_S + 0.5)
    assert views["gcp-node-1"]["status"] == "healthy"
    assert state.sweep() == [("aws-node-1", "unhealthy")]
    assert state.sweep() == []  # reported once
    clock.advance(10)
    assert state.sweep() == [("gcp-node-1", "unhealthy")]

    revived = state.heartbeat("aws-node-1", {"chunks": 3})
    assert revived is not None
    assert revived["status"] == "healthy"
    assert revived["status_changes"] == 2
    assert state.sweep() == [("aws-node-1", "healthy")]
    assert state.sweep() == []
    assert {v["id"]: v["status_changes"] for v in state.views()} == {"aws-node-1": 2,
                                                                     "gcp-node-1": 1}


def test_detector_logs_each_transition(tmp_path: Path, clock: FakeClock,
                                       caplog: pytest.LogCaptureFixture) -> None:
    state = RegistryState(tmp_path, SERVICE, clock)
    state.register(node("aws"))
    clock.advance(TIMEOUT_S + 1.25)
    with caplog.at_level(logging.INFO, logger="multicloud.control.registry_server"):
        state.sweep()
        state.sweep()
        state.heartbeat("aws-node-1", {})
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["node aws-node-1 unhealthy: no heartbeat for 4.2s",
                        "node aws-node-1 healthy again: heartbeat received"]


def test_heartbeats_do_not_rewrite_the_membership_file(tmp_path: Path,
                                                       clock: FakeClock) -> None:
    state = RegistryState(tmp_path, SERVICE, clock)
    state.register(node("aws"))
    path = tmp_path / REGISTRY_FILE
    before = os.stat(path)
    for _ in range(3):
        clock.advance(1)
        state.heartbeat("aws-node-1", {"chunks": 1})
    state.register(node("aws", "aws-node-1"))  # same values: no membership change
    assert os.stat(path).st_ino == before.st_ino  # every save os.replace()s a new file
    state.register(node("aws", "aws-node-1", capacity_bytes=7))
    assert os.stat(path).st_ino != before.st_ino
    assert not list(tmp_path.glob("*.tmp"))


async def test_membership_survives_a_restart_with_a_grace_period(
    start_registry: Callable[..., Awaitable[RegistryServer]], clock: FakeClock,
) -> None:
    first = await start_registry()
    async with aiohttp.ClientSession(first.url, headers=auth_header(TOKEN)) as session:
        await register(session, node("aws"))
        await register(session, node("gcp", "gcp-x", url="https://gcp-x.example:443"))
        before = await list_nodes(session)
    clock.advance(TIMEOUT_S * 5)  # down for longer than the failure timeout
    await first.stop()

    second = await start_registry()
    async with aiohttp.ClientSession(second.url, headers=auth_header(TOKEN)) as session:
        after = await list_nodes(session)
        persisted = ("id", "cloud", "region", "url", "capacity_bytes", "registered_at")
        assert [{k: n[k] for k in persisted} for n in after] == \
               [{k: n[k] for k in persisted} for n in before]
        assert all(n["status"] == "healthy" for n in after)  # grace: no flapping on restart
        assert all(n["last_heartbeat_age_s"] is None for n in after)

        clock.advance(TIMEOUT_S - 0.5)
        async with session.post("/v1/nodes/gcp-x/heartbeat", json={}) as resp:
            assert resp.status == 200
        clock.advance(1.0)  # grace is over; only the silent node goes down
        status = {n["id"]: n["status"] for n in await list_nodes(session)}
        assert status == {"aws-node-1": "unhealthy", "gcp-x": "healthy"}


@pytest.mark.parametrize("content", [
    "{not json",
    "[]",
    '{"nodes": {}}',
    '{"nodes": [{"id": "a", "cloud": "aws"}]}',
    '{"nodes": [{"id": "BAD", "cloud": "aws", "region": "r", "url": "http://h:1", '
    '"capacity_bytes": 1, "registered_at": 1.0}]}',
    '{"nodes": [{"id": "a", "cloud": "aws", "region": "r", "url": "http://h:1", '
    '"capacity_bytes": 1}]}',
])
async def test_a_corrupt_membership_file_is_a_config_error(
    tmp_path: Path, content: str, start_registry: Callable[..., Awaitable[RegistryServer]],
) -> None:
    data_dir = tmp_path / "registry"
    data_dir.mkdir()
    (data_dir / REGISTRY_FILE).write_text(content)
    with pytest.raises(ConfigError, match=re.escape(str(data_dir / REGISTRY_FILE))) as info:
        RegistryState(data_dir, SERVICE)
    assert "move it away" in str(info.value)
    with pytest.raises(ConfigError):
        await start_registry()


def test_a_duplicate_entry_is_a_config_error(tmp_path: Path, clock: FakeClock) -> None:
    RegistryState(tmp_path, SERVICE, clock).register(node("aws"))
    path = tmp_path / REGISTRY_FILE
    raw = json.loads(path.read_text())
    raw["nodes"].append(raw["nodes"][0])
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="appears twice"):
        RegistryState(tmp_path, SERVICE, clock)


async def test_health_counts_nodes(client: aiohttp.ClientSession, clock: FakeClock) -> None:
    async with client.get("/v1/health") as resp:
        assert await resp.json() == {"status": "ok", "nodes": 0, "healthy": 0}
    await register(client, node("aws"))
    clock.advance(TIMEOUT_S + 1)
    await register(client, node("gcp"))
    async with client.get("/v1/health") as resp:
        assert await resp.json() == {"status": "ok", "nodes": 2, "healthy": 1}


async def test_metrics_are_prometheus_text(client: aiohttp.ClientSession,
                                           clock: FakeClock) -> None:
    await register(client, node("aws"))
    await register(client, node("gcp", region='eu "west"\\1'))
    clock.advance(TIMEOUT_S + 1)
    async with client.post("/v1/nodes/gcp-node-1/heartbeat", json={}) as resp:
        assert resp.status == 200
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await resp.text()

    assert text.endswith("\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {"multicloud_registry_nodes", "multicloud_registry_heartbeats",
                             "multicloud_registry_node_up"}
    assert families["multicloud_registry_heartbeats"].type == "counter"

    def sample(family: str, **labels: str) -> float:
        [value] = [s.value for s in families[family].samples if s.labels == labels]
        return value

    assert sample("multicloud_registry_nodes", status="healthy") == 1
    assert sample("multicloud_registry_nodes", status="unhealthy") == 1
    assert [s.value for s in families["multicloud_registry_heartbeats"].samples
            if s.name == "multicloud_registry_heartbeats_total"] == [1]
    assert sample("multicloud_registry_node_up", node="aws-node-1", cloud="aws",
                  region="aws-east-1") == 0
    # Label values are escaped: quotes and backslashes come back as they were registered.
    assert sample("multicloud_registry_node_up", node="gcp-node-1", cloud="gcp",
                  region='eu "west"\\1') == 1


async def test_the_sweep_task_detects_silence_on_its_own(
    registry: RegistryServer, client: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    await register(client, node("aws"))
    with logged("node aws-node-1 unhealthy") as noticed:
        clock.advance(TIMEOUT_S + 1)
        # No request reads the node: only the background sweep can notice.
        async with asyncio.timeout(2):
            await noticed.wait()
    assert registry.state.sweep() == []  # the background sweep already took the transition
    assert (await list_nodes(client))[0]["status_changes"] == 1


async def test_stop_is_clean_and_idempotent(registry: RegistryServer) -> None:
    url = registry.url
    await registry.stop()
    await registry.stop()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{url}/v1/health", headers=auth_header(TOKEN))


async def test_a_busy_port_is_a_cluster_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = RegistryServer(tmp_path, TOKEN, SERVICE, host="127.0.0.1", port=port)
        with pytest.raises(ClusterError, match=f"127.0.0.1:{port}"):
            await server.start()
        await server.stop()  # nothing left to stop; must not fail


async def test_serve_registry_stops_on_sigterm(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with logged("registry listening on") as listening:
        task = asyncio.create_task(serve_registry(tmp_path, TOKEN, SERVICE, "127.0.0.1", 0))
        try:
            async with asyncio.timeout(2):
                await listening.wait()
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the registry's signal handler
            async with asyncio.timeout(2):
                await task
        finally:
            task.cancel()
    assert signal.getsignal(signal.SIGTERM) == before
