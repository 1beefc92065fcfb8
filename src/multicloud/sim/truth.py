"""What is really on the nodes' disks, read past every fault: the ground truth.

The invariants compare what the system claims (the manifest, verify's report, a
restore) with this census, which reads every node's chunk store directly from its
directory, without opening it (an embedded node's or a running node process's alike),
and scrubs each object the way a node does before it serves one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from multicloud.blob.envelope import check_blob
from multicloud.core.errors import IntegrityError
from multicloud.node.store import ChunkStore

__all__ = ["Census", "take_census"]


@dataclass
class Census:
    """Every stored object: chunk id -> node id -> "ok" or "corrupt"."""

    replicas: dict[str, dict[str, str]] = field(default_factory=dict)

    def good(self, chunk_id: str) -> set[str]:
        """The nodes holding a verified copy of chunk_id."""
        return {n for n, state in self.replicas.get(chunk_id, {}).items() if state == "ok"}

    def state(self, chunk_id: str, node_id: str) -> str:
        """"ok", "corrupt" or "missing"."""
        return self.replicas.get(chunk_id, {}).get(node_id, "missing")

    def on_node(self, node_id: str) -> list[str]:
        """The ids of the objects node_id stores, sorted."""
        return sorted(c for c, holders in self.replicas.items() if node_id in holders)

    def objects(self) -> set[str]:
        """Every object id stored anywhere."""
        return set(self.replicas)


def take_census(stores: Mapping[str, Path]) -> Census:
    """Read and scrub every object of every node's store directory (a node that is down
    keeps its disk, so its objects count)."""
    census = Census()
    for node_id in sorted(stores):
        root = stores[node_id]
        for chunk_id in sorted(ChunkStore.objects_in(root)):
            try:
                blob = ChunkStore.object_path(root, chunk_id).read_bytes()
            except FileNotFoundError:  # gone between the listing and the read
                continue
            try:
                check_blob(blob, chunk_id)
                state = "ok"
            except IntegrityError:
                state = "corrupt"
            census.replicas.setdefault(chunk_id, {})[node_id] = state
    return census
