"""Cluster mode's transport: nodes are processes, reached over HTTP with a bearer token.

The orchestrator sends each chunk's raw bytes once, to the processing node (emulating the
source-to-node link itself, as the sender); replica bytes then move node to node through
`/v1/replicate`, the sending node emulating that link. Every transfer is charged to the
orchestrator's ledger, so metrics match the embedded cluster's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp

from multicloud.comm.transport import ReplicaState, Transport
from multicloud.comm.wire import (
    API,
    CHUNK_HEADER,
    ack_from_json,
    blob_from_json,
    chunk_to_header,
    link_to_json,
    raise_for_error,
)
from multicloud.core.auth import auth_header
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import NodeUnavailable
from multicloud.core.network import LinkEmulator, Location, NetworkTopology, TrafficLedger

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry, WorkerNode
    from multicloud.core.types import BlobInfo, Chunk, ReplicaAck

_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, ConnectionError, TimeoutError)
_PING_S = 2.0  # a node that cannot answer a health check this fast is not fit to hold data


class HttpTransport(Transport):
    """Reaches node processes over HTTP."""

    def __init__(self, token: str, topology: NetworkTopology, time_scale: float = 0.0,
                 max_connections: int = 64) -> None:
        self.token = token
        self.topology = topology
        self.time_scale = time_scale
        self.ledger = TrafficLedger()
        self.links = LinkEmulator(time_scale)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._registry: NodeRegistry | None = None

    def attach(self, registry: NodeRegistry) -> None:
        """Know the registry, to configure every node at the start of a run."""
        self._registry = registry

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=auth_header(self.token),
                connector=aiohttp.TCPConnector(limit=self._max_connections))
        return self._session

    async def _call(self, node: WorkerNode, method: str, path: str, *,
                    expect: tuple[int, ...] = (200,), raw: bool = False,
                    **kwargs: Any) -> Any:
        if node.url is None:
            raise NodeUnavailable(node.id, "has no URL (not registered)")
        url = f"{node.url.rstrip('/')}{API}{path}"
        try:
            async with self._client().request(method, url, **kwargs) as resp:
                if resp.status in expect:
                    return await resp.read() if raw else await resp.json(content_type=None)
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = None
                raise_for_error(resp.status, body if isinstance(body, dict) else None, node.id)
        except _CONNECTION_ERRORS as exc:
            raise NodeUnavailable(node.id, f"connection failed: {exc}") from exc

    async def configure(self, processing: ProcessingConfig) -> None:
        if self._registry is None:
            return
        body = {"processing": processing.model_dump(), "time_scale": self.time_scale}
        nodes = self._registry.healthy_nodes()
        results = await asyncio.gather(
            *(self._call(n, "POST", "/configure", json=body) for n in nodes),
            return_exceptions=True)
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, NodeUnavailable):
                # Down already: the run's failure handling will route around it.
                self._registry.record_failure(node.id, 1, str(result))
            elif isinstance(result, BaseException):
                raise result

    async def ping(self, node: WorkerNode) -> None:
        await self._call(node, "GET", "/health", timeout=aiohttp.ClientTimeout(total=_PING_S))

    async def process(self, node: WorkerNode, chunk: Chunk, data: bytes | memoryview,
                      origin: Location) -> BlobInfo:
        link = self.topology.link(origin, node.location)
        self.ledger.charge(link, len(data))
        await self.links.transfer(link, len(data))
        body = await self._call(node, "POST", "/process", data=data,
                                headers={CHUNK_HEADER: chunk_to_header(chunk)})
        return blob_from_json(body)

    async def replicate(self, src: WorkerNode, dst: WorkerNode, blob: BlobInfo) -> ReplicaAck:
        link = self.topology.link(src.location, dst.location)
        request = {"chunk_id": blob.chunk_id, "blob_checksum": blob.blob_checksum,
                   "target": {"id": dst.id, "url": dst.url}, "link": link_to_json(link)}
        ack = ack_from_json(await self._call(src, "POST", "/replicate", json=request))
        if src.id != dst.id:
            self.ledger.charge(link, ack.blob_size)
        return ack

    async def release(self, node: WorkerNode, chunk_id: str) -> None:
        await self._call(node, "POST", f"/release/{chunk_id}")

    async def read(self, node: WorkerNode, chunk_id: str, dest: Location) -> bytes:
        blob: bytes = await self._call(node, "GET", f"/chunks/{chunk_id}", raw=True)
        link = self.topology.link(node.location, dest)
        self.ledger.charge(link, len(blob))
        await self.links.transfer(link, len(blob))
        return blob

    async def check(self, node: WorkerNode, chunk_id: str) -> ReplicaState:
        body = await self._call(node, "GET", f"/chunks/{chunk_id}/check")
        state: ReplicaState = body["state"]
        return state

    async def inventory(self, node: WorkerNode) -> list[str]:
        body = await self._call(node, "GET", "/chunks")
        return list(body["chunks"])

    async def usage(self, node: WorkerNode) -> tuple[int, int]:
        body = await self._call(node, "GET", "/usage")
        return int(body["chunks"]), int(body["bytes"])

    async def delete(self, node: WorkerNode, chunk_id: str) -> bool:
        body = await self._call(node, "DELETE", f"/chunks/{chunk_id}")
        return bool(body["deleted"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
