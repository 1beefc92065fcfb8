"""The HTTP carrier's own details: `HttpComm` against real `NodeServer`s on loopback.

What every carrier must do alike (the node operations, their faults) is the contract
suite's; here is what only HTTP has: bodies streamed in pieces with their length and
received into reused, page-aligned buffers (a body changed or cut short on the way stores
nothing), the metadata header and its size, status codes and what odd answers become,
the token, the body limit, the metrics endpoint, and the node process around the service
(binding, `--allow-faults`, draining on stop). No subprocesses: servers listen inside the
test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from multicloud.blob import TransformChain, blob_checksum
from multicloud.cluster.node_server import NodeServer
from multicloud.comm import wire
from multicloud.comm.http import PIECE, HttpComm, bind_socket, start_node_server
from multicloud.core import errors
from multicloud.core.auth import auth_header
from multicloud.core.buffers import padded
from multicloud.core.config import ProcessingConfig, ServiceConfig
from multicloud.core.errors import (
    ChunkNotFound,
    ClusterError,
    IntegrityError,
    MulticloudError,
    NodeUnavailable,
    StorageError,
)
from multicloud.core.messages import NodeAddress, Reply, Request
from multicloud.core.network import Location
from multicloud.core.types import MAX_PREFIX_ON_WIRE, BlobInfo, Chunk, ReplicaAck
from multicloud.node.service import NodeService
from multicloud.node.store import ChunkStore
from multicloud.ui.cli import build_parser
from wire_support import example_error
from wire_support import odd_server as odd_answers

TOKEN = "unit-token"
MIB = 1024 * 1024
AWS = Location("aws", "us-east-1")
GCP = Location("gcp", "us-central1")
MAX_BODY_MB = 8  # room for the streamed bodies below, small enough to refuse a bigger one


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait until check() holds; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_blob(data: bytes) -> tuple[bytes, BlobInfo]:
    """A stored-form blob of data (no compression: its size is the data's, plus a header)."""
    chunk = Chunk(hashlib.sha256(data).hexdigest(), "f.bin", 0, 0, len(data), "aws")
    return TransformChain(ProcessingConfig(transforms=[])).apply(chunk, data)


def address(server: NodeServer) -> NodeAddress:
    assert server.node_id is not None
    return NodeAddress(server.node_id, Location(server.cloud, server.region), server.url)


def put(info: BlobInfo, blob: bytes | memoryview, sender: Location | None = None) -> Request:
    return Request("put", {"chunk_id": info.chunk_id, "checksum": info.blob_checksum}, blob,
                   sender)


@contextlib.asynccontextmanager
async def serving(root: Path, node_id: str = "aws-node-1", location: Location = AWS, *,
                  max_body_mb: float = MAX_BODY_MB,
                  allow_faults: bool = False) -> AsyncIterator[NodeServer]:
    """A node without a registry on a free loopback port."""
    server = NodeServer(root, TOKEN, location.cloud, location.region, node_id=node_id,
                        service=ServiceConfig(max_body_mb=max_body_mb), host="127.0.0.1",
                        port=0, fsync=False, allow_faults=allow_faults)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def comm() -> AsyncIterator[HttpComm]:
    comm = HttpComm(TOKEN)
    yield comm
    await comm.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    async with serving(tmp_path) as server:
        yield server


def service_of(server: NodeServer) -> NodeService:
    assert server.node is not None
    return server.node


# -- bodies ----------------------------------------------------------------------------------

async def test_a_large_body_round_trips_streamed_both_ways(node: NodeServer,
                                                           comm: HttpComm) -> None:
    data = random.Random(7).randbytes(6 * MIB)
    blob, info = make_blob(data)
    assert len(blob) > PIECE  # over the threshold: sent, and answered, in pieces
    reply = await comm.call(address(node), put(info, memoryview(blob), GCP))
    assert reply.body is None
    ack = ReplicaAck.from_json(reply.meta["ack"])
    assert (ack.node_id, ack.chunk_id, ack.blob_size) == ("aws-node-1", info.chunk_id, len(blob))
    assert service_of(node).store.path_for(info.chunk_id).read_bytes() == blob

    reply = await comm.call(address(node), Request("get", {"chunk_id": info.chunk_id}))
    assert reply.meta == {"size": len(blob)}
    assert reply.body == blob

    # The raw bytes a processing node receives take the same road.
    reply = await comm.call(address(node), Request(
        "process", {"chunk": Chunk(info.chunk_id, "f.bin", 0, 0, len(data), "aws").to_json()},
        data, AWS))
    assert BlobInfo.from_json(reply.meta["blob"]).raw_size == len(data)
    assert service_of(node).staged_blob(info.chunk_id) == blob


async def test_bodies_go_out_with_their_length_not_chunked(node: NodeServer,
                                                           comm: HttpComm) -> None:
    seen: list[tuple[str | None, str | None, int]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.headers.get("Content-Length"),
                     request.headers.get("Transfer-Encoding"), len(body)))
        return web.Response(body=body, headers={wire.META_HEADER: "{}", wire.BODY_HEADER: "1"})

    app = web.Application(client_max_size=16 * MIB)
    app.router.add_post("/v1/{op}", echo)
    async with TestServer(app, host="127.0.0.1") as server:
        target = NodeAddress("echo", AWS, str(server.make_url("")))
        big = bytes(range(256)) * (5 * MIB // 256)
        for body in (big, memoryview(big), b"small", memoryview(b"small")):
            reply = await comm.call(target, Request("put", {}, body))
            assert reply.body == bytes(body)
            # A length the server can check against its limit before reading anything.
            assert seen.pop() == (str(len(body)), None, len(body))

    blob, info = make_blob(b"x" * (5 * MIB))
    await comm.call(address(node), put(info, blob))
    async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http, http.post(
            f"{node.url}/v1/get", headers={wire.META_HEADER: wire.encode_meta(
                {"chunk_id": info.chunk_id})}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(blob))
        assert "Transfer-Encoding" not in resp.headers
        assert await resp.read() == blob


async def test_an_oversized_body_is_refused_with_413(tmp_path: Path, comm: HttpComm) -> None:
    async with serving(tmp_path, max_body_mb=1) as node:
        target, service = address(node), service_of(node)
        data = random.Random(3).randbytes(2 * MIB)
        chunk = Chunk(hashlib.sha256(data).hexdigest(), "f.bin", 0, 0, len(data), "aws")
        with pytest.raises(StorageError, match="too large: body over 1048576 bytes"):
            await comm.call(target, Request("process", {"chunk": chunk.to_json()}, data))
        assert service.staged_blob(chunk.chunk_id) is None

        blob, info = make_blob(random.Random(4).randbytes(5 * MIB))  # streamed
        with pytest.raises(StorageError, match="too large") as refused:
            await comm.call(target, put(info, blob))
        assert not isinstance(refused.value, NodeUnavailable)  # an answer, not an outage
        assert not service.has(info.chunk_id)
        assert service.store.usage() == (0, 0)

        async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http, http.post(
                f"{node.url}/v1/put", data=blob, headers={wire.BODY_HEADER: "1",
                                                          wire.META_HEADER: wire.encode_meta(
                    {"chunk_id": info.chunk_id, "checksum": info.blob_checksum})}) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "too_large"
        assert (await comm.call(target, Request("health"))).meta["status"] == "ok"


def stored_nothing(server: NodeServer) -> bool:
    """No object and no temp file on the node."""
    store = service_of(server).store
    assert isinstance(store, ChunkStore)
    return store.usage() == (0, 0) and not list((store.root / "tmp").iterdir())


async def test_a_body_changed_on_the_way_is_refused_and_nothing_is_stored(
        node: NodeServer, comm: HttpComm) -> None:
    for size in (PIECE // 2, 3 * PIECE):  # read into bytes, and into a pooled buffer
        blob, info = make_blob(random.Random(size).randbytes(size))
        changed = bytearray(blob)
        changed[len(changed) // 2] ^= 0xFF  # a bit flipped between the two nodes
        with pytest.raises(IntegrityError, match=r"does not match the sender's.*nothing was "
                                                 r"stored"):
            await comm.call(address(node), put(info, bytes(changed), GCP))
        assert not service_of(node).has(info.chunk_id)
    assert stored_nothing(node)

    # The refused body's buffer goes back to the pool (once the node's I/O thread has let
    # go of it): the next body lands in it, intact.
    await eventually(lambda: node.buffers.settle() > 0, "the buffer back in the pool")
    blob, info = make_blob(random.Random(9).randbytes(3 * PIECE))
    await comm.call(address(node), put(info, blob, GCP))
    assert node.buffers.allocated == 1
    assert service_of(node).store.path_for(info.chunk_id).read_bytes() == blob


async def test_a_body_cut_short_stores_nothing_and_frees_its_buffer(
        node: NodeServer, comm: HttpComm) -> None:
    blob, info = make_blob(random.Random(11).randbytes(3 * PIECE))
    port = int(node.url.rsplit(":", 1)[1])
    meta = wire.encode_meta({"chunk_id": info.chunk_id, "checksum": info.blob_checksum})
    head = "".join(f"{name}: {value}\r\n" for name, value in {
        **auth_header(TOKEN), wire.META_HEADER: meta, wire.BODY_HEADER: "1",
        "Content-Length": str(len(blob)), "Host": "127.0.0.1"}.items())
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/put HTTP/1.1\r\n{head}\r\n".encode() + blob[:len(blob) // 2])
    await writer.drain()
    await eventually(lambda: node.buffers.allocated == 1, "the node to start reading the body")
    writer.close()  # the sender dies half-way
    await writer.wait_closed()
    await eventually(lambda: node.buffers.settle() > 0, "the buffer back in the pool")
    assert stored_nothing(node)

    await comm.call(address(node), put(info, blob, GCP))  # the whole body, on a new connection
    assert node.buffers.allocated == 1
    assert service_of(node).store.path_for(info.chunk_id).read_bytes() == blob


async def test_bodies_in_a_row_reuse_one_buffer_the_store_can_write_direct(
        node: NodeServer, comm: HttpComm, monkeypatch: pytest.MonkeyPatch) -> None:
    store = service_of(node).store
    direct: list[bool] = []
    store_put = store.put

    def put_and_look(chunk_id: str, blob: bytes | memoryview) -> None:
        direct.append(padded(blob) is not None)  # whole pages: O_DIRECT, no page-cache copy
        store_put(chunk_id, blob)

    monkeypatch.setattr(store, "put", put_and_look)
    blobs = [make_blob(random.Random(i).randbytes(PIECE + i * 100_000)) for i in range(5)]
    for blob, info in blobs:
        await comm.call(address(node), put(info, blob, GCP))
        await eventually(lambda: node.buffers.settle() > 0, "the buffer back in the pool")
    assert direct == [True] * len(blobs)
    assert node.buffers.allocated == 1
    for blob, info in blobs:  # each object is its own body, not a later one's
        assert store.path_for(info.chunk_id).read_bytes() == blob


# -- metadata --------------------------------------------------------------------------------

async def test_the_largest_chunk_metadata_gets_through(node: NodeServer,
                                                       comm: HttpComm) -> None:
    data = b'{"a": 1}\n' * 100
    chunk = Chunk(hashlib.sha256(data).hexdigest(), "😀/" * 1000 + "ü.jsonl", 1, 900,
                  len(data), "aws", record_format="jsonl", line_prefix=b"\n" * MAX_PREFIX_ON_WIRE)
    reply = await comm.call(address(node),
                            Request("process", {"chunk": chunk.to_json()}, data, AWS))
    assert BlobInfo.from_json(reply.meta["blob"]).chunk_id == chunk.chunk_id


async def test_the_inventory_of_a_node_with_many_chunks(node: NodeServer,
                                                        comm: HttpComm) -> None:
    """A full node's chunk list is far bigger than any header may be."""
    store = service_of(node).store
    ids = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(1200))
    for chunk_id in ids:
        store.put(chunk_id, b"x")  # inventory lists objects without reading them
    reply = await comm.call(address(node), Request("inventory"))
    assert reply.meta["chunks"] == ids


async def test_metadata_a_node_cannot_read_is_a_bad_request(node: NodeServer) -> None:
    async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http:
        for meta in ("not json", "[1, 2]"):
            async with http.post(f"{node.url}/v1/health",
                                 headers={wire.META_HEADER: meta}) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert body["error"] == "cluster"
                assert wire.META_HEADER in body["message"]
        async with http.post(f"{node.url}/v1/health") as resp:  # no metadata: {}
            assert resp.status == 200
            assert wire.BODY_HEADER not in resp.headers  # no body: the metadata is the body
            assert wire.decode_meta(await resp.text())["id"] == "aws-node-1"


# -- errors ----------------------------------------------------------------------------------

class FailingService(NodeService):
    """A node whose every request fails with `failure` (when set)."""

    failure: BaseException | None = None

    async def handle(self, request: Request) -> Reply:
        if self.failure is not None:
            raise self.failure
        return await super().handle(request)


@pytest.fixture
async def failing(tmp_path: Path, comm: HttpComm) -> AsyncIterator[tuple[FailingService, str]]:
    """A FailingService served with bind_socket and start_node_server; its URL."""
    service = FailingService("aws-node-1", AWS, ChunkStore(tmp_path / "store", fsync=False),
                             comm)
    sock = bind_socket("127.0.0.1", 0)
    runner = await start_node_server(service, TOKEN, sock, max_body_bytes=MIB)
    try:
        yield service, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        service.close()


async def status_of(url: str, op: str = "health") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(headers=auth_header(TOKEN)) as http, \
            http.post(f"{url}/v1/{op}") as resp:
        return resp.status, await resp.json()


async def test_every_error_crosses_http_as_itself(failing: tuple[FailingService, str],
                                                  comm: HttpComm) -> None:
    service, url = failing
    target = NodeAddress("aws-node-1", AWS, url)
    for cls, code in errors._CODES.items():
        exc = service.failure = example_error(cls)
        status, body = await status_of(url)
        assert (status, body["error"]) == (wire.STATUS[code], code)
        with pytest.raises(cls) as info:
            await comm.call(target, Request("health"))
        assert type(info.value) is cls
        assert str(info.value) == str(exc)
        if isinstance(exc, NodeUnavailable):
            # The node that could not be reached, not the one that said so.
            assert info.value.node_id == "gcp-node-9"  # type: ignore[attr-defined]


async def test_a_bug_in_a_node_is_a_500_storage_error(failing: tuple[FailingService, str],
                                                      comm: HttpComm) -> None:
    service, url = failing
    service.failure = RuntimeError("a bug")
    status, body = await status_of(url)
    assert (status, body["error"]) == (500, "storage")
    with pytest.raises(StorageError, match="node aws-node-1 failed: RuntimeError: a bug"):
        await comm.call(NodeAddress("aws-node-1", AWS, url), Request("health"))


@pytest.fixture
async def odd_server() -> AsyncIterator[tuple[NodeAddress, list[web.StreamResponse]]]:
    """A server that answers each request with the next prepared response."""
    async with odd_answers() as (url, answers):
        yield NodeAddress("aws-node-1", AWS, url), answers


@pytest.mark.parametrize(("answer", "raised", "text"), [
    (lambda: web.Response(status=500, text="oops"), StorageError,
     "node aws-node-1 answered HTTP 500"),
    (lambda: web.json_response({"detail": "x"}, status=502), StorageError, "answered HTTP 502"),
    (lambda: web.json_response([1], status=503), StorageError, "answered HTTP 503"),
    (lambda: web.Response(headers={wire.META_HEADER: "not json"}), StorageError,
     "malformed reply"),
    (lambda: web.Response(headers={wire.META_HEADER: "[1]"}), StorageError, "malformed reply"),
    (lambda: web.json_response({"error": "unauthorized"}, status=401), ClusterError,
     "refused our token"),
    (lambda: web.json_response({"error": "too_large", "message": "over 1 MB"}, status=413),
     StorageError, "too large: over 1 MB"),
    (lambda: web.json_response({"error": "not_found", "message": "gone"}, status=404),
     ChunkNotFound, "gone"),
    (lambda: web.json_response({"error": "from-the-future", "message": "hm"}, status=400),
     MulticloudError, "hm"),
], ids=["text-500", "json-without-error", "json-list", "bad-meta", "meta-not-object", "401",
        "413", "404", "unknown-code"])
async def test_odd_answers_become_errors(
        odd_server: tuple[NodeAddress, list[web.StreamResponse]], comm: HttpComm,
        answer: Callable[[], web.StreamResponse], raised: type[BaseException],
        text: str) -> None:
    target, answers = odd_server
    answers.append(answer())
    with pytest.raises(raised, match=text) as info:
        await comm.call(target, Request("health"))
    assert not isinstance(info.value, NodeUnavailable)  # an answer is never an outage


async def test_a_reply_cut_short_is_an_outage(
        odd_server: tuple[NodeAddress, list[web.StreamResponse]], comm: HttpComm) -> None:
    target, answers = odd_server

    class CutShort(web.StreamResponse):
        async def prepare(self, request: web.BaseRequest) -> Any:
            self.content_length = 100
            writer = await super().prepare(request)
            await self.write(b"x" * 10)
            assert request.transport is not None
            request.transport.close()
            return writer

    answers.append(CutShort(headers={wire.META_HEADER: "{}"}))
    with pytest.raises(NodeUnavailable, match="connection failed") as info:
        await comm.call(target, Request("get", {"chunk_id": "a" * 64}))
    assert info.value.node_id == "aws-node-1"


async def test_a_node_that_cannot_be_reached_is_unavailable(comm: HttpComm) -> None:
    gone = NodeAddress("gcp-node-2", GCP, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(NodeUnavailable, match="connection failed") as info:
        await comm.call(gone, Request("health"))
    assert info.value.node_id == "gcp-node-2"
    with pytest.raises(NodeUnavailable, match="no URL") as info:
        await comm.call(NodeAddress("aws-node-9", AWS), Request("health"))
    assert info.value.node_id == "aws-node-9"


async def test_a_wrong_token_is_refused_before_the_body(node: NodeServer,
                                                        comm: HttpComm) -> None:
    stranger = HttpComm("not-the-token")
    blob, info = make_blob(random.Random(5).randbytes(5 * MIB))  # a streamed body
    try:
        for request in (Request("health"), put(info, blob)):
            with pytest.raises(ClusterError, match="refused our token") as refused:
                await stranger.call(address(node), request)
            assert not isinstance(refused.value, NodeUnavailable)  # a bad token is no outage
    finally:
        await stranger.close()
    assert not service_of(node).has(info.chunk_id)
    assert (await comm.call(address(node), Request("health"))).meta["status"] == "ok"


# -- the node process ------------------------------------------------------------------------

async def test_a_node_serves_its_metrics(node: NodeServer, comm: HttpComm) -> None:
    blob, info = make_blob(b"metrics\n" * 1000)
    await comm.call(address(node), put(info, blob, GCP))  # the sender header names its cloud
    with pytest.raises(ChunkNotFound):
        await comm.call(address(node), Request("get", {"chunk_id": "0" * 64}))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{node.url}/metrics") as resp:
            assert resp.status == 401
        async with http.get(f"{node.url}/metrics", headers=auth_header(TOKEN)) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("multicloud_node_info", (("cloud", "aws"), ("node", "aws-node-1"),
                                             ("region", "us-east-1")))] == 1
    assert samples[("multicloud_node_stored_bytes", ())] == len(blob)
    assert samples[("multicloud_node_bytes_received_total", (("peer_cloud", "gcp"),))] \
        == len(blob)
    assert samples[("multicloud_node_requests_total", (("route", "put"), ("status", "ok")))] == 1
    assert samples[("multicloud_node_requests_total",
                    (("route", "get"), ("status", "not_found")))] == 1


async def test_faults_are_refused_without_allow_faults(node: NodeServer,
                                                       comm: HttpComm) -> None:
    with pytest.raises(ClusterError, match="--allow-faults") as refused:
        await comm.call(address(node), Request("fault", {"action": "crash"}))
    assert "aws-node-1" in str(refused.value)
    assert not service_of(node).faults.crashed
    assert (await comm.call(address(node), Request("health"))).meta["status"] == "ok"


def test_the_node_command_takes_allow_faults() -> None:
    """The refusal above tells the operator to pass --allow-faults: the flag must exist."""
    args = build_parser().parse_args(["node", "--cloud", "aws", "--allow-faults"])
    assert args.allow_faults is True
    assert build_parser().parse_args(["node", "--cloud", "aws"]).allow_faults is False


async def test_stop_lets_an_inflight_write_finish(tmp_path: Path, comm: HttpComm) -> None:
    """SIGTERM's path: stop accepting, let the running write become durable, then exit."""
    node = NodeServer(tmp_path, TOKEN, "gcp", "us-central1", node_id="gcp-node-1",
                      host="127.0.0.1", port=0, fsync=False, allow_faults=True)
    await node.start()
    target, service = address(node), service_of(node)
    port = int(node.url.rsplit(":", 1)[1])
    stopping: asyncio.Task[None] | None = None
    try:
        await comm.call(target, Request("fault", {"action": "hold_writes"}))
        blob, info = make_blob(b"drain\n" * 5000)
        write = asyncio.create_task(comm.call(target, put(info, blob, AWS)))
        await comm.call(target, Request("fault", {"action": "wait_held"}))  # it is in
        stopping = asyncio.create_task(node.stop())

        def refusing() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) != 0

        await eventually(refusing, "the node to stop accepting connections")
        assert not write.done()
        assert not stopping.done()  # waiting for the write
        gate = service.faults.gate
        assert gate is not None
        gate.opened.set()
        ack = ReplicaAck.from_json((await write).meta["ack"])
        assert ack.blob_checksum == blob_checksum(blob)
    finally:
        if service.faults.gate is not None:
            service.faults.gate.opened.set()  # when an assertion failed, stop() still ends
        await (stopping if stopping is not None else node.stop())
    assert service.store.path_for(info.chunk_id).read_bytes() == blob
    with pytest.raises(NodeUnavailable):
        await comm.call(target, Request("health"))


async def test_a_node_needs_an_id_without_a_registry(tmp_path: Path) -> None:
    server = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", host="127.0.0.1")
    with pytest.raises(ClusterError, match="--id"):
        await server.start()
    await server.stop()


async def test_a_busy_port_is_a_cluster_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=f"127.0.0.1:{port}.*--port"):
            bind_socket("127.0.0.1", port)
        server = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", node_id="aws-node-1",
                            host="127.0.0.1", port=port)
        with pytest.raises(ClusterError, match="cannot listen"):
            await server.start()
        await server.stop()


async def test_a_node_advertises_the_host_it_is_reached_at(tmp_path: Path) -> None:
    server = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", node_id="aws-node-1",
                        host="127.0.0.1", advertise_host="node-1.internal", fsync=False)
    url = await server.start()
    try:
        assert url == server.url
        assert url.startswith("http://node-1.internal:")
        assert int(url.rsplit(":", 1)[1]) > 0
    finally:
        await server.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_a_node_on_ipv6_loopback_has_a_usable_url(tmp_path: Path, comm: HttpComm) -> None:
    server = NodeServer(tmp_path, TOKEN, "aws", "us-east-1", node_id="aws-node-1", host="::1",
                        fsync=False)
    url = await server.start()
    try:
        assert url.startswith("http://[::1]:")
        reply = await comm.call(address(server), Request("health"))
        assert reply.meta["id"] == "aws-node-1"
    finally:
        await server.stop()
