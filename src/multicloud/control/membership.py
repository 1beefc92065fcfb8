"""Talking to the registry service: nodes join and heartbeat, the orchestrator watches.

`RegistryClient` is a node's side (register, heartbeat). `fetch_nodes` reads the node
list, and `MembershipWatcher` keeps a `NodeRegistry` in step with the registry's failure
detector: a node whose heartbeats stop turns unhealthy here too, which takes it out of
service at once; one that returns turns healthy. A registry that is briefly away
(restarting) changes nothing: the last known membership stands until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from multicloud.control.registry import GIB, NodeRegistry, WorkerNode
from multicloud.core import clock
from multicloud.core.auth import auth_header
from multicloud.core.config import NodeSpec
from multicloud.core.errors import ClusterError
from multicloud.core.types import NodeStatus

log = logging.getLogger(__name__)

API = "/v1"


async def fetch_nodes(registry_url: str, token: str,
                      session: aiohttp.ClientSession | None = None) -> list[dict[str, Any]]:
    """The registry's view of every node."""
    url = f"{registry_url.rstrip('/')}{API}/nodes"
    owned = session is None
    client = session or aiohttp.ClientSession(headers=auth_header(token))
    try:
        async with client.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status == 401:
                raise ClusterError(f"the registry at {registry_url} refused our token: check "
                                   f"MULTICLOUD_TOKEN or the data dir's token file")
            if resp.status != 200:
                raise ClusterError(f"the registry at {registry_url} answered {resp.status}")
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the registry at {registry_url}: {exc}; is "
                           f"`multicloud registry` (or `multicloud cluster up`) running?") from exc
    except ValueError as exc:
        raise ClusterError(f"{registry_url} answered with something that is not a node "
                           f"list ({exc}); is it a multicloud registry?") from exc
    finally:
        if owned:
            await client.close()
    nodes = body.get("nodes") if isinstance(body, dict) else None
    if not isinstance(nodes, list):
        raise ClusterError(f"{registry_url} answered without a node list; is it a "
                           f"multicloud registry?")
    return nodes


def worker_from_view(view: dict[str, Any]) -> WorkerNode:
    """The WorkerNode a registry view describes."""
    spec = NodeSpec(id=view["id"], cloud=view["cloud"], region=view["region"],
                    capacity_gb=max(view.get("capacity_bytes", 100 * GIB), 1) / GIB)
    node = WorkerNode(spec, url=view["url"])
    if view.get("status") == NodeStatus.UNHEALTHY:
        node.set_status(NodeStatus.UNHEALTHY, "registry says so")
    return node


def _heard_since(node: WorkerNode, view: dict[str, Any]) -> bool:
    """Whether the registry heard from node after we marked it unhealthy."""
    age = view.get("last_heartbeat_age_s")
    if node.unhealthy_since is None or age is None:
        return node.unhealthy_since is None
    return clock.monotonic() - float(age) > node.unhealthy_since


class RegistryCatalog:
    """The registry's copy of the batch catalogue (cluster mode): put and list entries."""

    def __init__(self, registry_url: str, token: str) -> None:
        self.url = f"{registry_url.rstrip('/')}{API}/catalog"
        self._token = token

    async def put(self, entry: dict[str, Any]) -> bool:
        """Record a batch entry; False when the registry holds a newer one."""
        body = await self._call("PUT", entry)
        return bool(body.get("kept"))

    async def entries(self) -> list[dict[str, Any]]:
        """Every entry the registry holds."""
        body = await self._call("GET", None)
        entries = body.get("entries")
        return entries if isinstance(entries, list) else []

    async def _call(self, method: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        try:
            async with aiohttp.ClientSession(headers=auth_header(self._token)) as session, \
                    session.request(method, self.url, json=payload,
                                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ClusterError(f"the registry's catalog answered {resp.status}: "
                                       f"{body.get('message') if isinstance(body, dict) else ''}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"cannot reach the registry's catalog at {self.url}: {exc}") \
                from exc
        return body if isinstance(body, dict) else {}


class MembershipWatcher:
    """Polls the registry and mirrors node membership and health into a NodeRegistry."""

    def __init__(self, registry: NodeRegistry, registry_url: str, token: str,
                 interval_s: float) -> None:
        self.registry = registry
        self.registry_url = registry_url
        self.interval_s = interval_s
        self._session = aiohttp.ClientSession(headers=auth_header(token))
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()  # set after each successful poll

    def start(self) -> None:
        """Begin watching."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop watching and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._session.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                views = await fetch_nodes(self.registry_url, "", self._session)
                self.apply(views)
            except (ClusterError, ValueError, KeyError, TypeError) as exc:
                # A registry restarting, or an answer that is not one: keep watching.
                log.debug("registry poll failed (keeping the last membership): %s", exc)
                continue
            self.synced.set()

    def apply(self, views: list[dict[str, Any]]) -> None:
        """Bring the registry's view of membership and health into the NodeRegistry."""
        for view in views:
            node = self.registry.nodes.get(view["id"])
            if node is None:
                self.registry.add(worker_from_view(view))
                log.info("node %s joined", view["id"])
                continue
            node.url = view["url"]
            status = NodeStatus(view["status"])
            if status is NodeStatus.HEALTHY and not node.healthy and not _heard_since(node, view):
                continue  # we saw it fail after its last heartbeat: the registry is behind
            if status is not node.status:
                reason = ("missed heartbeats" if status is NodeStatus.UNHEALTHY
                          else "heartbeats resumed")
                node.set_status(status, reason)


class RegistryClient:
    """A node's connection to the registry: join, then heartbeat."""

    def __init__(self, registry_url: str, token: str) -> None:
        self.registry_url = registry_url.rstrip("/")
        self._session = aiohttp.ClientSession(headers=auth_header(token))

    async def register(self, payload: dict[str, Any]) -> str:
        """Join (or rejoin) the cluster; the node id the registry gives (or confirms)."""
        try:
            async with self._session.post(f"{self.registry_url}{API}/nodes",
                                          json=payload) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status != 200 or not isinstance(body, dict):
                    message = body.get("message") if isinstance(body, dict) else None
                    raise ClusterError(f"registry refused registration: "
                                       f"{message or f'HTTP {resp.status}'}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the registry at {self.registry_url}: {exc}; "
                               f"start it with `multicloud registry`") from exc
        return str(body["node"]["id"])

    async def heartbeat(self, node_id: str, payload: dict[str, Any], timeout_s: float) -> bool:
        """Report that node_id is alive; False when the registry does not know it (any more)."""
        url = f"{self.registry_url}{API}/nodes/{node_id}/heartbeat"
        async with self._session.post(url, json=payload,
                                      timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status != 404

    async def close(self) -> None:
        """Close the connection."""
        await self._session.close()
