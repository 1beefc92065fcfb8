"""What travels between the orchestrator and nodes, and between nodes: one request, one reply.

A request names an operation of the node service (`op`), carries JSON-ready metadata and,
for the operations that move data, a body of bytes. The sender's location rides along so
that the receiving node can tell which network the bytes crossed (a partition between two
clouds refuses them at the receiver). Every carrier, in-process or HTTP, moves exactly these
values and nothing else, which is what lets one contract suite hold them to the same
behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from multicloud.core.network import Location

Body = bytes | memoryview


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """How to reach a node: its id, its place, and (in cluster mode) its base URL."""

    node_id: str
    location: Location
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view, for a request that names another node (a push target)."""
        return {"id": self.node_id, "cloud": self.location.cloud,
                "region": self.location.region, "url": self.url}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> NodeAddress:
        """The address a `to_json` view describes."""
        return cls(str(raw["id"]), Location(str(raw["cloud"]), str(raw["region"])),
                   raw.get("url"))


@dataclass(frozen=True, slots=True)
class Request:
    """One operation for a node."""

    op: str  # a NodeService operation: "put", "push", "process", ...
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-ready arguments
    body: Body | None = None  # the bytes the operation moves, if any
    sender: Location | None = None  # where the request (and its body) comes from


@dataclass(frozen=True, slots=True)
class Reply:
    """What the node answers: JSON-ready results and, for reads, a body."""

    meta: dict[str, Any] = field(default_factory=dict)
    body: bytes | None = None


class Channel(Protocol):
    """Carries a request to a node and brings its reply back.

    Errors the node raises come back as the same `MulticloudError` class with the same
    message; a node that cannot be reached is `NodeUnavailable`. Cancelling `call` reaches
    the node's handler (it stops, and removes whatever it had half-written).
    """

    async def call(self, target: NodeAddress, request: Request) -> Reply:
        """Send request to target and wait for its reply."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
