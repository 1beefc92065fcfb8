"""Cluster mode's HTTP code in one process: wire formats, tokens, ready files, a real
`NodeServer` driven by a real `HttpTransport`, and a registry with nodes end to end.

No subprocesses: servers listen on loopback ports inside the test's event loop, so these run
in seconds and give the HTTP code its coverage. Waits poll a condition to a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multicloud.comm.http_transport import HttpTransport
from prometheus_client.parser import text_string_to_metric_families

from multicloud import PipelineOrchestrator
from multicloud.blob import blob_checksum, decode_blob
from multicloud.cluster import node_server
from multicloud.cluster.node_server import NodeServer
from multicloud.cluster.remote import MembershipWatcher, connect_cluster, fetch_nodes
from multicloud.comm import wire
from multicloud.control.registry import NodeRegistry, WorkerNode
from multicloud.control.registry_server import RegistryServer
from multicloud.core.auth import (
    TOKEN_ENV,
    auth_header,
    auth_middleware,
    generate_token,
    read_token_file,
    resolve_token,
)
from multicloud.core.config import (
    ClusterConfig,
    NodeSpec,
    ProcessingConfig,
    ServiceConfig,
    load_config,
)
from multicloud.core.errors import (
    ChunkNotFound,
    ClusterError,
    ConfigError,
    IntegrityError,
    InvalidChunkId,
    NodeUnavailable,
    StorageError,
    ValidationFailed,
)
from multicloud.core.network import Location, NetworkTopology
from multicloud.core.runfiles import ready_file, wait_for_signal, write_ready_file
from multicloud.core.types import BlobInfo, Chunk, NodeStatus, ReplicaAck

TOKEN = "unit-token"
MIB = 1024 * 1024
SERVICE = ServiceConfig(heartbeat_interval_s=0.05, failure_timeout_s=0.3, max_body_mb=1)
ORIGIN = Location("aws", "us-east-1")


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    """Poll check() until truthy; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return result


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_chunk(data: bytes, *, file: str = "f.bin", index: int = 0,
               line_prefix: bytes | None = None) -> Chunk:
    return Chunk(chunk_id=hashlib.sha256(data).hexdigest(), file=file, index=index,
                 offset=index * len(data), size_bytes=len(data), source_cloud="aws",
                 line_prefix=line_prefix)


# -- wire ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [None, b"", b"half a line", bytes(range(256)),
                                    b"x" * 4096])
def test_chunk_header_round_trip(prefix: bytes | None) -> None:
    chunk = Chunk(chunk_id="ab" * 32, file="dir/ü.csv", index=3, offset=3 * 65536,
                  size_bytes=65536, source_cloud="gcp", path=Path("/src/dir/ü.csv"),
                  record_format="csv", csv_columns=7, at_file_end=False, line_prefix=prefix,
                  data=b"never sent")
    header = wire.chunk_to_header(chunk)
    header.encode("latin-1")  # a valid HTTP header value: JSON escapes anything non-ASCII
    assert "never sent" not in header
    assert "/src/" not in header
    back = wire.chunk_from_header(header)
    assert back == Chunk(chunk_id="ab" * 32, file="dir/ü.csv", index=3, offset=3 * 65536,
                         size_bytes=65536, source_cloud="gcp", record_format="csv",
                         csv_columns=7, at_file_end=False, line_prefix=prefix)
    assert back.line_prefix == prefix
    assert back.path is None
    assert back.data is None


def test_a_long_line_prefix_stays_out_of_the_header() -> None:
    chunk = make_chunk(b"data", line_prefix=b"y" * 4097)
    header = wire.chunk_to_header(chunk)
    assert "line_prefix" not in json.loads(header)
    assert wire.chunk_from_header(header).line_prefix is None


def test_blob_ack_and_link_json_round_trip() -> None:
    info = BlobInfo("cd" * 32, raw_size=10, blob_size=7, blob_checksum="f" * 32, codec="zstd")
    assert wire.blob_from_json(json.loads(json.dumps(wire.blob_to_json(info)))) == info
    ack = ReplicaAck("gcp-node-1", "cd" * 32, "f" * 32, 7, 0.25)
    assert wire.ack_from_json(json.loads(json.dumps(wire.ack_to_json(ack)))) == ack
    link = NetworkTopology(ClusterConfig()).link(ORIGIN, Location("gcp", "us-central1"))
    back = wire.link_from_json(json.loads(json.dumps(wire.link_to_json(link))))
    assert back == link
    assert back.cross_cloud
    assert back.name == "aws/us-east-1->gcp/us-central1"


