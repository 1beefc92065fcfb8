"""Serving Prometheus metrics: the pieces every server of the product shares.

Nodes, the registry and the orchestrator each keep a private `CollectorRegistry` (several
nodes can share a process) and answer `GET /metrics` with `metrics_response`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # aiohttp loads only where a server runs
    from aiohttp import web


class CallbackCollector(Collector):
    """A collector that calls a function at scrape time (for series easiest written as one)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        """The metrics, as of now."""
        return self._collect()


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """A `/metrics` reply: registry rendered in the Prometheus text format 0.0.4."""
    from aiohttp import web

    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
                                 "X-Content-Type-Options": "nosniff"})
