"""Helpers for the tests of what crosses the wire: sample errors and a server that answers
oddly on purpose."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.test_utils import TestServer

from multicloud.core.errors import InvalidChunkId, MulticloudError, NodeUnavailable, TransferTimeout


def example_error(cls: type[MulticloudError]) -> MulticloudError:
    """An instance of an error class, with the arguments its constructor needs."""
    if cls is NodeUnavailable:
        return NodeUnavailable("gcp-node-9", "connection refused")
    if cls is InvalidChunkId:
        return InvalidChunkId("not-hex")
    if cls is TransferTimeout:
        return TransferTimeout("aws-node-1", "gcp-node-2", 2.5)
    return cls(f"a {cls.__name__} with 'quotes', ü and\na newline")


@contextlib.asynccontextmanager
async def odd_server() -> AsyncIterator[tuple[str, list[web.StreamResponse]]]:
    """A server on 127.0.0.1 that answers each request with the next prepared response:
    (its base URL, the list to put the responses in)."""
    answers: list[web.StreamResponse] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        return answers.pop(0)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/"), answers
