"""Keeping the cluster at exactly its replication factor: scrub-and-repair, and gc.

`repair_chunks` checks every recorded replica of the chunks asked for (each node scrubs its
copy in place), forgets the missing and corrupt ones (a corrupt object is deleted, so the
node can take a good copy), and then has the `Repairer` bring each chunk back to
`replication_factor` from the replicas that verified: what Cassandra's repair and HDFS's
block scanner do, on demand or on a schedule.

`collect_garbage` removes objects no recorded batch references (a deleted batch's, those
a cancelled write left behind; an unfinished batch keeps its committed chunks for its
resume), and trims replicas above the replication factor. While a run is live, an object
younger than the grace period is never taken (the run may not have recorded it yet); with
no run in progress every unreferenced object goes at once. Each delete is conditional on the
object's age *on the node*, so a run that writes an object again while gc works keeps it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core.config import DistributionConfig
from multicloud.core.errors import ClusterError, MulticloudError, StorageError
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.placement import NetworkAwarePlacement
from multicloud.pipeline.repair import Repairer
from multicloud.pipeline.storage import StorageManager

log = logging.getLogger(__name__)

_CHECKS_AT_ONCE = 16
GC_GRACE_S = 3600.0  # while a run is live, objects younger than this are kept


@dataclass
class MaintenanceReport:
    """What a repair or a gc pass found and did."""

    chunks: int = 0
    replicas_checked: int = 0
    missing: int = 0  # recorded replicas a node no longer held
    corrupt: int = 0  # replicas that failed their checksum (deleted)
    unavailable: int = 0  # replicas on nodes that could not be asked
    replicas_created: int = 0
    under_replicated: int = 0  # chunks still below the replication factor
    lost: int = 0  # chunks with no verified replica anywhere
    objects_freed: int = 0  # gc: unreferenced objects removed
    replicas_trimmed: int = 0  # gc: replicas above the replication factor removed
    bytes_freed: int = 0
    dry_run: bool = False
    details: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dataclasses.asdict(self)

    def add(self, other: MaintenanceReport) -> None:
        """Count another repair pass's findings in this one (a pass done in steps)."""
        for name in ("chunks", "replicas_checked", "missing", "corrupt", "unavailable",
                     "replicas_created", "under_replicated", "lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.details.extend(other.details)


async def repair_chunks(cluster: Cluster, storage: StorageManager, repairer: Repairer,
                        chunk_ids: Iterable[str]) -> MaintenanceReport:
    """Scrub every recorded replica of chunk_ids, drop the bad ones, re-replicate to RF."""
    manifest = storage.manifest
    ids = sorted(set(chunk_ids))
    holders = await asyncio.to_thread(manifest.replicas, ids)
    report = MaintenanceReport(chunks=len(ids))
    limit = asyncio.Semaphore(_CHECKS_AT_ONCE)
    bad: list[tuple[str, str]] = []

    async def check(chunk_id: str, node: WorkerNode) -> None:
        async with limit:
            try:
                state = await cluster.client.check(node, chunk_id)
            except (ClusterError, StorageError) as exc:
                report.unavailable += 1
                report.details.append({"chunk_id": chunk_id, "node_id": node.id,
                                       "problem": "unavailable", "detail": str(exc)})
                return
            report.replicas_checked += 1
            if state == "ok":
                return
            bad.append((chunk_id, node.id))
            report.details.append({"chunk_id": chunk_id, "node_id": node.id, "problem": state})
            if state == "corrupt":
                report.corrupt += 1
                try:  # a rotten copy is not a replica: make room for a good one
                    await cluster.client.delete(node, chunk_id)
                except MulticloudError as exc:
                    log.warning("could not delete corrupt %s on %s: %s", chunk_id[:12],
                                node.id, exc)
            else:
                report.missing += 1

    async with asyncio.TaskGroup() as group:
        for chunk_id in ids:
            for node_id in holders.get(chunk_id, []):
                node = cluster.nodes.get(node_id)
                if node is None or not node.healthy:
                    report.unavailable += 1
                    continue
                group.create_task(check(chunk_id, node))
    await asyncio.to_thread(manifest.remove_replicas, bad)
    repaired = await repairer.repair(ids)
    await storage.flush()
    report.replicas_created = repaired.replicas_created
    report.under_replicated = repaired.under_replicated
    report.lost = repaired.lost
    return report


async def collect_garbage(cluster: Cluster, manifest: Manifest, config: DistributionConfig,
                          *, dry_run: bool = False, grace_s: float = GC_GRACE_S,
                          assume_live_run: bool = False) -> MaintenanceReport:
    """Remove unreferenced objects and replicas above RF from every healthy node.

    ``assume_live_run``: keep the grace period even when no run here holds a lease (a
    cluster's runs may hold theirs on other machines)."""
    referenced, live_run = await asyncio.to_thread(manifest.referenced_chunk_ids)
    live_run = live_run or assume_live_run
    # With no run live, nothing unrecorded is in flight: an unreferenced object goes now.
    cutoff = time.time() - (grace_s if live_run else 0.0)
    report = MaintenanceReport(dry_run=dry_run)
    nodes = cluster.healthy_nodes()
    listed = await asyncio.gather(*(cluster.client.objects(n) for n in nodes),
                                  return_exceptions=True)
    held: dict[str, list[tuple[WorkerNode, int, float]]] = {}
    for node, outcome in zip(nodes, listed, strict=True):
        if isinstance(outcome, MulticloudError):
            log.warning("gc skips node %s: %s", node.id, outcome)
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        for chunk_id, size, mtime in outcome:
            held.setdefault(chunk_id, []).append((node, size, mtime))
    report.chunks = len(held)
    deletions: list[tuple[WorkerNode, str, int, str]] = []
    placement = NetworkAwarePlacement(cluster, None, config)
    over = sorted(c for c, copies in held.items()
                  if c in referenced and len(copies) > config.replication_factor)
    recorded = await asyncio.to_thread(manifest.replicas, over)
    kept: list[tuple[str, str]] = []
    for chunk_id, copies in sorted(held.items()):
        if chunk_id not in referenced:
            deletions += [(node, chunk_id, size, "orphan") for node, size, mtime in copies
                          if mtime < cutoff]
            continue
        if chunk_id not in recorded:
            continue  # at or under the replication factor
        keep, extra = await _trim(cluster, chunk_id, [n for n, _, _ in copies],
                                  set(recorded[chunk_id]), config, placement)
        kept += [(chunk_id, n.id) for n in keep]
        sizes = {n.id: size for n, size, _ in copies}
        deletions += [(node, chunk_id, sizes[node.id], "extra") for node in extra]
    if not dry_run:
        # The copies kept are replicas (each scrubbed clean), recorded before any other
        # copy of their chunk goes.
        await asyncio.to_thread(manifest.add_replicas, kept)
    gone: list[str] = []
    trimmed: list[tuple[str, str]] = []
    for node, chunk_id, size, why in deletions:
        if not dry_run:
            try:
                # Conditional on age: a run that just wrote it again keeps it.
                if not await cluster.client.delete(node, chunk_id,
                                                   older_than=cutoff if why == "orphan"
                                                   else None):
                    continue
            except MulticloudError as exc:
                log.warning("gc could not delete %s on %s: %s", chunk_id[:12], node.id, exc)
                continue
        report.bytes_freed += size
        if why == "orphan":
            report.objects_freed += 1
            gone.append(chunk_id)
        else:
            report.replicas_trimmed += 1
            trimmed.append((chunk_id, node.id))
    if not dry_run:
        await asyncio.to_thread(manifest.remove_replicas, trimmed)
        await asyncio.to_thread(manifest.forget_chunks, sorted(set(gone)))
    return report


async def _trim(cluster: Cluster, chunk_id: str, holders: list[WorkerNode],
                recorded: set[str], config: DistributionConfig,
                placement: NetworkAwarePlacement) -> tuple[list[WorkerNode], list[WorkerNode]]:
    """(the copies to keep, the copies beyond replication_factor) of an over-replicated
    chunk. Recorded replicas are preferred to unrecorded ones; within each, one per cloud
    first (up to min_clouds), then the placement's order. Every copy kept scrubs clean
    first, recorded or not: a replica verified when it was written may have rotted since,
    and keeping it would trim away a good copy in its place."""
    by_id = {n.id: n for n in holders}
    try:
        others = [n.id for n in placement.registry.healthy_nodes() if n.id not in by_id]
        preferred = placement.select_target_nodes(chunk_id, holders[0].id, len(holders),
                                                  exclude=others)
    except MulticloudError:
        preferred = sorted(by_id)
    order = [by_id[i] for i in preferred if i in by_id]
    order += [n for n in holders if n not in order]
    order.sort(key=lambda n: n.id not in recorded)  # stable: recorded first
    keep: list[WorkerNode] = []
    rejected: list[WorkerNode] = []

    unknown: list[WorkerNode] = []  # could not be checked: never deleted

    async def good(node: WorkerNode) -> bool:
        try:
            return await cluster.client.check(node, chunk_id) == "ok"
        except MulticloudError:
            unknown.append(node)
            return False

    for spread in (True, False):
        for node in order:
            if len(keep) >= config.replication_factor:
                break
            if node in keep or node in rejected:
                continue
            clouds = {k.cloud for k in keep}
            if spread and (node.cloud in clouds or len(clouds) >= config.min_clouds):
                continue
            if await good(node):
                keep.append(node)
            else:
                rejected.append(node)
    # A copy that failed its scrub goes; one never looked at goes only once RF good copies
    # are kept (it is a true extra); one that could not be asked stays.
    whole = len(keep) >= config.replication_factor
    return keep, [n for n in holders if n not in keep and n not in unknown
                  and (n in rejected or whole)]
