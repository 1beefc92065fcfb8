"""Anti-entropy for cluster mode: the registry process repairs every batch on a schedule.

Like Cassandra's scheduled repair or HDFS's block scanner, a pass reads the batch catalogue
from the nodes, scrubs every replica of every completed batch at a bounded rate, replaces
the missing and corrupt ones and brings each chunk back to its replication factor. A node
that comes back or joins starts a pass at once, which is how the replicas a quorum write
had to leave out (hinted handoff) reach their node without a rerun.

It keeps its own catalogue cache (`<data_dir>/anti-entropy/`), so it never shares a cache
with an orchestrator that runs on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from multicloud.cluster.remote import connect_cluster
from multicloud.control.membership import fetch_nodes
from multicloud.core.config import PipelineConfig
from multicloud.core.errors import MulticloudError
from multicloud.core.types import NodeStatus
from multicloud.pipeline.maintenance import MaintenanceReport, repair_chunks
from multicloud.run.orchestrator import PipelineOrchestrator

log = logging.getLogger(__name__)

_SLICE = 64  # chunks per repair step; the rate limit sleeps between steps


class AntiEntropy:
    """Scheduled repair passes over the cluster behind a registry URL."""

    def __init__(self, registry_url: str, token: str, config: PipelineConfig,
                 data_dir: str | Path) -> None:
        self.registry_url = registry_url
        self.token = token
        self.config = config
        self.data_dir = Path(data_dir) / "anti-entropy"
        self.passes = 0
        self.last: MaintenanceReport | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Start a pass now (a node came back or joined)."""
        self._wake.set()

    async def run_forever(self) -> None:
        """Pass, wait for the interval (or a node coming back), pass again; until cancelled."""
        if self.config.storage.anti_entropy_interval_s <= 0:
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_nodes())
            group.create_task(self._passes())

    async def _passes(self) -> None:
        interval = self.config.storage.anti_entropy_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.pass_once()
            except MulticloudError as exc:  # no nodes yet, a registry restart: next time
                log.warning("anti-entropy pass skipped: %s", exc)
            except Exception:  # a bug in one pass must not stop the registry's repairs
                log.exception("anti-entropy pass failed; the next one runs on schedule")

    async def _watch_nodes(self) -> None:
        """Wake a pass when a node turns healthy or joins: replicas are owed to it."""
        seen: set[str] | None = None
        while True:
            try:
                views = await fetch_nodes(self.registry_url, self.token)
            except MulticloudError:
                views = None
            if views is not None:
                healthy = {str(v.get("id")) for v in views
                           if v.get("status") == NodeStatus.HEALTHY.value}
                if seen is not None and healthy - seen:
                    log.info("node(s) %s back or new: anti-entropy pass now",
                             ", ".join(sorted(healthy - seen)))
                    self.wake()
                seen = healthy
            await asyncio.sleep(self.config.cluster.service.heartbeat_interval_s)

    async def pass_once(self) -> MaintenanceReport:
        """One pass over every completed batch; what it found and did."""
        cluster = await connect_cluster(self.registry_url, self.token, self.config.cluster,
                                        data_dir=self.data_dir)
        orchestrator = PipelineOrchestrator(cluster, config=self.config)
        try:
            await orchestrator.catalogue().recover()
            ids = await orchestrator.chunk_ids_of(None)
            total = MaintenanceReport()
            rate = self.config.storage.anti_entropy_chunks_per_s
            for start in range(0, len(ids), _SLICE):
                step = ids[start:start + _SLICE]
                began = time.monotonic()
                report = await repair_chunks(cluster, orchestrator.storage_manager,
                                             orchestrator.repairer, step)
                total.add(report)
                await asyncio.sleep(max(0.0, len(step) / rate - (time.monotonic() - began)))
        finally:
            await orchestrator.close()
            await cluster.close()
        self.passes += 1
        self.last = total
        log.info("anti-entropy pass %d: %d chunks, %d replicas created, %d missing, "
                 "%d corrupt, %d under-replicated", self.passes, total.chunks,
                 total.replicas_created, total.missing, total.corrupt, total.under_replicated)
        return total

