"""The one replica writer: how distribution and repair have a node push a blob to another.

Each write runs under its link's adaptive timeout (RFC 6298, `pipeline.timeouts`): a
success feeds the estimator, a timeout backs it off. A write to a node that is marked
unhealthy while it runs is cancelled at once (and the cancellation reaches the node, which
removes what it had half-written) instead of waiting for its timeout. Every failure of
the target is a `ReplicaRefused` and counts toward marking the target unhealthy, except a
full disk, which keeps new replicas off that node for the rest of the run (placement
skips it); anything else raised is a failure of the source. A timeout is the target's:
the writer cannot tell a slow target from a slow source.
"""

from __future__ import annotations

import asyncio
import logging

from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core import clock
from multicloud.core.config import DistributionConfig
from multicloud.core.errors import (
    DiskFull,
    MulticloudError,
    NodeUnavailable,
    ReplicaRefused,
    TransferTimeout,
)
from multicloud.core.types import BlobInfo, NodeStatus, ReplicaAck
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.timeouts import AdaptiveTimeouts

log = logging.getLogger(__name__)


class ReplicaWriter:
    """Writes one replica at a time, with timeouts, failure accounting and cancellation."""

    def __init__(self, cluster: Cluster, config: DistributionConfig, metrics: PipelineMetrics,
                 timeouts: AdaptiveTimeouts | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.metrics = metrics
        self.timeouts = timeouts or AdaptiveTimeouts(config.timeouts)
        self._attempts: dict[str, set[asyncio.Task[ReplicaAck]]] = {}
        self._unsubscribe = cluster.subscribe(self._on_status_change)

    async def write(self, src: WorkerNode, dst: WorkerNode, blob: BlobInfo) -> ReplicaAck:
        """Have src push blob to dst; the ack once dst verified it and made it durable."""
        link = f"{src.location}->{dst.location}"
        timeout = self.timeouts.timeout(link, blob.blob_size)
        started = clock.monotonic()
        try:
            ack = await self._attempt(src, dst, blob, timeout)
        except ReplicaRefused as exc:
            self.metrics.replicas.failures += 1
            if isinstance(exc.cause, TransferTimeout):
                self.timeouts.backoff(link)
            if isinstance(exc.cause, DiskFull):
                dst.full = True  # still serves what it holds; takes nothing new for now
            else:
                self.cluster.record_failure(dst.id, self.config.failure_threshold, str(exc))
            raise
        except MulticloudError:  # the source failed
            self.metrics.replicas.failures += 1
            raise
        replicas = self.metrics.replicas
        replicas.writes += 1
        self.cluster.record_success(dst.id)
        dst.used_bytes += ack.blob_size
        if src.id != dst.id:
            elapsed = clock.monotonic() - started
            self.timeouts.observe(link, elapsed, blob.blob_size)
            replicas.link_latencies.setdefault(link, []).append(elapsed)
        return ack

    def close(self) -> None:
        """Stop listening to node health."""
        self._unsubscribe()

    async def _attempt(self, src: WorkerNode, dst: WorkerNode, blob: BlobInfo,
                       timeout: float) -> ReplicaAck:  # noqa: ASYNC109 - per-link, adaptive
        attempt = asyncio.create_task(self.cluster.client.replicate(src, dst, blob))
        inflight = self._attempts.setdefault(dst.id, set())
        inflight.add(attempt)
        try:
            async with asyncio.timeout(timeout):
                return await attempt
        except TimeoutError:
            if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                return attempt.result()  # it finished as the time ran out: keep the ack
            raise ReplicaRefused(dst.id, blob.chunk_id,
                                 TransferTimeout(src.id, dst.id, timeout)) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves
            raise ReplicaRefused(dst.id, blob.chunk_id, NodeUnavailable(
                dst.id, "marked unhealthy during the write")) from None
        finally:
            inflight.discard(attempt)
            if not attempt.done():
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)

    def _on_status_change(self, node: WorkerNode, old: NodeStatus, reason: str) -> None:
        if node.status is NodeStatus.UNHEALTHY:
            # Take the node out of service at once: its in-flight writes fail now and are
            # re-placed, instead of waiting for their timeouts.
            for attempt in list(self._attempts.get(node.id, ())):
                attempt.cancel()
