"""A worker node as a process: the same `NodeService` the embedded cluster uses, over HTTP.

The node binds its port, registers with the registry (which names it when no id is given),
opens its chunk store under `<data_dir>/nodes/<id>`, and heartbeats. It serves chunk
writes (checksum verified, durable before the 201), reads, checks, deletes, inventory,
processing on its worker slots, and replicate-to-target (node to node, the sender
emulating the link). SIGTERM stops accepting, lets in-flight requests finish, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from multicloud.comm.wire import (
    API,
    CHECKSUM_HEADER,
    CHUNK_HEADER,
    ack_from_json,
    ack_to_json,
    blob_to_json,
    chunk_from_header,
    error_body,
    link_from_json,
    raise_for_error,
)
from multicloud.core.auth import auth_header, auth_middleware
from multicloud.core.config import ProcessingConfig, ServiceConfig
from multicloud.core.errors import ClusterError, MulticloudError, NodeUnavailable
from multicloud.core.network import LinkEmulator
from multicloud.node.service import NodeService
from multicloud.node.store import ChunkStore, check_chunk_id
from multicloud.ui.prometheus import CallbackCollector, metrics_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_USAGE_EVERY_S = 5.0  # walking the store is not free; heartbeats reuse a recent count


class NodeServer:
    """One worker node process: HTTP API, registration and heartbeats."""

    def __init__(self, data_dir: str | Path, token: str, cloud: str, region: str, *,
                 node_id: str | None = None, registry_url: str | None = None,
                 service: ServiceConfig | None = None, host: str | None = None,
                 port: int = 0, capacity_bytes: int = 100 * 1024**3, fsync: bool = True,
                 advertise_host: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.token = token
        self.cloud = cloud
        self.region = region
        self.node_id = node_id
        self.registry_url = registry_url.rstrip("/") if registry_url else None
        self.service_config = service or ServiceConfig()
        self.host = host or self.service_config.host
        self.port = port
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.advertise_host = advertise_host
        self.node: NodeService | None = None
        self.links = LinkEmulator(0.0)
        self.inflight = 0
        self._usage = (0, 0)
        self._usage_at = 0.0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._url = ""
        self._metrics_registry = CollectorRegistry()  # private: several nodes per process
        self._metrics_registry.register(CallbackCollector(self._collect_metrics))

    @property
    def url(self) -> str:
        """Base URL the node serves on."""
        return self._url

    async def start(self) -> str:
        """Bind, register (learning the id if none was given), open the store, heartbeat."""
        app = web.Application(
            middlewares=[auth_middleware(self.token), self._error_middleware()],
            client_max_size=int(self.service_config.max_body_mb * 1024 * 1024))
        self._routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self._url = f"http://{self.advertise_host or self.host}:{bound}"
        self._session = aiohttp.ClientSession(headers=auth_header(self.token))
        if self.registry_url is not None:
            await self._register()
        if self.node_id is None:
            raise ClusterError("a node needs --id when it runs without a registry")
        store = ChunkStore(self.data_dir / "nodes" / self.node_id, fsync=self.fsync)
        self.node = NodeService(self.node_id, store)
        self._usage = await asyncio.to_thread(store.usage)
        self._usage_at = time.monotonic()
        if self.registry_url is not None:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        log.info("node %s (%s/%s) serving on %s", self.node_id, self.cloud, self.region,
                 self._url)
        return self._url

    async def stop(self) -> None:
        """Stop heartbeating, finish in-flight requests, close the store's threads."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, waits for running handlers
        if self._session is not None:
            await self._session.close()
        if self.node is not None:
            await asyncio.to_thread(self.node.close)

    # -- registry ------------------------------------------------------------------------

    async def _register(self) -> None:
        assert self._session is not None
        assert self.registry_url is not None
        payload = {"id": self.node_id, "cloud": self.cloud, "region": self.region,
                   "url": self._url, "capacity_bytes": self.capacity_bytes}
        try:
            async with self._session.post(f"{self.registry_url}{API}/nodes",
                                          json=payload) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ClusterError(f"registry refused registration: "
                                       f"{body.get('message', resp.status)}")
        except aiohttp.ClientError as exc:
            raise ClusterError(f"cannot reach the registry at {self.registry_url}: {exc}; "
                               f"start it with `multicloud registry`") from exc
        self.node_id = body["node"]["id"]

    async def _heartbeat_loop(self) -> None:
        interval = self.service_config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self._beat()
            except (aiohttp.ClientError, TimeoutError, ClusterError) as exc:
                # The registry may be restarting: keep beating, it will hear us again.
                log.debug("heartbeat from %s failed: %s", self.node_id, exc)

    async def _beat(self) -> None:
        assert self._session is not None
        assert self.node is not None
        if time.monotonic() - self._usage_at > _USAGE_EVERY_S:
            self._usage = await self.node.usage()
            self._usage_at = time.monotonic()
        payload = {"chunks": self._usage[0], "bytes": self._usage[1], "inflight": self.inflight}
        url = f"{self.registry_url}{API}/nodes/{self.node_id}/heartbeat"
        timeout = aiohttp.ClientTimeout(total=self.service_config.heartbeat_interval_s * 2)
        async with self._session.post(url, json=payload, timeout=timeout) as resp:
            if resp.status == 404:  # the registry forgot us (a fresh data dir): join again
                await self._register()

    # -- HTTP ----------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        app.router.add_get(f"{API}/health", self._health)
        app.router.add_post(f"{API}/configure", self._configure)
        app.router.add_post(f"{API}/process", self._process)
        app.router.add_post(f"{API}/replicate", self._replicate)
        app.router.add_get(f"{API}/chunks", self._inventory)
        app.router.add_put(f"{API}/chunks/{{id}}", self._put)
        app.router.add_get(f"{API}/chunks/{{id}}", self._get, allow_head=False)
        app.router.add_head(f"{API}/chunks/{{id}}", self._head)
        app.router.add_delete(f"{API}/chunks/{{id}}", self._delete)
        app.router.add_get(f"{API}/chunks/{{id}}/check", self._check)
        app.router.add_post(f"{API}/release/{{id}}", self._release)
        app.router.add_get(f"{API}/usage", self._usage_view)
        app.router.add_get("/metrics", self._metrics)

    def _error_middleware(self) -> Middleware:
        """Turns library errors into JSON error bodies; 503 until the store is open."""

        @web.middleware
        async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.node is None and request.path != f"{API}/health":
                return web.json_response({"error": "not_ready", "message": "node is starting",
                                          "node_id": self.node_id}, status=503)
            self.inflight += 1
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if exc.status == 413:
                    return web.json_response({"error": "too_large", "message": exc.text,
                                              "node_id": self.node_id}, status=413)
                raise
            except MulticloudError as exc:
                status, body = error_body(exc, self.node_id or "?")
                return web.json_response(body, status=status)
            finally:
                self.inflight -= 1

        return errors

    def _service(self) -> NodeService:
        assert self.node is not None  # _errors answers 503 before the store is open
        return self.node

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"id": self.node_id, "cloud": self.cloud,
                                  "region": self.region, "status": "ok" if self.node else
                                  "starting", "inflight": self.inflight})

    async def _configure(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._service().configure(ProcessingConfig.model_validate(body["processing"]))
        self.links = LinkEmulator(float(body.get("time_scale", 0.0)))
        return web.json_response({"configured": True})

    async def _process(self, request: web.Request) -> web.Response:
        chunk = chunk_from_header(request.headers[CHUNK_HEADER])
        data = await request.read()
        info = await self._service().process(chunk, data)
        return web.json_response(blob_to_json(info))

    async def _put(self, request: web.Request) -> web.Response:
        chunk_id = check_chunk_id(request.match_info["id"])
        expected = request.headers.get(CHECKSUM_HEADER)
        if not expected:
            return web.json_response({"error": "bad_request", "node_id": self.node_id,
                                      "message": f"{CHECKSUM_HEADER} header is required"},
                                     status=400)
        blob = await request.read()
        ack = await self._service().write(chunk_id, blob, expected)
        return web.json_response(ack_to_json(ack), status=201)

    async def _get(self, request: web.Request) -> web.Response:
        blob = await self._service().read(check_chunk_id(request.match_info["id"]))
        return web.Response(body=blob, content_type="application/octet-stream")

    async def _head(self, request: web.Request) -> web.Response:
        present = self._service().has(check_chunk_id(request.match_info["id"]))
        return web.Response(status=200 if present else 404)

    async def _delete(self, request: web.Request) -> web.Response:
        deleted = await self._service().delete(check_chunk_id(request.match_info["id"]))
        return web.json_response({"deleted": deleted})

    async def _check(self, request: web.Request) -> web.Response:
        state = await self._service().check(check_chunk_id(request.match_info["id"]))
        return web.json_response({"state": state})

    async def _inventory(self, request: web.Request) -> web.Response:
        return web.json_response({"chunks": await self._service().inventory()})

    async def _usage_view(self, request: web.Request) -> web.Response:
        chunks, nbytes = await self._service().usage()
        return web.json_response({"chunks": chunks, "bytes": nbytes})

    async def _release(self, request: web.Request) -> web.Response:
        self._service().release(request.match_info["id"])
        return web.json_response({"released": True})

    async def _replicate(self, request: web.Request) -> web.Response:
        """Push a staged or stored blob to another node (or store it here)."""
        body: dict[str, Any] = await request.json()
        chunk_id = check_chunk_id(body["chunk_id"])
        target = body["target"]
        service = self._service()
        if target["id"] == self.node_id:
            ack = await service.persist_staged(chunk_id, body["blob_checksum"])
            return web.json_response(ack_to_json(ack))
        blob = await service.blob_for_push(chunk_id)
        await self.links.transfer(link_from_json(body["link"]), len(blob))
        assert self._session is not None
        url = f"{target['url'].rstrip('/')}{API}/chunks/{chunk_id}"
        try:
            async with self._session.put(url, data=blob,
                                         headers={CHECKSUM_HEADER: body["blob_checksum"]}) as resp:
                reply = await resp.json(content_type=None)
                if resp.status != 201:
                    raise_for_error(resp.status, reply, target["id"])
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise NodeUnavailable(target["id"], f"unreachable from {self.node_id}: {exc}") from exc
        return web.json_response(ack_to_json(ack_from_json(reply)))

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self._metrics_registry)

    def _collect_metrics(self) -> list[Metric]:
        """The node's series, read when scraped."""
        chunks, nbytes = self._usage
        labels = ["node", "cloud", "region"]
        values = [self.node_id or "", self.cloud, self.region]
        families = [
            ("multicloud_node_chunks", "Chunks stored on this node.", chunks),
            ("multicloud_node_bytes", "Bytes stored on this node.", nbytes),
            # The scrape itself is in flight; it does not count.
            ("multicloud_node_inflight_requests", "Requests being served.",
             max(self.inflight - 1, 0)),
        ]
        result: list[Metric] = []
        for name, doc, value in families:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            result.append(family)
        return result