ERRORS: list[tuple[BaseException, int, str, type[BaseException]]] = [
    (InvalidChunkId("not-hex"), 400, "invalid_id", InvalidChunkId),
    (ChunkNotFound("chunk x is not here"), 404, "not_found", ChunkNotFound),
    (IntegrityError("checksum mismatch"), 422, "integrity", IntegrityError),
    (ValidationFailed("bad record"), 422, "validation", ValidationFailed),
    (NodeUnavailable("gcp-node-9", "connection refused"), 502, "node_unavailable",
     NodeUnavailable),
    (ConfigError("bad value"), 400, "bad_request", StorageError),
    (StorageError("disk trouble"), 500, "internal", StorageError),
    (RuntimeError("a bug"), 500, "internal", StorageError),
]


@pytest.mark.parametrize(("exc", "status", "code", "raised"), ERRORS,
                         ids=[e[2] + "-" + type(e[0]).__name__ for e in ERRORS])
def test_error_body_and_raise_for_error_round_trip(exc: BaseException, status: int, code: str,
                                                   raised: type[BaseException]) -> None:
    got_status, body = wire.error_body(exc, "aws-node-1")
    assert (got_status, body["error"]) == (status, code)
    assert wire.STATUS[code] == status
    assert body["message"] == str(exc)
    assert body["node_id"] == ("gcp-node-9" if code == "node_unavailable" else "aws-node-1")
    with pytest.raises(raised) as info:
        wire.raise_for_error(got_status, json.loads(json.dumps(body)), "aws-node-1")
    if isinstance(exc, InvalidChunkId):
        assert info.value.chunk_id == "not-hex"  # type: ignore[attr-defined]
    if isinstance(exc, NodeUnavailable):
        # The culprit travels: the node that could not be reached, not the one that said so.
        assert info.value.node_id == "gcp-node-9"  # type: ignore[attr-defined]
        assert str(info.value) == str(exc)  # the same message, not "unavailable" twice
    if raised is StorageError:
        assert f"HTTP {status}" in str(info.value)


@pytest.mark.parametrize(("status", "body", "raised", "text"), [
    (404, None, ChunkNotFound, "HTTP 404 from n1"),
    (404, {"error": "unknown_node", "message": "gone"}, ChunkNotFound, "gone"),
    (502, None, NodeUnavailable, "HTTP 502 from n1"),
    (503, {"error": "not_ready", "message": "node is starting", "node_id": None},
     NodeUnavailable, "node is starting"),
    (503, None, NodeUnavailable, "n1"),
    (401, {"error": "unauthorized"}, ClusterError, "refused our token"),
    (413, {"error": "too_large", "message": "over 1 MB"}, StorageError, "too large: over 1 MB"),
    (500, {"error": "internal", "message": "boom"}, StorageError, "HTTP 500: boom"),
    (418, {}, StorageError, "HTTP 418"),
    (400, {"error": "invalid_id", "message": "no quotes here"}, InvalidChunkId,
     "no quotes here"),
])
def test_raise_for_error_without_a_matching_body(status: int, body: dict[str, Any] | None,
                                                 raised: type[BaseException],
                                                 text: str) -> None:
    with pytest.raises(raised, match=text) as info:
        wire.raise_for_error(status, body, "n1")
    if raised is ClusterError:
        assert not isinstance(info.value, NodeUnavailable)  # a bad token is not an outage
    if raised is NodeUnavailable:
        assert info.value.node_id == "n1"  # type: ignore[attr-defined]


# -- auth ------------------------------------------------------------------------------------

def test_generate_token_creates_a_private_file_once(tmp_path: Path) -> None:
    token = generate_token(tmp_path / "data")
    path = tmp_path / "data" / "token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(token) >= 32
    assert path.read_text() == token + "\n"
    assert generate_token(tmp_path / "data") == token  # kept, not regenerated
    assert generate_token(tmp_path / "other") != token


def test_read_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read token file"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(tmp_path / "empty")
    (tmp_path / "ok").write_text("  secret \n")
    assert read_token_file(tmp_path / "ok") == "secret"


def test_resolve_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "token").write_text("from-data-dir\n")
    explicit = tmp_path / "explicit"
    explicit.write_text("from-file\n")
    monkeypatch.setenv(TOKEN_ENV, " from-env ")
    assert resolve_token(explicit, data) == "from-file"
    assert resolve_token(None, data) == "from-env"
    monkeypatch.setenv(TOKEN_ENV, "   ")  # blank counts as unset
    assert resolve_token(None, data) == "from-data-dir"
    monkeypatch.delenv(TOKEN_ENV)
    assert resolve_token(None, data) == "from-data-dir"


