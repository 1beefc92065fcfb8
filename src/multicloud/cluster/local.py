"""The embedded cluster: every node in this process, its state under one data dir.

The nodes are the same `NodeService`s cluster mode serves over HTTP, reached through the
in-process carrier (`LocalComm`), so the embedded cluster runs the product's data plane,
not a model of it. `<data_dir>/cluster.json` records membership (ids, clouds, regions,
capacity) so that separate processes (`run`, then `restore`, then `verify`) see the same
cluster, and `<data_dir>/nodes/<node_id>/` holds each node's chunk store, unless the
config keeps a node's replicas in a bucket (`node_stores`, or the node's own `store`): then
its chunks and its catalogue are objects under that URL (see `multicloud.node.stores`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

from multicloud.comm.cluster import Cluster
from multicloud.comm.local import LocalComm
from multicloud.control.registry import WorkerNode
from multicloud.core.config import ClusterConfig, NodeSpec, StorageConfig
from multicloud.core.errors import ConfigError, storage_error
from multicloud.core.network import Location, NetworkTopology
from multicloud.node.service import NodeService
from multicloud.node.stores import check_distinct_stores, open_node_store

MEMBERSHIP_FILE = "cluster.json"


def create_local_cluster(
    data_dir: str | Path,
    nodes_per_cloud: dict[str, int] | None = None,
    time_scale: float | None = None,
    seed: int | None = None,
    config: ClusterConfig | None = None,
    storage: StorageConfig | None = None,
    join: bool = True,
) -> Cluster:
    """Start (or reopen) an embedded cluster under data_dir and return its registry.

    Nodes already recorded under data_dir keep their data and rejoin; with `join`, nodes
    the config adds join too (and cluster.json records them); without it, a reader sees
    the recorded membership and changes nothing. Keyword arguments override config fields.
    """
    config = config or ClusterConfig()
    overrides: dict[str, object] = {}
    if nodes_per_cloud is not None:
        overrides.update(nodes_per_cloud=dict(nodes_per_cloud), nodes=[])
    if time_scale is not None:
        overrides["time_scale"] = time_scale
    if seed is not None:
        overrides["seed"] = seed
    if overrides:
        config = ClusterConfig.model_validate({**config.model_dump(), **overrides})
    storage = storage or StorageConfig()

    root = Path(data_dir)
    specs = _merge_membership(root, config.node_specs(), write=join)
    services: dict[str, NodeService] = {}
    comm = LocalComm(services)
    check_distinct_stores(specs, config)
    for spec in specs:
        store = open_node_store(spec, config, root, fsync=storage.fsync)
        services[spec.id] = NodeService(spec.id, Location(spec.cloud, spec.region), store, comm,
                                        seed=config.seed, time_scale=config.time_scale)
    cluster = Cluster(config, [WorkerNode(spec) for spec in specs], comm,
                      topology=NetworkTopology(config), data_dir=root)

    async def close_nodes() -> None:
        await asyncio.gather(*(asyncio.to_thread(s.close) for s in services.values()))

    cluster.on_close(close_nodes)
    return cluster


async def create_loopback_cluster(
    data_dir: str | Path,
    nodes_per_cloud: dict[str, int] | None = None,
    *,
    config: ClusterConfig | None = None,
    storage: StorageConfig | None = None,
    token: str = "loopback",
) -> Cluster:
    """The same cluster with every node behind its own HTTP server on 127.0.0.1.

    Each node is a `NodeServer` in this process (faults allowed), reached over real HTTP:
    the cluster-mode data plane, sockets and all, without starting processes. For tests
    and benchmarks that compare the two carriers on one machine.
    """
    from multicloud.cluster.node_server import NodeServer
    from multicloud.comm.http import HttpComm

    config = config or ClusterConfig()
    if nodes_per_cloud is not None:
        config = ClusterConfig.model_validate({**config.model_dump(),
                                               "nodes_per_cloud": dict(nodes_per_cloud),
                                               "nodes": []})
    storage = storage or StorageConfig()
    root = Path(data_dir)
    specs = config.node_specs()
    check_distinct_stores(specs, config)
    servers = [NodeServer(root, token, spec.cloud, spec.region, node_id=spec.id,
                          host="127.0.0.1", port=0, fsync=storage.fsync,
                          capacity_bytes=int(spec.capacity_gb * 1024**3), allow_faults=True,
                          cluster=config)
               for spec in specs]

    async def stop_servers() -> None:
        await asyncio.gather(*(server.stop() for server in servers))

    try:
        urls = await asyncio.gather(*(server.start() for server in servers))
    except BaseException:
        await stop_servers()
        raise
    cluster = Cluster(config, [WorkerNode(spec, url=url) for spec, url in zip(specs, urls,
                                                                            strict=True)],
                      HttpComm(token), topology=NetworkTopology(config), data_dir=root)
    cluster.on_close(stop_servers)
    return cluster


def _merge_membership(root: Path, wanted: list[NodeSpec], write: bool) -> list[NodeSpec]:
    """Known nodes from cluster.json, plus any the config adds (written back with write)."""
    path = root / MEMBERSHIP_FILE
    known: dict[str, NodeSpec] = {}
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            known = {n["id"]: NodeSpec.model_validate(n) for n in raw["nodes"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}); move it away to start a new "
                              f"cluster, or restore it from a backup") from exc
    if known and not write:
        return sorted(known.values(), key=lambda s: s.id)
    merged = dict(known)
    for spec in wanted:
        merged.setdefault(spec.id, spec)
    specs = sorted(merged.values(), key=lambda s: s.id)
    if write and merged != known:
        tmp = path.with_suffix(".tmp")
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tmp.open("w") as handle:
                handle.write(json.dumps({"nodes": [s.model_dump() for s in specs]}, indent=2))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise storage_error(exc, f"cannot record the cluster's membership in {path}") \
                from exc
    return specs
