"""Network-aware replica placement: HDFS rack awareness with clouds as racks.

Replicas prefer the source cloud (no egress, low latency) but span at least `min_clouds`
clouds so that a whole cloud can fail. Within a tier, nodes are ranked by weighted
rendezvous (highest-random-weight) hashing on the chunk id: the same chunk lands on the same
nodes on a re-run, and losing a node moves only the chunks it held. Weights are the
nodes' capacities (static, so that placement stays stable while nodes fill); a node
without room for the chunk (or whose disk said it is full this run) is skipped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

from multicloud.control.registry import NodeRegistry, WorkerNode
from multicloud.core.config import DistributionConfig
from multicloud.core.errors import ClusterError, InsufficientNodes
from multicloud.core.network import NetworkTopology

_TWO_64 = float(2**64)


def rendezvous_score(chunk_id: str, node: WorkerNode) -> float:
    """Weighted HRW score: weight / -ln(u), with u uniform in (0, 1) from a hash."""
    digest = hashlib.blake2b(f"{chunk_id}/{node.id}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 0.5) / _TWO_64
    return node.capacity_bytes / -math.log(unit)


def rank_nodes(chunk_id: str, nodes: Iterable[WorkerNode]) -> list[WorkerNode]:
    """Nodes in rendezvous order for this chunk, best first."""
    return sorted(nodes, key=lambda n: (-rendezvous_score(chunk_id, n), n.id))


class NetworkAwarePlacement:
    """Chooses the nodes that hold a chunk's replicas."""

    def __init__(self, node_registry: NodeRegistry,
                 network_topology: NetworkTopology | None = None,
                 config: DistributionConfig | dict[str, Any] | None = None) -> None:
        self.registry = node_registry
        self.topology = network_topology or node_registry.topology
        if isinstance(config, dict):
            config = DistributionConfig.model_validate(config)
        self.config = config or DistributionConfig()

    def source_cloud_of(self, source: str) -> str:
        """The cloud of a node id, or the cloud itself when given a cloud name."""
        node = self.registry.nodes.get(source)
        if node is not None:
            return node.cloud
        known_clouds = {*self.registry.clouds(healthy_only=False), *self.topology.config.clouds}
        if source in known_clouds:
            return source
        raise ClusterError(f"unknown source {source!r}: give a node id "
                           f"({', '.join(sorted(self.registry.nodes))}) or a cloud name")

    def select_target_nodes(self, chunk_id: str, source_node: str,
                            num_replicas: int | None = None, *,
                            force_cross_cloud: bool = False, exclude: Iterable[str] = (),
                            size_bytes: int = 0) -> list[str]:
        """The ids of the nodes that should hold the chunk's replicas, best first."""
        wanted = num_replicas if num_replicas is not None else self.config.replication_factor
        src_cloud = self.source_cloud_of(source_node)
        excluded = set(exclude)
        candidates = [n for n in self.registry.healthy_nodes()
                      if n.id not in excluded and has_room(n, size_bytes)]
        if len(candidates) < wanted:
            full = sorted(n.id for n in self.registry.healthy_nodes() if n.full)
            why = (f"; disk full on {', '.join(full)}: free some space or add nodes, and run "
                   f"the batch again" if full else
                   "; start more nodes or lower replication_factor")
            raise InsufficientNodes(
                f"placement needs {wanted} healthy nodes with room, only {len(candidates)} "
                f"available ({', '.join(n.id for n in candidates) or 'none'}){why}"
            )
        by_cloud: dict[str, list[WorkerNode]] = {}
        for node in rank_nodes(chunk_id, candidates):
            by_cloud.setdefault(node.cloud, []).append(node)

        need_clouds = min(max(self.config.min_clouds, 2 if force_cross_cloud else 1), wanted)
        if len(by_cloud) < need_clouds:
            raise InsufficientNodes(
                f"placement needs replicas in {need_clouds} clouds, healthy nodes span "
                f"{len(by_cloud)} ({', '.join(sorted(by_cloud)) or 'none'}); start nodes in "
                f"another cloud or lower min_clouds"
            )
        others = self.topology.cloud_preference(src_cloud, list(by_cloud))

        # First one node from the source cloud and from each nearest other cloud the
        # policy needs, then fill by preference: the source cloud, then nearer clouds.
        selected: list[WorkerNode] = []
        spread = ([src_cloud] if src_cloud in by_cloud else []) + others
        for cloud in spread[:need_clouds]:
            selected.append(by_cloud[cloud][0])
        for cloud in spread:
            for node in by_cloud[cloud]:
                if len(selected) >= wanted:
                    break
                if node not in selected:
                    selected.append(node)
        return [n.id for n in selected[:wanted]]

    def replacement(self, chunk_id: str, source_node: str, current: list[str],
                    failed: Iterable[str], *, force_cross_cloud: bool = False,
                    size_bytes: int = 0) -> str | None:
        """A node to take over from failed targets, keeping the cloud spread; None if none."""
        try:
            targets = self.select_target_nodes(
                chunk_id, source_node, len(current) + 1, force_cross_cloud=force_cross_cloud,
                exclude=set(failed), size_bytes=size_bytes)
        except InsufficientNodes:
            try:
                targets = self.select_target_nodes(
                    chunk_id, source_node, 1, exclude=set(failed) | set(current),
                    size_bytes=size_bytes)
            except InsufficientNodes:
                return None
        for node_id in targets:
            if node_id not in current:
                return node_id
        return None


def has_room(node: WorkerNode, size_bytes: int) -> bool:
    """Room for a chunk: not a disk that said it is full, and capacity left."""
    return not node.full and node.used_bytes + size_bytes <= node.capacity_bytes


def check_policy(registry: NodeRegistry, config: DistributionConfig,
                 force_cross_cloud: bool = False) -> None:
    """Raise InsufficientNodes unless the healthy nodes can hold a batch under the policy."""
    healthy = registry.healthy_nodes()
    clouds = {n.cloud for n in healthy}
    need_clouds = max(config.min_clouds, 2 if force_cross_cloud else 1)
    if len(healthy) < config.replication_factor:
        raise InsufficientNodes(
            f"replication_factor is {config.replication_factor} but only {len(healthy)} "
            f"healthy node(s) are up; start more nodes or lower replication_factor")
    if len(clouds) < need_clouds:
        why = "force_cross_cloud" if force_cross_cloud and config.min_clouds < 2 else \
            f"min_clouds is {config.min_clouds}"
        raise InsufficientNodes(
            f"{why} but healthy nodes span {len(clouds)} cloud(s) "
            f"({', '.join(sorted(clouds)) or 'none'}); add nodes in another cloud or "
            f"lower min_clouds")