def test_resolve_token_missing_is_a_config_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=TOKEN_ENV) as info:
        resolve_token(None, tmp_path)
    assert str(tmp_path / "token") in str(info.value)
    assert not (tmp_path / "token").exists()
    with pytest.raises(ConfigError, match="--token-file"):
        resolve_token()
    made = resolve_token(None, tmp_path / "new", create=True)
    assert (tmp_path / "new" / "token").read_text().strip() == made


async def test_auth_middleware_answers_401_before_the_handler() -> None:
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(await request.text())
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[auth_middleware(TOKEN)])
    app.router.add_post("/x", handler)
    async with TestClient(TestServer(app)) as client:
        for headers in ({}, {"Authorization": TOKEN}, {"Authorization": "Bearer " + TOKEN[:-1]},
                        {"Authorization": "Bearer"}, {"Authorization": f"Basic {TOKEN}"}):
            resp = await client.post("/x", data=b"payload", headers=headers)
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"] == "unauthorized"
        assert calls == []
        resp = await client.post("/x", data=b"payload", headers=auth_header(TOKEN))
        assert resp.status == 200
        assert calls == ["payload"]


# -- process ---------------------------------------------------------------------------------

def test_write_ready_file_is_atomic_and_complete(tmp_path: Path) -> None:
    path = write_ready_file(tmp_path, "aws-node-1", "http://127.0.0.1:1234")
    assert path == ready_file(tmp_path, "aws-node-1") == tmp_path / "run" / "aws-node-1.json"
    assert json.loads(path.read_text()) == {"name": "aws-node-1", "url": "http://127.0.0.1:1234",
                                            "pid": os.getpid()}
    write_ready_file(tmp_path, "aws-node-1", "http://127.0.0.1:5678")
    assert json.loads(path.read_text())["url"] == "http://127.0.0.1:5678"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["aws-node-1.json"]


async def test_wait_for_signal_returns_on_sigterm_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    task = asyncio.create_task(wait_for_signal())
    await eventually(lambda: signal.getsignal(signal.SIGTERM) != before,
                     "the handler to be installed")
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        await task
    assert signal.getsignal(signal.SIGTERM) == before


# -- a NodeServer driven by HttpTransport ----------------------------------------------------

@dataclass
class Rig:
    """Two node servers (aws, gcp), a transport and a NodeRegistry that reach them."""

    aws: NodeServer
    gcp: NodeServer
    transport: HttpTransport
    registry: NodeRegistry
    root: Path

    def node(self, node_id: str) -> WorkerNode:
        return self.registry.nodes[node_id]

    def object_path(self, node_id: str, chunk_id: str) -> Path:
        return (self.root / "nodes" / node_id / "objects" / chunk_id[:2] / chunk_id[2:4]
                / chunk_id)


SPECS = [NodeSpec(id="aws-node-1", cloud="aws", region="us-east-1"),
         NodeSpec(id="gcp-node-1", cloud="gcp", region="us-central1"),
         NodeSpec(id="gcp-node-2", cloud="gcp", region="us-east1")]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    aws = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", node_id="aws-node-1",
                     registry_url=None, service=SERVICE, port=0, fsync=False)
    gcp = NodeServer(tmp_path, TOKEN, "gcp", "us-central1", node_id="gcp-node-1",
                     registry_url=None, service=SERVICE, port=0, fsync=False)
    await aws.start()
    await gcp.start()
    config = ClusterConfig(nodes=SPECS)
    topology = NetworkTopology(config)
    transport = HttpTransport(TOKEN, topology, 0.0)
    # gcp-node-2 is registered but nothing listens on its port: a node that is down.
    nodes = [WorkerNode(SPECS[0], url=aws.url), WorkerNode(SPECS[1], url=gcp.url),
             WorkerNode(SPECS[2], url=f"http://127.0.0.1:{free_port()}")]
    registry = NodeRegistry(config, nodes, transport, topology, data_dir=tmp_path)
    transport.attach(registry)
    try:
        yield Rig(aws, gcp, transport, registry, tmp_path)
    finally:
        await registry.close()
        await gcp.stop()
        await aws.stop()


async def processed(rig: Rig, data: bytes, node_id: str = "aws-node-1") -> BlobInfo:
    await rig.transport.configure(ProcessingConfig())
    return await rig.transport.process(rig.node(node_id), make_chunk(data), data, ORIGIN)


