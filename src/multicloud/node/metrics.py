"""A node's Prometheus series, updated as things happen (nothing walks the disk to scrape).

Every node, in-process or behind HTTP, keeps its own registry; cluster mode serves it on
`GET /metrics`. Series (all `multicloud_node_`):

    info{node,cloud,region}                  gauge      always 1
    stored_chunks, stored_bytes              gauge      what the chunk store holds now
    disk_free_bytes                          gauge      room left for replicas
    bytes_received_total{peer_cloud}         counter    bodies received (chunks, replicas)
    bytes_sent_total{peer_cloud}             counter    bodies sent (pushes, reads)
    requests_total{route,status}             counter    status: ok or the error's wire code
    request_seconds{route}                   histogram
    fsync_seconds                            histogram  each fsync of a file or directory
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from multicloud.core.network import Location
from multicloud.node.stores import NodeStore

# From a loopback request on a small chunk to a slow cross-cloud push of a large one.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
FSYNC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class NodeMetrics:
    """The series of one node, in a registry of its own (several nodes share a process)."""

    def __init__(self, node_id: str, location: Location) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        Gauge("multicloud_node_info", "The node's id and place; always 1.",
              ["node", "cloud", "region"], registry=reg).labels(
                  node_id, location.cloud, location.region).set(1)
        self.stored_chunks = Gauge("multicloud_node_stored_chunks",
                                   "Chunks (replicas) the node's store holds.", registry=reg)
        self.stored_bytes = Gauge("multicloud_node_stored_bytes",
                                  "Bytes the node's store holds.", registry=reg)
        self.disk_free = Gauge("multicloud_node_disk_free_bytes",
                               "Bytes the node can still store.", registry=reg)
        self.received = Counter("multicloud_node_bytes_received",
                                "Bytes of chunk and replica bodies received, by sender cloud.",
                                ["peer_cloud"], registry=reg)
        self.sent = Counter("multicloud_node_bytes_sent",
                            "Bytes of replica and read bodies sent, by receiver cloud.",
                            ["peer_cloud"], registry=reg)
        self.requests = Counter("multicloud_node_requests",
                                "Requests served, by operation and outcome.",
                                ["route", "status"], registry=reg)
        self.request_seconds = Histogram("multicloud_node_request_seconds",
                                         "Seconds to serve a request, by operation.", ["route"],
                                         buckets=REQUEST_BUCKETS, registry=reg)
        self.fsync_seconds = Histogram("multicloud_node_fsync_seconds",
                                       "Seconds one fsync took.", buckets=FSYNC_BUCKETS,
                                       registry=reg)

    def watch_store(self, store: NodeStore) -> None:
        """Read the store's live figures at scrape time (they are kept as writes happen)."""
        self.stored_chunks.set_function(lambda: store.count)
        self.stored_bytes.set_function(lambda: store.bytes)
        self.disk_free.set_function(store.disk_free)

    def request(self, route: str, status: str, seconds: float) -> None:
        """Count one served request."""
        self.requests.labels(route, status).inc()
        self.request_seconds.labels(route).observe(seconds)
