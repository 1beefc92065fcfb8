"""The two kinds of cluster every failure and contract test runs on, and their helpers.

"inproc": the embedded cluster, nodes in this process behind `LocalComm`.
"http": the same nodes, each behind its own HTTP server on 127.0.0.1 (`HttpComm`).
"""

from __future__ import annotations

from pathlib import Path

from multicloud import Cluster, LocalComm, create_local_cluster
from multicloud.cluster.local import create_loopback_cluster
from multicloud.node.service import NodeService

KINDS = ["inproc", "http"]


async def make_cluster(kind: str, data_dir: Path, nodes_per_cloud: dict[str, int],
                       **overrides: object) -> Cluster:
    """A cluster of the given kind under data_dir."""
    if kind == "inproc":
        return create_local_cluster(data_dir, nodes_per_cloud, **overrides)  # type: ignore[arg-type]
    if kind == "http":
        return await create_loopback_cluster(data_dir, nodes_per_cloud, **overrides)  # type: ignore[arg-type]
    raise ValueError(kind)


def local_services(cluster: Cluster) -> dict[str, NodeService]:
    """The in-process nodes of an embedded cluster, by id."""
    channel = cluster.client.channel
    assert isinstance(channel, LocalComm)
    return dict(channel.services)


def temp_files(cluster: Cluster, node_id: str) -> list[str]:
    """Names in a node's chunk-store temp dir (the same layout for both kinds)."""
    assert cluster.data_dir is not None
    return sorted(p.name for p in (cluster.data_dir / "nodes" / node_id / "tmp").iterdir())
