"""Connecting the orchestrator to a running cluster of node processes.

`connect_cluster` reads the registry's node list into a `Cluster` whose nodes are reached
over HTTP, and keeps node health in step with the registry's failure detector.
"""

from __future__ import annotations

from pathlib import Path

from multicloud.comm.cluster import Cluster
from multicloud.comm.http import HttpComm
from multicloud.control.membership import (
    MembershipWatcher,
    RegistryCatalog,
    fetch_nodes,
    worker_from_view,
)
from multicloud.core.config import ClusterConfig
from multicloud.core.errors import ClusterError
from multicloud.core.network import NetworkTopology


async def connect_cluster(registry_url: str, token: str, config: ClusterConfig | None = None,
                          data_dir: str | Path | None = None) -> Cluster:
    """The running cluster behind registry_url, its nodes reached over HTTP."""
    config = config or ClusterConfig()
    views = await fetch_nodes(registry_url, token)
    if not views:
        raise ClusterError(f"the registry at {registry_url} has no nodes yet: start some with "
                           f"`multicloud node --registry {registry_url}`")
    cluster = Cluster(config, [worker_from_view(v) for v in views], HttpComm(token),
                      topology=NetworkTopology(config),
                      data_dir=Path(data_dir) if data_dir is not None else None)
    cluster.registry_catalog = RegistryCatalog(registry_url, token)
    watcher = MembershipWatcher(cluster, registry_url, token,
                                config.service.heartbeat_interval_s)
    watcher.start()
    cluster.on_close(watcher.stop)
    return cluster