async def test_process_replicate_read_release(rig: Rig) -> None:
    data = b'{"event": "click", "n": 1}\n' * 4000
    await rig.transport.configure(ProcessingConfig())
    assert rig.node("gcp-node-2").consecutive_failures == 1  # down: counted, not raised
    assert rig.node("aws-node-1").consecutive_failures == 0
    chunk = make_chunk(data)
    info = await rig.transport.process(rig.node("aws-node-1"), chunk, data, ORIGIN)
    assert info.chunk_id == chunk.chunk_id
    assert info.raw_size == len(data)
    assert info.codec == "zstd"
    assert info.blob_size < len(data)
    staged = rig.aws.node.staged_blob(chunk.chunk_id)  # type: ignore[union-attr]
    assert staged is not None
    assert blob_checksum(staged) == info.blob_checksum

    ledger = rig.transport.ledger.snapshot()
    assert ledger["aws/us-east-1->aws/us-east-1"].bytes == len(data)  # raw bytes sent once

    own = await rig.transport.replicate(rig.node("aws-node-1"), rig.node("aws-node-1"), info)
    assert (own.node_id, own.chunk_id, own.blob_size) == ("aws-node-1", chunk.chunk_id,
                                                          info.blob_size)
    assert rig.object_path("aws-node-1", chunk.chunk_id).read_bytes() == staged
    assert rig.transport.ledger.snapshot() == ledger  # storing in place moves nothing

    remote = await rig.transport.replicate(rig.node("aws-node-1"), rig.node("gcp-node-1"), info)
    assert remote.node_id == "gcp-node-1"
    assert remote.blob_checksum == info.blob_checksum
    assert rig.object_path("gcp-node-1", chunk.chunk_id).read_bytes() == staged
    cross = rig.transport.ledger.snapshot()["aws/us-east-1->gcp/us-central1"]
    assert (cross.transfers, cross.bytes, cross.cross_cloud) == (1, info.blob_size, True)
    assert cross.egress_usd > 0

    await rig.transport.release(rig.node("aws-node-1"), chunk.chunk_id)
    assert rig.aws.node.staged_blob(chunk.chunk_id) is None  # type: ignore[union-attr]
    # With the staged copy gone, a push reads the stored, verified replica instead.
    rig.object_path("gcp-node-1", chunk.chunk_id).unlink()
    again = await rig.transport.replicate(rig.node("aws-node-1"), rig.node("gcp-node-1"), info)
    assert again.blob_size == info.blob_size
    assert rig.object_path("gcp-node-1", chunk.chunk_id).exists()

    dest = Location("gcp", "us-central1")
    blob = await rig.transport.read(rig.node("gcp-node-1"), chunk.chunk_id, dest)
    assert blob == staged
    assert decode_blob(blob, None, chunk.chunk_id) == data
    assert rig.transport.ledger.snapshot()["gcp/us-central1->gcp/us-central1"].bytes == len(blob)


async def test_check_inventory_usage_delete(rig: Rig) -> None:
    info = await processed(rig, b"line\n" * 3000)
    node = rig.node("aws-node-1")
    await rig.transport.replicate(node, node, info)
    chunk_id = info.chunk_id
    assert await rig.transport.inventory(node) == [chunk_id]
    assert await rig.transport.usage(node) == (1, info.blob_size)
    assert await rig.transport.check(node, chunk_id) == "ok"

    path = rig.object_path("aws-node-1", chunk_id)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    assert await rig.transport.check(node, chunk_id) == "corrupt"
    with pytest.raises(IntegrityError):
        await rig.transport.read(node, chunk_id, ORIGIN)
    path.write_bytes(good)
    assert await rig.transport.check(node, chunk_id) == "ok"

    assert await rig.transport.delete(node, chunk_id) is True
    assert await rig.transport.delete(node, chunk_id) is False
    assert await rig.transport.check(node, chunk_id) == "missing"
    assert await rig.transport.inventory(node) == []
    assert await rig.transport.usage(node) == (0, 0)
    with pytest.raises(ChunkNotFound):
        await rig.transport.read(node, chunk_id, ORIGIN)


