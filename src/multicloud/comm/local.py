"""The in-process carrier: every node lives in this process, a call awaits its handler.

Requests, replies and errors take the same shape they take over HTTP (metadata through
JSON, errors through their wire form), and cancelling a call cancels the node's handler,
so in-process nodes behave as HTTP nodes do, minus the sockets.
"""

from __future__ import annotations

from collections.abc import Mapping

from multicloud.comm.wire import copy_meta, internal_error, round_trip
from multicloud.core.errors import MulticloudError, NodeUnavailable, from_wire
from multicloud.core.messages import NodeAddress, Reply, Request
from multicloud.node.service import NodeService


class LocalComm:
    """Carries requests to the `NodeService`s of this process."""

    def __init__(self, services: Mapping[str, NodeService]) -> None:
        self.services = services  # filled by whoever builds the nodes, which need this comm

    async def call(self, target: NodeAddress, request: Request) -> Reply:
        """Hand request to target's handler and return its reply."""
        service = self.services.get(target.node_id)
        if service is None:
            raise NodeUnavailable(target.node_id, "no such node in this cluster")
        arriving = Request(request.op, copy_meta(request.meta), request.body, request.sender)
        try:
            reply = await service.handle(arriving)
        except MulticloudError as exc:
            raise round_trip(exc) from None
        except Exception as exc:
            raise from_wire(internal_error(target.node_id, exc)) from None
        return Reply(copy_meta(reply.meta), reply.body)

    async def close(self) -> None:
        """Nothing to release: the nodes are closed by whoever made them."""
