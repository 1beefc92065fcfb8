"""The HTTP carrier: `HttpComm` sends requests to node processes, `node_app` serves them.

Every operation is `POST /v1/<op>` with the metadata in a header and the body, if the
request has one (an empty one included: `X-Multicloud-Body: 1` says so), as the raw
request body. A reply with a body carries its metadata in the header the same way; a
reply without one sends its metadata as a JSON body (an inventory can outgrow any header);
an error is a JSON body in the tree's wire form. The bearer token is checked before a
body is read, and a body's length against the limit before it is read.

Bodies are what cluster mode pays for on top of the embedded cluster's work: there a node
is handed a reference, here every byte crosses a socket, and each copy of it, or fresh
page it lands in, is CPU taken from processing. So a large body is never joined into bytes:

- Sending, it goes out in `PIECE`-sized views of the caller's buffer, each written once
  the socket has taken the last. Python 3.11's transport copies whatever send() does not
  take at once into a buffer of its own, so smaller pieces mean less of that (on loopback
  the sender's CPU per GiB fell from 0.33 s with 4 MiB pieces to 0.2 s with 256 KiB).
- Receiving, a body of `PIECE` bytes or more is copied into one buffer of its final size
  as its pieces arrive, instead of being joined from a list of them at the end. The
  buffers come from a pool and are reused (`multicloud.comm.bodies`): filling fresh memory
  costs a page fault and a zeroed page every 4 KiB, dearer than the copy itself. They are
  page-aligned, so the chunk store writes a received replica to disk straight from the
  buffer (O_DIRECT), as it does a blob the node sealed itself. The node still verifies
  every byte before it acknowledges (`NodeService.write`): a body changed on the way is
  refused and nothing is stored.

A reply body (a replica read back for a restore) is read whole, once, into bytes: the
caller keeps it, so there is nothing to reuse.

The server runs with handler cancellation on, so a caller that gives up (a timeout, a
node marked unhealthy) stops the node's handler, which removes whatever it had
half-written.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from multicloud.comm.bodies import BodyBuffers
from multicloud.comm.wire import (
    API,
    BODY_HEADER,
    META_HEADER,
    SENDER_HEADER,
    decode_meta,
    decode_sender,
    encode_meta,
    encode_sender,
    internal_error,
    status_of,
)
from multicloud.core.auth import auth_header, auth_middleware
from multicloud.core.errors import (
    ClusterError,
    MulticloudError,
    NodeUnavailable,
    StorageError,
    from_wire,
    to_wire,
)
from multicloud.core.exposition import metrics_response
from multicloud.core.messages import Body, NodeAddress, Reply, Request
from multicloud.node.service import NodeService

log = logging.getLogger(__name__)

# Bytes written to a socket at a time (see the module docstring), and the size from which
# a received body gets a pooled buffer (below it, one read into bytes is as cheap).
PIECE = 256 * 1024
MAX_HEADER = 64 * 1024  # a chunk's metadata may carry a 4 KiB line prefix, base64
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                      ConnectionError, TimeoutError)


async def _pieces(body: Body) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), PIECE):
        yield view[start:start + PIECE]


def _payload(body: Body | None) -> Any:
    if body is None or len(body) <= PIECE:
        return body
    return _pieces(body)


class HttpComm:
    """Carries requests to node processes over HTTP with a bearer token."""

    def __init__(self, token: str, max_connections: int = 64) -> None:
        self.token = token
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=auth_header(self.token), max_field_size=MAX_HEADER,
                connector=aiohttp.TCPConnector(limit=self._max_connections))
        return self._session

    async def call(self, target: NodeAddress, request: Request) -> Reply:
        """POST request to target's `/v1/<op>` and return its reply."""
        if target.url is None:
            raise NodeUnavailable(target.node_id, "has no URL (not registered)")
        headers = {META_HEADER: encode_meta(request.meta)}
        sender = encode_sender(request.sender)
        if sender is not None:
            headers[SENDER_HEADER] = sender
        if request.body is not None:
            headers[BODY_HEADER] = "1"
            headers["Content-Length"] = str(len(request.body))
            headers["Content-Type"] = "application/octet-stream"
        url = f"{target.url.rstrip('/')}{API}/{request.op}"
        try:
            async with self._client().post(url, data=_payload(request.body),
                                           headers=headers) as resp:
                if resp.status != 200:
                    raise await _error_of(resp, target.node_id)
                if BODY_HEADER not in resp.headers:
                    return Reply(decode_meta((await resp.read()).decode()))
                meta = decode_meta(resp.headers.get(META_HEADER, "{}"))
                return Reply(meta, await resp.read())
        except _CONNECTION_ERRORS as exc:
            raise NodeUnavailable(target.node_id, f"connection failed: {exc}") from exc
        except (ValueError, aiohttp.ClientResponseError) as exc:  # a reply that is not ours
            raise StorageError(f"node {target.node_id} sent a malformed reply: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise NodeUnavailable(target.node_id, f"request failed: {exc}") from exc

    async def close(self) -> None:
        """Close the connections."""
        if self._session is not None:
            await self._session.close()


async def _error_of(resp: aiohttp.ClientResponse, node_id: str) -> MulticloudError:
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        body = None
    if not isinstance(body, dict) or "error" not in body:
        return StorageError(f"node {node_id} answered HTTP {resp.status}")
    if body["error"] == "unauthorized":
        return ClusterError(f"node {node_id} refused our token (401): check MULTICLOUD_TOKEN "
                            f"or the data dir's token file")
    if body["error"] == "too_large":
        return StorageError(f"node {node_id} refused a body as too large: {body.get('message')}")
    return from_wire(body)


# -- the server side --------------------------------------------------------------------


def node_app(service: NodeService, token: str, *, max_body_bytes: int,
             buffers: BodyBuffers | None = None) -> web.Application:
    """The aiohttp application that serves a node: `POST /v1/<op>` and `GET /metrics`.

    Large bodies are received into buffers from `buffers` (a pool of its own if None).
    """
    pool = buffers if buffers is not None else BodyBuffers()

    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            meta = decode_meta(request.headers.get(META_HEADER, "{}"))
        except ValueError as exc:
            return _error({"error": "cluster", "message": f"bad {META_HEADER}: {exc}"})
        body: Body | None = None
        if BODY_HEADER in request.headers:
            try:
                body = await _read_body(request, max_body_bytes, pool)
            except web.HTTPRequestEntityTooLarge:
                return _error({"error": "too_large",
                               "message": f"body over {max_body_bytes} bytes (max_body_mb); "
                                          f"nothing was stored"})
        pooled = body if isinstance(body, memoryview) else None
        try:
            # The node gets a view of its own: if it keeps one (or a thread of a cancelled
            # request still reads it), the buffer stays out of the pool and stays valid.
            return await _answer(service, Request(
                request.match_info["op"], meta, body if pooled is None else pooled[:],
                decode_sender(request.headers.get(SENDER_HEADER))), request)
        finally:
            if pooled is not None:
                pool.give_back(pooled)

    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(service.metrics.registry)

    app = web.Application(middlewares=[auth_middleware(token)], client_max_size=max_body_bytes)
    app.router.add_post(f"{API}/{{op}}", serve)
    app.router.add_get("/metrics", metrics)
    return app


async def _answer(service: NodeService, arriving: Request,
                  request: web.Request) -> web.StreamResponse:
    try:
        reply = await service.handle(arriving)
    except MulticloudError as exc:
        return _error(to_wire(exc))
    except Exception as exc:
        return _error(internal_error(service.node_id, exc))
    return await _reply(request, reply)


async def _read_body(request: web.Request, max_body_bytes: int,
                     buffers: BodyBuffers) -> Body:
    """The request body, refused before it is read when its length is over the limit.

    A body of `PIECE` bytes or more is copied into a buffer from `buffers` as its pieces
    arrive: one copy, into memory already faulted in, instead of a list of pieces joined
    at the end (`readexactly`; `BaseRequest.read` copies twice).
    """
    length = request.content_length
    if length is None:
        return await request.read()  # no length given: aiohttp counts against the limit
    if length > max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_body_bytes, length)
    if length == 0:
        return b""
    if length < PIECE:
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise _cut_short(len(exc.partial), length) from exc
    body = buffers.take(length)
    try:
        filled = 0
        while filled < length:
            piece = await request.content.readany()  # as it arrived: no copy
            if not piece:
                raise _cut_short(filled, length)
            body[filled:filled + len(piece)] = piece  # the parser stops at the length
            filled += len(piece)
    except BaseException:
        buffers.give_back(body)
        raise
    return body


