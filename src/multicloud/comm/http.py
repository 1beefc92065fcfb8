"""The HTTP carrier: `HttpComm` sends requests to node processes, `node_app` serves them.

Every operation is `POST /v1/<op>` with the metadata in a header and the body, if the
request has one (an empty one included: `X-Multicloud-Body: 1` says so), as the raw
request body. A reply with a body carries its metadata in the header the same way; a
reply without one sends its metadata as a JSON body (an inventory can outgrow any header);
an error is a JSON body in the tree's wire form. The bearer token is checked before a
body is read, and a body's length against the limit before it is read.

Copies cost most here. Large bodies go out in 4 MiB pieces, each written once the socket
has taken the last (Python 3.11's transport would otherwise copy the unsent rest of a
100 MiB body again after every send); a received body is joined once (aiohttp's
`read()` copies it twice). The server runs with handler cancellation on, so a caller
that gives up (a timeout, a node marked unhealthy) stops the node's handler, which
removes whatever it had half-written.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

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

PIECE = 4 * 1024 * 1024  # bytes written to a socket at a time
_STREAM_ABOVE = PIECE
MAX_HEADER = 64 * 1024  # a chunk's metadata may carry a 4 KiB line prefix, base64
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                      ConnectionError, TimeoutError)


async def _pieces(body: Body) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), PIECE):
        yield view[start:start + PIECE]


def _payload(body: Body | None) -> Any:
    if body is None or len(body) < _STREAM_ABOVE:
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


def node_app(service: NodeService, token: str, *, max_body_bytes: int) -> web.Application:
    """The aiohttp application that serves a node: `POST /v1/<op>` and `GET /metrics`."""

    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            meta = decode_meta(request.headers.get(META_HEADER, "{}"))
        except ValueError as exc:
            return _error({"error": "cluster", "message": f"bad {META_HEADER}: {exc}"})
        body: bytes | None = None
        if BODY_HEADER in request.headers:
            try:
                body = await _read_body(request, max_body_bytes)
            except web.HTTPRequestEntityTooLarge:
                return _error({"error": "too_large",
                               "message": f"body over {max_body_bytes} bytes (max_body_mb); "
                                          f"nothing was stored"})
        arriving = Request(request.match_info["op"], meta, body,
                           decode_sender(request.headers.get(SENDER_HEADER)))
        try:
            reply = await service.handle(arriving)
        except MulticloudError as exc:
            return _error(to_wire(exc))
        except Exception as exc:
            return _error(internal_error(service.node_id, exc))
        return await _reply(request, reply)

    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(service.metrics.registry)

    app = web.Application(middlewares=[auth_middleware(token)], client_max_size=max_body_bytes)
    app.router.add_post(f"{API}/{{op}}", serve)
    app.router.add_get("/metrics", metrics)
    return app


async def _read_body(request: web.Request, max_body_bytes: int) -> bytes:
    """The request body, refused before it is read when its length is over the limit.

    With a length, the pieces are joined once (`BaseRequest.read` copies them twice).
    """
    length = request.content_length
    if length is None:
        return await request.read()  # no length given: aiohttp counts against the limit
    if length > max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_body_bytes, length)
    if length == 0:
        return b""
    try:
        return await request.content.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionResetError(f"the body ended after {len(exc.partial)} of "
                                   f"{length} bytes") from exc


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
                            max_body_bytes: int) -> web.AppRunner:
    """Serve service on a bound socket (see `bind_socket`); stop with `runner.cleanup()`."""
    runner = web.AppRunner(node_app(service, token, max_body_bytes=max_body_bytes),
                           handle_signals=False, access_log=None, handler_cancellation=True,
                           max_field_size=MAX_HEADER)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