async def test_errors_come_back_as_their_exceptions(rig: Rig) -> None:
    aws, gcp, down = rig.node("aws-node-1"), rig.node("gcp-node-1"), rig.node("gcp-node-2")
    await rig.transport.configure(ProcessingConfig())
    with pytest.raises(InvalidChunkId) as bad:
        await rig.transport.read(aws, "not-hex", ORIGIN)
    assert bad.value.chunk_id == "not-hex"
    for call in (rig.transport.check(aws, "A" * 64), rig.transport.delete(aws, "0" * 63)):
        with pytest.raises(InvalidChunkId):
            await call
    with pytest.raises(ChunkNotFound):
        await rig.transport.read(aws, "0" * 64, ORIGIN)

    # Processing data that does not match its chunk id: a validation failure.
    data = b"abc\n" * 100
    wrong = make_chunk(b"something else")
    wrong.size_bytes = len(data)
    with pytest.raises(ValidationFailed, match="SHA-256"):
        await rig.transport.process(aws, wrong, data, ORIGIN)

    # Pushing what the node neither staged nor stored.
    ghost = BlobInfo("e" * 64, 1, 1, "0" * 32, "raw")
    with pytest.raises(ChunkNotFound):
        await rig.transport.replicate(aws, aws, ghost)
    with pytest.raises(ChunkNotFound):
        await rig.transport.replicate(aws, gcp, ghost)

    # A blob whose checksum the receiver cannot match is refused, and not stored.
    info = await processed(rig, b"x,y\n" * 2000)
    lying = BlobInfo(info.chunk_id, info.raw_size, info.blob_size, "0" * 32, info.codec)
    with pytest.raises(IntegrityError, match="nothing was stored"):
        await rig.transport.replicate(aws, gcp, lying)
    assert not rig.object_path("gcp-node-1", info.chunk_id).exists()

    # A node that is down: the caller learns which node, from either side of a push.
    with pytest.raises(NodeUnavailable) as unreachable:
        await rig.transport.usage(down)
    assert unreachable.value.node_id == "gcp-node-2"
    with pytest.raises(NodeUnavailable) as target_down:
        await rig.transport.replicate(aws, down, info)
    assert target_down.value.node_id == "gcp-node-2"
    assert str(target_down.value).count("is unavailable") == 1
    assert "unreachable from aws-node-1" in str(target_down.value)
    nowhere = WorkerNode(NodeSpec(id="aws-node-9", cloud="aws", region="us-east-1"))
    with pytest.raises(NodeUnavailable, match="no URL"):
        await rig.transport.inventory(nowhere)


async def test_a_wrong_token_is_a_cluster_error_not_an_outage(rig: Rig) -> None:
    stranger = HttpTransport("not-the-token", rig.registry.topology)
    try:
        with pytest.raises(ClusterError, match="refused our token") as info:
            await stranger.inventory(rig.node("aws-node-1"))
        assert not isinstance(info.value, NodeUnavailable)
    finally:
        await stranger.close()


async def test_oversized_bodies_are_refused_with_413(rig: Rig) -> None:
    await rig.transport.configure(ProcessingConfig())
    data = os.urandom(2 * MIB)
    with pytest.raises(StorageError, match="too large"):
        await rig.transport.process(rig.node("aws-node-1"), make_chunk(data), data, ORIGIN)
    assert rig.aws.node.staged_blob(make_chunk(data).chunk_id) is None  # type: ignore[union-attr]
    async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http:
        chunk_id = hashlib.sha256(data).hexdigest()
        async with http.put(f"{rig.aws.url}/v1/chunks/{chunk_id}", data=data,
                            headers={wire.CHECKSUM_HEADER: blob_checksum(data)}) as resp:
            assert resp.status == 413
            body = await resp.json()
            assert body["error"] == "too_large"
            assert body["node_id"] == "aws-node-1"
    assert not rig.object_path("aws-node-1", chunk_id).exists()


async def test_plain_http_endpoints(rig: Rig) -> None:
    info = await processed(rig, b"k=v\n" * 1000)
    node = rig.node("aws-node-1")
    await rig.transport.replicate(node, node, info)
    base = rig.aws.url
    async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http:
        async with http.get(f"{base}/v1/health") as resp:
            assert await resp.json() == {"id": "aws-node-1", "cloud": "aws",
                                         "region": "us-east-1", "status": "ok", "inflight": 1}
        async with http.head(f"{base}/v1/chunks/{info.chunk_id}") as resp:
            assert resp.status == 200
        async with http.head(f"{base}/v1/chunks/{'0' * 64}") as resp:
            assert resp.status == 404
        async with http.put(f"{base}/v1/chunks/{info.chunk_id}", data=b"x") as resp:
            assert resp.status == 400  # no checksum header
            assert "X-Multicloud-Checksum" in (await resp.json())["message"]
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            text = await resp.text()
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        labels = {"node": "aws-node-1", "cloud": "aws", "region": "us-east-1"}
        for name in ("multicloud_node_chunks", "multicloud_node_bytes",
                     "multicloud_node_inflight_requests"):
            assert samples[name].labels == labels
        assert samples["multicloud_node_inflight_requests"].value == 0  # the scrape itself
        async with http.get(f"{base}/v1/nope") as resp:
            assert resp.status == 404


