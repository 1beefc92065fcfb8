"""A worker node as a process: the embedded cluster's `NodeService`, served over HTTP.

The node binds its port, registers with the registry (which names it when no id is given),
opens its chunk store (under `<data_dir>/nodes/<id>`, or the bucket the cluster config
names for it: `node_stores` by cloud or the node's own `store`; `multicloud node` passes
the config it loaded from `--config-dir`), serves every node operation on
`POST /v1/<op>` (see `multicloud.comm.http`), and heartbeats with its live usage. Its
pushes to peers go over HTTP too. SIGTERM stops accepting, lets in-flight requests finish,
then exits. A node told to crash (a fault) also stops heartbeating, as a dead one would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aiohttp
from aiohttp import web

from multicloud.blob.validate import warm_up
from multicloud.comm.bodies import BodyBuffers
from multicloud.comm.http import HttpComm, bind_socket, start_node_server
from multicloud.control.membership import RegistryClient
from multicloud.core.config import ClusterConfig, ServiceConfig
from multicloud.core.errors import ClusterError
from multicloud.core.network import Location
from multicloud.core.runfiles import service_url
from multicloud.node.service import NodeService
from multicloud.node.store import ChunkStore
from multicloud.node.stores import NodeStore, check_distinct_stores, node_spec_for, open_node_store

log = logging.getLogger(__name__)


class NodeServer:
    """One worker node process: HTTP API, registration and heartbeats."""

    def __init__(self, data_dir: str | Path, token: str, cloud: str, region: str, *,
                 node_id: str | None = None, registry_url: str | None = None,
                 service: ServiceConfig | None = None, host: str | None = None,
                 port: int = 0, capacity_bytes: int = 100 * 1024**3, fsync: bool = True,
                 advertise_host: str | None = None, allow_faults: bool = False,
                 cluster: ClusterConfig | None = None) -> None:
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
        self.allow_faults = allow_faults
        # Where nodes keep their replicas (`node_stores`, a node's `store`): None, or a
        # config that names no bucket for this node, means the local disk.
        self.cluster = cluster
        self.node: NodeService | None = None
        self.buffers = BodyBuffers()  # what the bodies it receives land in, reused
        self._peers = HttpComm(token)
        self._registry: RegistryClient | None = None
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._url = ""

    @property
    def url(self) -> str:
        """Base URL the node serves on."""
        return self._url

    async def start(self) -> str:
        """Bind, register (learning the id if none was given), open the store, serve, beat."""
        sock = bind_socket(self.host, self.port)
        try:
            self._url = service_url(self.advertise_host or self.host, sock.getsockname()[1])
            if self.registry_url is not None:
                self._registry = RegistryClient(self.registry_url, self.token)
                self.node_id = await self._registry.register({
                    "id": self.node_id, "cloud": self.cloud, "region": self.region,
                    "url": self._url, "capacity_bytes": self.capacity_bytes})
            if self.node_id is None:
                raise ClusterError("a node needs --id when it runs without a registry")
            store = await asyncio.to_thread(self._open_store, self.node_id)
            await asyncio.to_thread(warm_up)
            self.node = NodeService(self.node_id, Location(self.cloud, self.region), store,
                                    self._peers, allow_faults=self.allow_faults)
            self._runner = await start_node_server(
                self.node, self.token, sock,
                max_body_bytes=int(self.service_config.max_body_mb * 1024 * 1024),
                buffers=self.buffers)
        except BaseException:
            sock.close()
            raise
        if self._registry is not None:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        log.info("node %s (%s/%s) serving on %s", self.node_id, self.cloud, self.region,
                 self._url)
        return self._url

    def _open_store(self, node_id: str) -> NodeStore:
        """This node's chunk store, once its id is known (the registry may name it)."""
        if self.cluster is None:  # no config to name a bucket: the local disk
            return ChunkStore(self.data_dir / "nodes" / node_id, self.fsync,
                              owner=f"node {node_id}")
        spec = node_spec_for(self.cluster, node_id, self.cloud, self.region)
        # The config names every node: refuse one that would share its prefix with another.
        check_distinct_stores([*self.cluster.node_specs(), spec], self.cluster)
        return open_node_store(spec, self.cluster, self.data_dir, self.fsync)

    async def stop(self) -> None:
        """Stop heartbeating, finish in-flight requests, close the store's threads."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, waits for running handlers
        await self._peers.close()
        if self._registry is not None:
            await self._registry.close()
        if self.node is not None:
            await asyncio.to_thread(self.node.close)

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
        assert self._registry is not None
        assert self.node is not None
        assert self.node_id is not None
        if self.node.faults.crashed:
            return  # a crashed node is silent
        chunks, nbytes = self.node.store.usage()
        payload = {"chunks": chunks, "bytes": nbytes, "inflight": 0}
        known = await self._registry.heartbeat(
            self.node_id, payload, self.service_config.heartbeat_interval_s * 2)
        if not known:  # the registry forgot us (a fresh data dir): join again
            await self._registry.register({
                "id": self.node_id, "cloud": self.cloud, "region": self.region,
                "url": self._url, "capacity_bytes": self.capacity_bytes})