def _cut_short(received: int, length: int) -> ConnectionResetError:
    return ConnectionResetError(f"the body ended after {received} of {length} bytes")


def _error(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status_of(body))


async def _reply(request: web.Request, reply: Reply) -> web.StreamResponse:
    if reply.body is None:
        return web.Response(text=encode_meta(reply.meta), content_type="application/json")
    response = web.StreamResponse(headers={META_HEADER: encode_meta(reply.meta),
                                           BODY_HEADER: "1"})
    response.content_length = len(reply.body)
    response.content_type = "application/octet-stream"
    await response.prepare(request)
    async for piece in _pieces(reply.body):
        await response.write(piece)
    await response.write_eof()
    return response


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: any free port), not yet listening.

    A node binds first, so that it can tell the registry its URL before it serves.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ClusterError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick "
                           f"another --port or --host, or stop the process using it") from exc
    return sock


async def start_node_server(service: NodeService, token: str, sock: socket.socket, *,
                            max_body_bytes: int,
                            buffers: BodyBuffers | None = None) -> web.AppRunner:
    """Serve service on a bound socket (see `bind_socket`); stop with `runner.cleanup()`."""
    runner = web.AppRunner(node_app(service, token, max_body_bytes=max_body_bytes,
                                    buffers=buffers),
                           handle_signals=False, access_log=None, handler_cancellation=True,
                           max_field_size=MAX_HEADER)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