async def test_configure_sets_link_emulation_and_worker_slots(rig: Rig) -> None:
    slow = HttpTransport(TOKEN, rig.registry.topology, time_scale=0.5)
    slow.attach(rig.registry)
    try:
        await slow.configure(ProcessingConfig(max_workers_per_node=2))
    finally:
        await slow.close()
    assert rig.aws.links.time_scale == 0.5
    assert rig.gcp.links.time_scale == 0.5
    assert rig.aws.node.max_workers == 2  # type: ignore[union-attr]
    unattached = HttpTransport(TOKEN, rig.registry.topology)
    await unattached.configure(ProcessingConfig())  # no registry: nothing to configure
    await unattached.close()


async def test_stop_lets_an_inflight_write_finish(rig: Rig) -> None:
    """SIGTERM's path: stop accepting, let the running write become durable, then exit."""
    info = await processed(rig, b"drain\n" * 5000)
    blob = rig.aws.node.staged_blob(info.chunk_id)  # type: ignore[union-attr]
    assert blob is not None
    store = rig.gcp.node.store  # type: ignore[union-attr]
    entered, release = threading.Event(), threading.Event()
    real_put = store.put

    def held_put(chunk_id: str, data: bytes | memoryview) -> None:
        entered.set()
        release.wait(10)
        real_put(chunk_id, data)

    store.put = held_put  # type: ignore[method-assign]
    url = f"{rig.gcp.url}/v1/chunks/{info.chunk_id}"
    async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http:
        write = asyncio.create_task(http.put(url, data=blob,
                                             headers={wire.CHECKSUM_HEADER: info.blob_checksum}))
        await eventually(entered.is_set, "the write to reach the store")
        stopping = asyncio.create_task(rig.gcp.stop())

        def refusing() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", int(rig.gcp.url.rsplit(":", 1)[1]))) != 0

        await eventually(refusing, "the node to stop accepting connections")
        assert not write.done()
        release.set()
        resp = await write
        assert resp.status == 201
        resp.release()
        await stopping
    assert rig.object_path("gcp-node-1", info.chunk_id).read_bytes() == blob
    with pytest.raises(NodeUnavailable):
        await rig.transport.usage(rig.node("gcp-node-1"))


async def test_a_node_needs_an_id_without_a_registry(tmp_path: Path) -> None:
    server = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", registry_url=None, service=SERVICE)
    with pytest.raises(ClusterError, match="--id"):
        await server.start()
    await server.stop()


async def test_a_node_still_opening_its_store_answers_503(rig: Rig) -> None:
    service, rig.aws.node = rig.aws.node, None  # the window between bind and store open
    try:
        with pytest.raises(NodeUnavailable, match="node is starting") as info:
            await rig.transport.inventory(rig.node("aws-node-1"))
        assert info.value.node_id == "aws-node-1"
        async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http, \
                http.get(f"{rig.aws.url}/v1/health") as resp:
            assert (await resp.json())["status"] == "starting"
    finally:
        rig.aws.node = service


