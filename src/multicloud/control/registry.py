"""The node registry: cluster membership and health as the control plane sees it.

It holds no connection to the nodes: `multicloud.comm.cluster.Cluster` adds that. What it
knows comes from the orchestrator's own transfers (failures counted to a threshold), from
an operator (`node.status = "unhealthy"`) and, in cluster mode, from the registry
service's heartbeats (mirrored by `multicloud.control.membership`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from multicloud.core import clock
from multicloud.core.config import ClusterConfig, NodeSpec
from multicloud.core.errors import ClusterError
from multicloud.core.messages import NodeAddress
from multicloud.core.network import Location, NetworkTopology
from multicloud.core.types import NodeStatus

log = logging.getLogger(__name__)

GIB = 1024**3

StatusListener = Callable[["WorkerNode", NodeStatus, str], None]


class WorkerNode:
    """A node's identity, place and health; assigning `status` notifies the registry."""

    def __init__(self, spec: NodeSpec, url: str | None = None) -> None:
        self.id = spec.id
        self.cloud = spec.cloud
        self.region = spec.region
        self.capacity_bytes = int(spec.capacity_gb * GIB)
        self.url = url  # set in cluster mode
        self.spec = spec
        self.consecutive_failures = 0
        self.used_bytes = 0  # bytes of replicas the manifest records on this node
        self.full = False  # its disk said no room for a write: no new replicas for now
        self.unhealthy_since: float | None = None  # clock.monotonic() of the last failure
        self._status = NodeStatus.HEALTHY
        self._registry: NodeRegistry | None = None

    @property
    def location(self) -> Location:
        """The node's cloud and region."""
        return Location(self.cloud, self.region)

    @property
    def address(self) -> NodeAddress:
        """How to reach the node."""
        return NodeAddress(self.id, self.location, self.url)

    @property
    def status(self) -> NodeStatus:
        """"healthy" or "unhealthy" (a str enum, so plain strings compare equal)."""
        return self._status

    @status.setter
    def status(self, value: NodeStatus | str) -> None:
        self.set_status(value, reason="set by operator")

    @property
    def healthy(self) -> bool:
        """Whether the node is in service."""
        return self._status is NodeStatus.HEALTHY

    def set_status(self, value: NodeStatus | str, reason: str) -> None:
        """Change health and tell the registry's listeners, with a reason for the logs."""
        try:
            new = NodeStatus(value)
        except ValueError:
            valid = ", ".join(s.value for s in NodeStatus)
            raise ClusterError(f"invalid node status {value!r}: use one of {valid}") from None
        old, self._status = self._status, new
        if new is NodeStatus.HEALTHY:
            self.consecutive_failures = 0
            self.unhealthy_since = None
        elif old is not new:
            self.unhealthy_since = clock.monotonic()
        if old is not new and self._registry is not None:
            self._registry.notify(self, old, reason)

    def __repr__(self) -> str:
        return f"WorkerNode({self.id!r}, {self.cloud}/{self.region}, {self._status.value})"


class NodeRegistry:
    """All nodes of a cluster, their health, and the network between them."""

    def __init__(self, config: ClusterConfig, nodes: list[WorkerNode],
                 topology: NetworkTopology | None = None,
                 data_dir: Path | None = None) -> None:
        self.config = config
        self.data_dir = data_dir  # where the manifest lives
        self.topology = topology or NetworkTopology(config)
        self.nodes: dict[str, WorkerNode] = {}  # add nodes with add(), not by assignment
        # The nodes in id order, sorted again only after add(): placement asks for the
        # healthy nodes for every chunk, and with a thousand nodes the sort cost ten times
        # what the health filter does.
        self._in_id_order: list[WorkerNode] | None = None
        self._listeners: list[StatusListener] = []
        for node in nodes:
            self.add(node)

    def add(self, node: WorkerNode) -> None:
        """Register a node."""
        node._registry = self
        self.nodes[node.id] = node
        self._in_id_order = None

    def get(self, node_id: str) -> WorkerNode:
        """The node with this id."""
        try:
            return self.nodes[node_id]
        except KeyError:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise ClusterError(f"unknown node {node_id!r} (known: {known})") from None

    def healthy_nodes(self, cloud: str | None = None) -> list[WorkerNode]:
        """Nodes in service, optionally of one cloud, in id order."""
        healthy = NodeStatus.HEALTHY
        return [n for n in self._ordered()
                if n._status is healthy and (cloud is None or n.cloud == cloud)]

    def _ordered(self) -> list[WorkerNode]:
        """Every node, healthy or not, in id order (the cached list: do not change it)."""
        ordered = self._in_id_order
        # The length check also catches a node put into `nodes` without add().
        if ordered is None or len(ordered) != len(self.nodes):
            ordered = self._in_id_order = [n for _, n in sorted(self.nodes.items())]
        return ordered

    def clouds(self, healthy_only: bool = True) -> list[str]:
        """Clouds that have (healthy) nodes."""
        return sorted({n.cloud for n in self.nodes.values() if n.healthy or not healthy_only})

    def subscribe(self, listener: StatusListener) -> Callable[[], None]:
        """Call listener(node, old_status, reason) on every health change; returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def notify(self, node: WorkerNode, old: NodeStatus, reason: str) -> None:
        """Tell listeners that a node's health changed."""
        log.info("node %s: %s -> %s (%s)", node.id, old.value, node.status.value, reason)
        for listener in list(self._listeners):
            try:
                listener(node, old, reason)
            except Exception:  # a broken watcher must not stop the others, nor the caller
                log.exception("status listener %r failed on %s", listener, node.id)

    def record_failure(self, node_id: str, threshold: int, reason: str) -> bool:
        """Count a failed transfer to a node; mark it unhealthy at threshold. True if it was."""
        node = self.nodes.get(node_id)
        if node is None or not node.healthy:
            return False
        node.consecutive_failures += 1
        if node.consecutive_failures >= threshold:
            node.set_status(NodeStatus.UNHEALTHY,
                            f"{node.consecutive_failures} failed transfers, last: {reason}")
            return True
        return False

    def record_success(self, node_id: str) -> None:
        """A transfer to the node worked: its failure streak ends."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.consecutive_failures = 0
