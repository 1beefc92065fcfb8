"""The registry service of cluster mode: membership, heartbeats and failure detection over HTTP.

Worker nodes register (`POST /v1/nodes`) and then heartbeat; the orchestrator and
`cluster status` read the node list. The failure detector is a heartbeat timeout: a node is
healthy while its last heartbeat is at most `failure_timeout_s` old. `RegistryState` holds
the logic (no HTTP, injectable clock); `RegistryServer` puts it behind aiohttp and the
bearer-token middleware; `serve_registry` is what `multicloud registry` runs.

Membership (not heartbeats) is kept in `<data_dir>/registry.json`, so a restarted registry
knows every node and gives each one failure timeout of grace to heartbeat again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from multicloud.core.auth import auth_middleware
from multicloud.core.config import ServiceConfig
from multicloud.core.errors import ClusterError, ConfigError, StorageError
from multicloud.core.exposition import CallbackCollector, metrics_response
from multicloud.core.runfiles import service_url
from multicloud.core.types import NodeStatus
from multicloud.node.catalog import CatalogStore

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
_FILE_VERSION = 1
NODE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_COUNTERS = ("chunks", "bytes", "inflight")


@dataclass(slots=True)
class _Member:
    """One registered node: its persisted identity plus what heartbeats tell us."""

    id: str
    cloud: str
    region: str
    url: str
    capacity_bytes: int
    registered_at: float  # wall-clock seconds since the epoch, persisted
    # Monotonic time the detector measures silence from: the last heartbeat, or the
    # registry's start for a node loaded from disk and not heard from since.
    deadline_base: float
    last_heartbeat: float | None = None  # monotonic; None until heard from in this process
    status: NodeStatus = NodeStatus.HEALTHY  # the status last recorded (and logged)
    status_changes: int = 0
    chunks: int = 0
    bytes: int = 0
    inflight: int = 0

    def record(self) -> dict[str, Any]:
        """The persisted part."""
        return {"id": self.id, "cloud": self.cloud, "region": self.region, "url": self.url,
                "capacity_bytes": self.capacity_bytes, "registered_at": self.registered_at}


class RegistryState:
    """Membership and health of the cluster's nodes, without HTTP; time comes from `clock`."""

    def __init__(self, data_dir: Path, service: ServiceConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / REGISTRY_FILE
        self.service = service
        self.clock = clock
        self.heartbeats_total = 0
        self._transitions: list[tuple[str, str]] = []
        started = clock()
        self._members: dict[str, _Member] = {
            m.id: m for m in _load(self.path, started)
        }
        if self._members:
            log.info("registry loaded %d nodes from %s; each has %.1fs to heartbeat",
                     len(self._members), self.path, service.failure_timeout_s)

    def register(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Add a node or update a known one (also a heartbeat); returns its view.

        Raises ValueError naming the bad field when the payload is invalid.
        """
        fields = _parse_registration(payload)
        node_id = fields.pop("id") or self._next_id(fields["cloud"])
        now = self.clock()
        existing = self._members.get(node_id)
        if existing is None:
            member = _Member(id=node_id, registered_at=time.time(), deadline_base=now,
                             last_heartbeat=now, **fields)
            self._save([*self._members.values(), member])
            self._members[node_id] = member
            log.info("node %s registered: %s/%s at %s", node_id, member.cloud, member.region,
                     member.url)
            return self._view(member, now)
        if existing.cloud != fields["cloud"]:
            # Placement trusts a node's cloud; silently moving an id between clouds would
            # misplace every replica it holds.
            raise ValueError(f"node {node_id!r} is registered in cloud {existing.cloud!r}, "
                             f"not {fields['cloud']!r}: delete it first (DELETE /v1/nodes/"
                             f"{node_id}) or register under another id")
        updated = dataclasses.replace(existing, **fields)
        if updated.record() != existing.record():
            self._save([updated if m.id == node_id else m for m in self._members.values()])
            log.info("node %s re-registered: %s/%s at %s", node_id, updated.cloud,
                     updated.region, updated.url)
        self._members[node_id] = updated
        self._heard(updated, now)
        return self._view(updated, now)

    def heartbeat(self, node_id: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """Record a heartbeat and the node's reported load; None if the node is unknown.

        Raises ValueError when a counter is not a non-negative integer.
        """
        counters = _parse_counters(payload)
        member = self._members.get(node_id)
        if member is None:
            return None
        for name, value in counters.items():
            setattr(member, name, value)
        now = self.clock()
        self._heard(member, now)
        return self._view(member, now)

    def remove(self, node_id: str) -> bool:
        """Forget a node for good; False if it was not known."""
        if node_id not in self._members:
            return False
        self._save([m for m in self._members.values() if m.id != node_id])
        del self._members[node_id]
        log.info("node %s removed from the registry", node_id)
        return True

    def get(self, node_id: str) -> dict[str, Any] | None:
        """The view of one node, or None if unknown."""
        member = self._members.get(node_id)
        if member is None:
            return None
        now = self.clock()
        self._refresh(member, now)
        return self._view(member, now)

    def views(self) -> list[dict[str, Any]]:
        """Every node's view, sorted by id."""
        now = self.clock()
        result = []
        for node_id in sorted(self._members):
            member = self._members[node_id]
            self._refresh(member, now)
            result.append(self._view(member, now))
        return result

    def sweep(self) -> list[tuple[str, str]]:
        """Re-check every node; return the (node_id, new_status) changes since the last sweep.

        Changes noticed in between (a heartbeat reviving a node, a read finding one silent)
        were already recorded and logged there; they are reported here exactly once.
        """
        now = self.clock()
        for member in self._members.values():
            self._refresh(member, now)
        transitions, self._transitions = self._transitions, []
        return transitions

    def _status_at(self, member: _Member, now: float) -> NodeStatus:
        # The one definition of health: every read, heartbeat and sweep goes through here.
        if now - member.deadline_base <= self.service.failure_timeout_s:
            return NodeStatus.HEALTHY
        return NodeStatus.UNHEALTHY

    def _refresh(self, member: _Member, now: float) -> None:
        """Record (and log) a change of the node's status, if its heartbeat age made one."""
        status = self._status_at(member, now)
        if status is member.status:
            return
        silent = now - member.deadline_base
        if status is NodeStatus.UNHEALTHY:
            log.warning("node %s unhealthy: no heartbeat for %.1fs", member.id, silent)
        else:
            log.info("node %s healthy again: heartbeat received", member.id)
        member.status = status
        member.status_changes += 1
        self._transitions.append((member.id, status.value))

    def _heard(self, member: _Member, now: float) -> None:
        self.heartbeats_total += 1
        member.last_heartbeat = now
        member.deadline_base = now
        self._refresh(member, now)

    def _view(self, member: _Member, now: float) -> dict[str, Any]:
        age = None if member.last_heartbeat is None else max(0.0, now - member.last_heartbeat)
        return {
            **member.record(),
            "status": member.status.value,
            "last_heartbeat_age_s": age,
            "chunks": member.chunks,
            "bytes": member.bytes,
            "inflight": member.inflight,
            "status_changes": member.status_changes,
        }

    def _next_id(self, cloud: str) -> str:
        k = 1
        while f"{cloud}-node-{k}" in self._members:
            k += 1
        node_id = f"{cloud}-node-{k}"
        if not NODE_ID_PATTERN.match(node_id):
            raise ValueError(f"cannot derive a node id from cloud {cloud!r}: use a cloud name "
                             f"of lowercase letters, digits and '-', or pass an explicit id")
        return node_id

    def _save(self, members: Iterable[_Member]) -> None:
        """Write membership atomically; callers apply a change only after this succeeds."""
        records = sorted((m.record() for m in members), key=lambda r: str(r["id"]))
        text = json.dumps({"version": _FILE_VERSION, "nodes": records}, indent=2) + "\n"
        # Membership changes are rare (registration, operator removal) and the file is
        # small, so a blocking write here costs less than ordering writes across threads.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{REGISTRY_FILE}.tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.data_dir)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _load(path: Path, started: float) -> list[_Member]:
    """The members recorded in registry.json (none if it does not exist)."""
    if not path.exists():
        return []
    fix = ("fix it, restore it from a backup, or move it away to start with no members "
           "(running nodes re-register on their next heartbeat)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read registry membership file {path}: {exc.strerror}") \
            from exc
    except ValueError as exc:
        raise ConfigError(f"registry membership file {path} is not valid JSON ({exc}); "
                          f"{fix}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list):
        raise ConfigError(f"registry membership file {path} is corrupt: expected an object "
                          f"with a \"nodes\" list; {fix}")
    members: list[_Member] = []
    for i, entry in enumerate(raw["nodes"]):
        try:
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            fields = _parse_registration(entry)
            node_id = fields.pop("id")
            if node_id is None:
                raise ValueError("id is missing")
            registered_at = entry.get("registered_at")
            if isinstance(registered_at, bool) or not isinstance(registered_at, int | float):
                raise ValueError(f"registered_at must be a number, got {registered_at!r}")
        except ValueError as exc:
            raise ConfigError(f"registry membership file {path} is corrupt: node entry {i}: "
                              f"{exc}; {fix}") from exc
        if any(m.id == node_id for m in members):
            raise ConfigError(f"registry membership file {path} is corrupt: node {node_id!r} "
                              f"appears twice; {fix}")
        members.append(_Member(id=node_id, registered_at=float(registered_at),
                               deadline_base=started, **fields))
    return members


def _parse_registration(payload: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a registration; ValueError names the first bad one."""
    node_id = payload.get("id")
    if node_id is not None and (not isinstance(node_id, str)
                                or not NODE_ID_PATTERN.match(node_id)):
        raise ValueError(f"invalid node id {node_id!r}: use 1-63 lowercase letters, digits "
                         f"and '-', starting with a letter or digit, or omit it to get one")
    fields: dict[str, Any] = {"id": node_id}
    for name in ("cloud", "region"):
        value = payload.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        fields[name] = value
    url = payload.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) \
            or url in ("http://", "https://"):
        raise ValueError(f"invalid url {url!r}: give the node's base URL, "
                         f"starting with http:// or https://")
    fields["url"] = url.rstrip("/")
    capacity = payload.get("capacity_bytes", 0)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity_bytes must be a non-negative integer, got {capacity!r}")
    fields["capacity_bytes"] = capacity
    return fields


def _parse_counters(payload: dict[str, Any]) -> dict[str, int]:
    """The load counters a heartbeat reports (each optional)."""
    counters: dict[str, int] = {}
    for name in _COUNTERS:
        if name not in payload or payload[name] is None:
            continue
        value = payload[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        counters[name] = value
    return counters


def registry_metrics(state: RegistryState) -> CollectorRegistry:
    """The registry's Prometheus series, read from state at scrape time.

        registry_nodes{status}               gauge     registered nodes by health
        registry_heartbeats_total            counter   heartbeats received since start
        registry_node_up{node,cloud,region}  gauge     1 healthy, 0 not
    """
    def collect() -> list[Metric]:
        views = state.views()
        healthy = sum(1 for v in views if v["status"] == NodeStatus.HEALTHY.value)
        nodes = GaugeMetricFamily("multicloud_registry_nodes", "Registered nodes by health.",
                                  labels=["status"])
        nodes.add_metric(["healthy"], healthy)
        nodes.add_metric(["unhealthy"], len(views) - healthy)
        beats = CounterMetricFamily(
            "multicloud_registry_heartbeats",
            "Heartbeats received since the registry started (re-registrations count).",
            value=state.heartbeats_total)
        up = GaugeMetricFamily("multicloud_registry_node_up",
                               "Whether a node is healthy (1) or not (0).",
                               labels=["node", "cloud", "region"])
        for v in views:
            up.add_metric([v["id"], v["cloud"], v["region"]],
                          1 if v["status"] == NodeStatus.HEALTHY.value else 0)
        return [nodes, beats, up]

    registry = CollectorRegistry()
    registry.register(CallbackCollector(collect))
    return registry


def _error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The JSON object a request carries ({} for an empty body); ValueError if not one."""
    if not request.can_read_body:
        return {}
    text = await request.text()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"body must be a JSON object, got {type(body).__name__}")
    return body


class RegistryServer:
    """The registry over HTTP: aiohttp app, listening site and the failure-detector sweep."""

    def __init__(self, data_dir: str | Path, token: str, service: ServiceConfig | None = None,
                 host: str | None = None, port: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.data_dir = Path(data_dir)
        self.service = service or ServiceConfig()
        self.host = host if host is not None else self.service.host
        self.port = port if port is not None else self.service.registry_port
        self._token = token
        self._clock = clock
        self._state: RegistryState | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._url: str | None = None
        self._metrics_registry: CollectorRegistry | None = None
        # The committed batches, as the nodes list them too: a client that knows only the
        # registry finds every batch here (`multicloud recover --cluster URL`).
        self.catalog = CatalogStore(self.data_dir, owner="the registry")

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. "http://127.0.0.1:7400"."""
        if self._url is None:
            raise RuntimeError("RegistryServer.start() has not been called")
        return self._url

    @property
    def state(self) -> RegistryState:
        """The membership the server serves (loaded by start())."""
        if self._state is None:
            raise RuntimeError("RegistryServer.start() has not been called")
        return self._state

    async def start(self) -> str:
        """Load membership, listen (port 0 = any free port), start the sweep; return the URL."""
        if self._runner is not None:
            raise RuntimeError("RegistryServer is already started")
        # Loaded here, not in __init__, so the grace period starts when we can hear nodes.
        self._state = RegistryState(self.data_dir, self.service, self._clock)
        app = web.Application(middlewares=[auth_middleware(self._token)],
                              client_max_size=int(self.service.max_body_mb * 1024 * 1024))
        app.add_routes([
            web.post("/v1/nodes", self._register),
            web.get("/v1/nodes", self._list),
            web.get("/v1/nodes/{node_id}", self._get),
            web.delete("/v1/nodes/{node_id}", self._delete),
            web.post("/v1/nodes/{node_id}/heartbeat", self._heartbeat),
            web.get("/v1/catalog", self._catalog_list),
            web.put("/v1/catalog", self._catalog_put),
            web.get("/v1/health", self._health),
            web.get("/metrics", self._metrics),
        ])
        # Every node heartbeats several times a second; an access log line for each would
        # drown the membership and health messages that matter.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ClusterError(f"registry cannot listen on {self.host}:{self.port}: "
                               f"{exc.strerror or exc}; pick another --port or --host, or stop "
                               f"the process using it") from exc
        self._runner = runner
        self._url = service_url(self.host, runner.addresses[0][1])
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="registry-sweep")
        log.info("registry listening on %s (data dir %s)", self._url, self.data_dir)
        return self._url

    async def stop(self) -> None:
        """Stop the sweep and close the listening site; safe to call twice."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("registry on %s stopped", self._url)

    async def _sweep_forever(self) -> None:
        state = self.state
        period = self.service.heartbeat_interval_s / 2
        while True:
            await asyncio.sleep(period)
            try:
                state.sweep()  # the state logs each transition it records
            except Exception:
                # A bug in one sweep must not silently end failure detection for good.
                log.exception("registry failure-detector sweep failed")

    async def _register(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            view = self.state.register(body)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        return web.json_response({"node": view})

    async def _heartbeat(self, request: web.Request) -> web.StreamResponse:
        node_id = request.match_info["node_id"]
        try:
            body = await _json_body(request)
            view = self.state.heartbeat(node_id, body)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        if view is None:
            return self._unknown(node_id, "register it again (POST /v1/nodes)")
        return web.json_response({"node": view})

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({
            "nodes": self.state.views(),
            "heartbeat_interval_s": self.service.heartbeat_interval_s,
            "failure_timeout_s": self.service.failure_timeout_s,
        })

    async def _get(self, request: web.Request) -> web.StreamResponse:
        node_id = request.match_info["node_id"]
        view = self.state.get(node_id)
        if view is None:
            return self._unknown(node_id, "list the nodes with GET /v1/nodes")
        return web.json_response({"node": view})

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        node_id = request.match_info["node_id"]
        if not self.state.remove(node_id):
            return self._unknown(node_id, "list the nodes with GET /v1/nodes")
        return web.json_response({"removed": True})

    async def _catalog_list(self, request: web.Request) -> web.StreamResponse:
        entries = await asyncio.to_thread(self.catalog.entries)
        return web.json_response({"entries": entries})

    async def _catalog_put(self, request: web.Request) -> web.StreamResponse:
        try:
            entry = await _json_body(request)
            kept = await asyncio.to_thread(self.catalog.put, entry)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except (ValueError, StorageError) as exc:
            return _error(400, "bad_request", str(exc))
        return web.json_response({"kept": kept})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        views = self.state.views()
        healthy = sum(1 for v in views if v["status"] == NodeStatus.HEALTHY.value)
        return web.json_response({"status": "ok", "nodes": len(views), "healthy": healthy})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self._metrics_registry is None:
            self._metrics_registry = registry_metrics(self.state)
        return metrics_response(self._metrics_registry)

    def _unknown(self, node_id: str, hint: str) -> web.Response:
        return _error(404, "unknown_node", f"no node {node_id!r} is registered; {hint}")

    def _too_large(self) -> web.Response:
        return _error(413, "too_large",
                      f"request body over {self.service.max_body_mb} MB (max_body_mb)")


async def serve_registry(data_dir: str | Path, token: str, service: ServiceConfig, host: str,
                         port: int) -> None:
    """Run the registry until SIGINT or SIGTERM, then stop it cleanly (`multicloud registry`)."""
    server = RegistryServer(data_dir, token, service, host, port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    # Handlers go in before the socket opens: once the registry is reachable (and logs its
    # URL), a stop signal always means a clean stop, never the default abrupt exit.
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        log.info("registry got a stop signal; shutting down")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