@pytest.fixture
async def odd_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that answers every request with the next status in a list, as plain text."""
    statuses: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=statuses.pop(0) if statuses else 500, text="oops")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), statuses
    finally:
        await server.close()


async def test_odd_answers_become_errors(odd_server: tuple[str, list[int]]) -> None:
    url, statuses = odd_server
    config = ClusterConfig(nodes=SPECS[:1])
    transport = HttpTransport(TOKEN, NetworkTopology(config))
    registry = NodeRegistry(config, [WorkerNode(SPECS[0], url=url)], transport)
    transport.attach(registry)
    try:
        statuses.append(500)  # a body that is not JSON
        with pytest.raises(StorageError, match="HTTP 500 from aws-node-1"):
            await transport.usage(registry.nodes["aws-node-1"])
        statuses.append(401)  # not an outage: configure must not swallow it
        with pytest.raises(ClusterError, match="refused our token"):
            await transport.configure(ProcessingConfig())
        assert registry.nodes["aws-node-1"].consecutive_failures == 0
        statuses.append(503)
        with pytest.raises(ClusterError, match="answered 503"):
            await fetch_nodes(url, TOKEN)
    finally:
        await registry.close()


# -- a registry and nodes in one event loop --------------------------------------------------

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
                       node_id: str | None = None) -> AsyncIterator[NodeServer]:
    server = NodeServer(root, TOKEN, cloud, region, node_id=node_id, registry_url=registry_url,
                        service=SERVICE, port=0, fsync=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def two_node_config(tmp_path: Path) -> Any:
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "ingestion_config.yml").write_text("chunk_size_mb: 0.0625\n")
    config = load_config(tmp_path / "cfg")
    return config.replace(distribution={"replication_factor": 2, "write_quorum": 2},
                          cluster={"service": SERVICE.model_dump()})


async def test_pipeline_end_to_end_through_a_registry(
        tmp_path: Path, registry_server: RegistryServer,
        make_dataset: Callable[..., Path]) -> None:
    config = two_node_config(tmp_path)
    source = make_dataset("e2e", size=512 * 1024, seed=5)
    url = registry_server.url
    async with running_node(tmp_path, url, "aws", "us-east-1") as aws, \
            running_node(tmp_path, url, "gcp", "us-central1", "gcp-node-1") as gcp:
        assert aws.node_id == "aws-node-1"  # named by the registry
        registry = await connect_cluster(url, TOKEN, config.cluster, data_dir=tmp_path / "orch")
        orch = PipelineOrchestrator(registry, config=config)
        try:
            assert {n: (v.url, v.healthy) for n, v in registry.nodes.items()} == {
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
            assert stored == set(orch.storage_manager.manifest.chunk_ids("e2e"))

            # Heartbeats stop: the registry's detector, then the watcher, take it out.
            await gcp.stop()
            await eventually(lambda: not registry.nodes["gcp-node-1"].healthy,
                             "the watcher to mark gcp-node-1 unhealthy")
            assert registry_server.state.get("gcp-node-1")["status"] == "unhealthy"  # type: ignore[index]
            late = await connect_cluster(url, TOKEN, config.cluster)
            assert not late.nodes["gcp-node-1"].healthy  # joins knowing it is down
            assert late.nodes["aws-node-1"].healthy
            await late.close()
            verify = await orch.verify_batch("e2e")
            assert {p.problem for p in verify.problems} == {"unavailable"}
            assert {p.node_id for p in verify.problems} == {"gcp-node-1"}

            # It comes back (same id, same data dir): healthy again, its replicas check out.
            async with running_node(tmp_path, url, "gcp", "us-central1", "gcp-node-1") as back:
                await eventually(lambda: registry.nodes["gcp-node-1"].healthy
                                 and registry.nodes["gcp-node-1"].url == back.url,
                                 "the watcher to see gcp-node-1 back")
                assert (await orch.verify_batch("e2e")).ok

                # A node that joins later shows up in the orchestrator's registry too.
                async with running_node(tmp_path, url, "gcp", "us-east1"):
                    await eventually(lambda: "gcp-node-2" in registry.nodes,
                                     "the watcher to add gcp-node-2")
                    assert registry.nodes["gcp-node-2"].cloud == "gcp"
        finally:
            await orch.close()
            await registry.close()


async def test_a_node_joins_again_when_the_registry_forgets_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="multicloud.cluster.node_server")
    first = RegistryServer(tmp_path / "reg-1", TOKEN, SERVICE, host="127.0.0.1", port=0)
    url = await first.start()
    port = int(url.rsplit(":", 1)[1])
    async with running_node(tmp_path, url, "aws", "us-east-1", "aws-node-1"):
        await first.stop()
        # The node keeps beating while the registry is away.
        await eventually(lambda: any("heartbeat from aws-node-1 failed" in r.getMessage()
                                     for r in caplog.records), "a failed heartbeat")
        # A registry with an empty data dir on the same port: the node's heartbeat gets 404,
        # and it registers again.
        second = RegistryServer(tmp_path / "reg-2", TOKEN, SERVICE, host="127.0.0.1", port=port)
        await second.start()
        try:
            await eventually(lambda: second.state.get("aws-node-1") is not None,
                             "aws-node-1 to register with the new registry")
            views = await fetch_nodes(url, TOKEN)
            assert [(v["id"], v["status"]) for v in views] == [("aws-node-1", "healthy")]
        finally:
            await second.stop()


async def test_heartbeats_carry_the_node_usage(tmp_path: Path, registry_server: RegistryServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_server, "_USAGE_EVERY_S", 0.0)  # count the store on every beat
    async with running_node(tmp_path, registry_server.url, "aws", "us-east-1") as server:
        registry = await connect_cluster(registry_server.url, TOKEN, ClusterConfig())
        try:
            node = registry.nodes["aws-node-1"]
            await registry.transport.configure(ProcessingConfig())
            data = b"usage\n" * 1000
            info = await registry.transport.process(node, make_chunk(data), data, ORIGIN)
            await registry.transport.replicate(node, node, info)
            view = await eventually(
                lambda: (v := registry_server.state.get("aws-node-1")) and v["chunks"] == 1 and v,
                "a heartbeat reporting the stored chunk")
            assert view["bytes"] == info.blob_size
            assert server.node_id == "aws-node-1"
        finally:
            await registry.close()


async def test_connect_cluster_errors(tmp_path: Path, registry_server: RegistryServer) -> None:
    with pytest.raises(ClusterError, match="has no nodes yet"):
        await connect_cluster(registry_server.url, TOKEN)
    with pytest.raises(ClusterError, match="refused our token"):
        await fetch_nodes(registry_server.url, "wrong")
    with pytest.raises(ClusterError, match="cannot reach the registry"):
        await fetch_nodes(f"http://127.0.0.1:{free_port()}", TOKEN)
    node = NodeServer(tmp_path, "wrong", "aws", "us-east-1", node_id="aws-node-1",
                      registry_url=registry_server.url, service=SERVICE)
    with pytest.raises(ClusterError, match="registry refused registration"):
        await node.start()
    await node.stop()
    nowhere = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", node_id="aws-node-1",
                         registry_url=f"http://127.0.0.1:{free_port()}", service=SERVICE)
    with pytest.raises(ClusterError, match="cannot reach the registry"):
        await nowhere.start()
    await nowhere.stop()


async def test_watcher_keeps_membership_while_the_registry_is_away(tmp_path: Path) -> None:
    config = ClusterConfig(nodes=SPECS[:2])
    registry = NodeRegistry(config, [WorkerNode(s, url="http://127.0.0.1:1") for s in SPECS[:2]],
                            HttpTransport(TOKEN, NetworkTopology(config)))
    watcher = MembershipWatcher(registry, f"http://127.0.0.1:{free_port()}", TOKEN, 0.01)
    watcher.start()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # bounded: many failed polls happen meanwhile
                await watcher.synced.wait()
        assert set(registry.nodes) == {"aws-node-1", "gcp-node-1"}
        assert all(n.healthy for n in registry.nodes.values())
    finally:
        await watcher.stop()
        await registry.close()


async def test_watcher_does_not_revive_a_node_it_saw_fail(tmp_path: Path) -> None:
    """A registry that has not noticed yet must not undo a failure we observed."""
    config = ClusterConfig(nodes=SPECS[:1])
    node = WorkerNode(SPECS[0], url="http://127.0.0.1:1")
    registry = NodeRegistry(config, [node], HttpTransport(TOKEN, NetworkTopology(config)))
    watcher = MembershipWatcher(registry, "http://127.0.0.1:1", TOKEN, 60.0)  # never started
    changes: list[str] = []
    registry.subscribe(lambda n, old, reason: changes.append(f"{n.status.value}: {reason}"))

    def view(age: float, status: str = "healthy") -> dict[str, Any]:
        return {"id": "aws-node-1", "cloud": "aws", "region": "us-east-1",
                "url": "http://127.0.0.1:2", "status": status, "last_heartbeat_age_s": age}

    registry.record_failure("aws-node-1", 1, "connection refused")
    assert not node.healthy
    watcher.apply([view(age=5.0)])  # heard from before it failed: the registry is behind
    assert not node.healthy
    assert node.url == "http://127.0.0.1:2"
    unheard = view(age=0.0)
    unheard["last_heartbeat_age_s"] = None  # a restarted registry that has not heard it yet
    watcher.apply([unheard])
    assert not node.healthy
    watcher.apply([view(age=0.0)])  # a heartbeat after the failure: back in service
    assert node.healthy
    watcher.apply([view(age=9.0, status="unhealthy")])
    assert changes == ["unhealthy: 1 failed transfers, last: connection refused",
                       "healthy: heartbeats resumed", "unhealthy: missed heartbeats"]
    assert node.status is NodeStatus.UNHEALTHY
    await watcher.stop()
    await registry.close()


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)

