"""Network-aware replica placement: HDFS rack awareness with clouds as racks.

Replicas prefer the source cloud (no egress, low latency) but span at least `min_clouds`
clouds so that a whole cloud can fail. Within a tier, nodes are ranked by weighted
rendezvous (highest-random-weight) hashing on the chunk id: the same chunk lands on the same
nodes on a re-run, and losing a node moves only the chunks it held. Weights are the
nodes' capacities (static, so that placement stays stable while nodes fill); a node
without room for the chunk (or whose disk said it is full this run) is skipped.

A decision hashes the chunk id with every candidate node (that is what rendezvous hashing
is), but ranks only the few best of each cloud: at most `num_replicas` nodes can come from
one cloud, so sorting a thousand-node cluster per chunk would be wasted work.

Fewer healthy nodes than `replication_factor`, or fewer clouds than `min_clouds`, is not
an error: placement returns as many targets as there are, spread over as many clouds as
there are, and only fails below `write_quorum` targets (a quorum write commits with
what it gets; storage keeps a hint for each replica short of the factor, and repair
makes it up once a node comes back or joins). `force_cross_cloud` is the one exception:
the batch asked for a second cloud in so many words, so it is never relaxed.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from multicloud.control.registry import NodeRegistry, WorkerNode
from multicloud.core.config import DistributionConfig
from multicloud.core.errors import ClusterError, InsufficientNodes
from multicloud.core.network import NetworkTopology

log = logging.getLogger(__name__)

_TWO_64 = float(2**64)


def rendezvous_score(chunk_id: str, node: WorkerNode) -> float:
    """Weighted HRW score: weight / -ln(u), with u uniform in (0, 1) from a hash."""
    digest = hashlib.blake2b(f"{chunk_id}/{node.id}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 0.5) / _TWO_64
    return node.capacity_bytes / -math.log(unit)


def rendezvous_scores(chunk_id: str, nodes: Sequence[WorkerNode]) -> list[float]:
    """rendezvous_score of each node, in order: the same numbers, computed faster."""
    # The chunk id is absorbed once and the hash state copied for each node: blake2b of
    # "<chunk_id>/" then "<node_id>" is the digest of the whole string, bit for bit, so no
    # placement changes. Unpacking the digests in one call is int.from_bytes(.., "big")
    # of each; the arithmetic is rendezvous_score's, in the same order.
    copy = hashlib.blake2b(f"{chunk_id}/".encode(), digest_size=8).copy
    digests = []
    for node in nodes:
        state = copy()
        state.update(node.id.encode())
        digests.append(state.digest())
    words = struct.unpack(f">{len(digests)}Q", b"".join(digests))
    log_ = math.log
    return [node.capacity_bytes / -log_((word + 0.5) / _TWO_64)
            for node, word in zip(nodes, words, strict=True)]


def rank_nodes(chunk_id: str, nodes: Iterable[WorkerNode]) -> list[WorkerNode]:
    """Nodes in rendezvous order for this chunk, best first."""
    listed = list(nodes)
    scores = rendezvous_scores(chunk_id, listed)
    order = sorted(range(len(listed)), key=lambda i: (-scores[i], listed[i].id))
    return [listed[i] for i in order]


def best_by_cloud(chunk_id: str, nodes: Sequence[WorkerNode],
                  per_cloud: int) -> dict[str, list[WorkerNode]]:
    """Each cloud's first per_cloud nodes of `rank_nodes(chunk_id, nodes)`, in that order.

    A selection of k replicas never takes more than k nodes from one cloud, so it needs
    no more of the ranking than this: O(nodes) a decision where a full sort is
    O(nodes log nodes).
    """
    scores = rendezvous_scores(chunk_id, nodes)
    groups: dict[str, list[tuple[float, str, int]]] = {}
    for i, node in enumerate(nodes):
        groups.setdefault(node.cloud, []).append((-scores[i], node.id, i))
    # nsmallest is sorted(...)[:k] (the same ties, broken by node id), without the sort.
    return {cloud: [nodes[i] for _, _, i in heapq.nsmallest(per_cloud, entries)]
            for cloud, entries in groups.items()}


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
                            num_replicas: int | None = None, *, at_least: int | None = None,
                            force_cross_cloud: bool = False, exclude: Iterable[str] = (),
                            size_bytes: int = 0) -> list[str]:
        """The ids of the nodes that should hold the chunk's replicas, best first.

        Up to num_replicas (default replication_factor) targets, fewer when fewer healthy
        nodes with room are left, but never fewer than at_least (default write_quorum):
        below that InsufficientNodes says how many there are and what to do.
        """
        wanted = num_replicas if num_replicas is not None else self.config.replication_factor
        floor = min(wanted, at_least if at_least is not None else self.config.write_quorum)
        src_cloud = self.source_cloud_of(source_node)
        excluded = set(exclude)
        candidates = [n for n in self.registry.healthy_nodes()
                      if n.id not in excluded and has_room(n, size_bytes)]
        if len(candidates) < floor:
            full = sorted(n.id for n in self.registry.healthy_nodes() if n.full)
            why = (f"; disk full on {', '.join(full)}: free some space or add nodes, and run "
                   f"the batch again" if full else
                   "; start more nodes or lower write_quorum")
            quorum = (f" (write_quorum {self.config.write_quorum} of replication_factor "
                      f"{self.config.replication_factor})" if at_least is None else "")
            raise InsufficientNodes(
                f"placement needs {floor} healthy nodes with room{quorum}, only "
                f"{len(candidates)} available "
                f"({', '.join(n.id for n in candidates) or 'none'}){why}"
            )
        # Each cloud's best `wanted` nodes in rendezvous order: no more can be chosen
        # from one cloud (see the fill below).
        by_cloud = best_by_cloud(chunk_id, candidates, wanted)

        if force_cross_cloud and wanted > 1 and len(by_cloud) < 2:
            raise InsufficientNodes(
                f"placement needs replicas in 2 clouds (force_cross_cloud), healthy nodes "
                f"span {len(by_cloud)} ({', '.join(sorted(by_cloud)) or 'none'}); start nodes "
                f"in another cloud or run the batch without force_cross_cloud"
            )
        # min_clouds is what to aim for; with fewer clouds up, spread over all there are
        # rather than stop the batch (the replicas stay where they are once clouds return).
        want_clouds = min(max(self.config.min_clouds, 2 if force_cross_cloud else 1), wanted)
        need_clouds = min(want_clouds, len(by_cloud))
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
        excluded = set(failed)
        try:
            targets = self.select_target_nodes(
                chunk_id, source_node, len(current) + 1, at_least=1,
                force_cross_cloud=force_cross_cloud, exclude=excluded, size_bytes=size_bytes)
        except InsufficientNodes:  # force_cross_cloud with one cloud left
            src_cloud = self.registry.get(source_node).cloud
            if all(self.registry.get(n).cloud == src_cloud
                   for n in current if n not in excluded):
                return None  # the failed target was the other cloud: never relaxed
            targets = []
        for node_id in targets:
            if node_id not in current:
                return node_id
        # The spread kept the current targets: any other node with room will do.
        try:
            rest = self.select_target_nodes(chunk_id, source_node, 1, at_least=1,
                                            exclude=excluded | set(current),
                                            size_bytes=size_bytes)
        except InsufficientNodes:
            return None
        return rest[0] if rest else None


def spread_short(held: set[str], known: set[str], config: DistributionConfig) -> bool:
    """Whether replicas in the clouds held fall short of the cloud spread, while a cloud
    the cluster has nodes in (known) could make it up once it is back or has room.

    With no other cloud known, min_clouds cannot be met by any node coming back: not short,
    or a hint for it would never be replayed away.
    """
    want = min(config.min_clouds, config.replication_factor)
    return len(held) < want and bool(known - held)


def has_room(node: WorkerNode, size_bytes: int) -> bool:
    """Room for a chunk: not a disk that said it is full, and capacity left."""
    return not node.full and node.used_bytes + size_bytes <= node.capacity_bytes


def check_policy(registry: NodeRegistry, config: DistributionConfig,
                 force_cross_cloud: bool = False) -> None:
    """Raise InsufficientNodes unless the healthy nodes can take a batch at write quorum.

    Fewer than replication_factor nodes, or fewer clouds than min_clouds, only warns: the
    batch runs with the replicas it can write (see the module docstring).
    """
    healthy = registry.healthy_nodes()
    clouds = {n.cloud for n in healthy}
    if len(healthy) < config.write_quorum:
        raise InsufficientNodes(
            f"replication_factor is {config.replication_factor} (write_quorum "
            f"{config.write_quorum}) but only {len(healthy)} healthy node(s) are up "
            f"({', '.join(n.id for n in healthy) or 'none'}); start more nodes or lower "
            f"write_quorum")
    if force_cross_cloud and config.replication_factor > 1 and len(clouds) < 2:
        raise InsufficientNodes(
            f"force_cross_cloud but healthy nodes span {len(clouds)} cloud(s) "
            f"({', '.join(sorted(clouds)) or 'none'}); add nodes in another cloud or run "
            f"the batch without force_cross_cloud")
    if len(healthy) < config.replication_factor:
        log.warning("only %d healthy node(s) for replication_factor %d: chunks are written "
                    "at quorum (%d) and hinted until a node comes back or joins",
                    len(healthy), config.replication_factor, config.write_quorum)
    if len(clouds) < config.min_clouds:
        log.warning("healthy nodes span %d cloud(s) (%s), min_clouds is %d: replicas are "
                    "spread over the clouds that are up", len(clouds),
                    ", ".join(sorted(clouds)) or "none", config.min_clouds)
