"""The catalogue kept on the cluster: every committed batch's manifest, stored as data.

The SQLite manifest on the orchestrator's disk is a cache. When a batch completes, its
manifest (files, sizes, modes, mtimes, chunk ids, placement) is serialised, encoded like
any chunk (compressed, encrypted when the run encrypts) and written as a content-addressed
object to `replication_factor` nodes across `min_clouds` clouds, verified and durable
before the batch counts as done. A small entry naming that object goes to every healthy
node's catalog, so whoever reaches any node finds every batch. `recover` reads the
entries back, fetches each manifest from a replica, checks it, and rebuilds the cache,
taking replica locations from what the nodes hold now (repairs may have moved them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from multicloud.blob import TransformChain, decode_blob
from multicloud.blob.envelope import check_blob
from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core import clock
from multicloud.core.config import DistributionConfig, ProcessingConfig
from multicloud.core.errors import (
    ChunkNotFound,
    ClusterError,
    IntegrityError,
    MulticloudError,
    QuorumNotReached,
    StorageError,
)
from multicloud.core.messages import Body
from multicloud.core.network import Location
from multicloud.core.types import BlobInfo, Chunk
from multicloud.node.catalog import precedence
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.manifest_schema import BatchRecord
from multicloud.pipeline.placement import NetworkAwarePlacement, spread_short
from multicloud.pipeline.storage import ANY_NODE

log = logging.getLogger(__name__)

MANIFEST_FILE_NAME = ".multicloud-manifest.json"  # how a manifest object names itself


@dataclass
class RecoverReport:
    """What `recover` rebuilt."""

    batches: list[str] = field(default_factory=list)  # recovered, newest first
    deleted: list[str] = field(default_factory=list)  # tombstones honoured
    failed: dict[str, str] = field(default_factory=dict)  # batch id -> why
    # Of failed: every holder of the manifest answered, and none had it intact.
    lost: list[str] = field(default_factory=list)
    nodes_asked: int = 0
    nodes_answered: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"batches": self.batches, "deleted": self.deleted, "failed": self.failed,
                "nodes_asked": self.nodes_asked, "nodes_answered": self.nodes_answered}


class ManifestUnreadable(StorageError):
    """No holder of a batch manifest gave an intact copy; `lost` when every holder was
    reached and none had one (rather than some being down or cut off)."""

    def __init__(self, message: str, *, lost: bool) -> None:
        super().__init__(message)
        self.lost = lost


def _intact(blob: bytes, chunk_id: str) -> bool:
    """Whether a blob's envelope (header, digest, id) checks out, key or no key."""
    try:
        check_blob(blob, chunk_id)
    except MulticloudError:
        return False
    return True


def _when(entry: dict[str, Any]) -> float:
    """An entry's creation time for ordering (0 when it has none a number can be made of)."""
    try:
        return float(entry.get("created_at", 0))
    except (TypeError, ValueError):
        return 0.0


class Catalogue:
    """Publishes batch manifests to the nodes and rebuilds the local cache from them."""

    def __init__(self, cluster: Cluster, manifest: Manifest, distribution: DistributionConfig,
                 processing: ProcessingConfig, key: bytes | None = None) -> None:
        self.cluster = cluster
        self.manifest = manifest
        self.distribution = distribution
        self.processing = processing
        self.key = key
        self.placement = NetworkAwarePlacement(cluster, None, distribution)
        self.location = self._location(cluster.config.default_source_cloud)

    def _location(self, cloud: str) -> Location:
        regions = self.cluster.config.regions.get(cloud) or ["default"]
        return Location(cloud, regions[0])

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, batch_id: str, result: dict[str, Any]) -> str:
        """Store the batch's manifest on the nodes; its object id. QuorumNotReached when
        fewer than write_quorum nodes took it."""
        data = await asyncio.to_thread(self.manifest.export_batch, batch_id, "success", result)
        raw = json.dumps(data, sort_keys=True).encode()
        blob, info = await asyncio.to_thread(self._encode, raw)
        record = await asyncio.to_thread(self.manifest.batch, batch_id)
        holders = await self._store(info, blob, record.source_cloud)
        await asyncio.to_thread(self._record_object, batch_id, info, holders)
        entry = {"batch_id": batch_id, "status": "success", "manifest_object": info.chunk_id,
                 "blob": info.to_json(), "holders": holders, "source": record.source,
                 "created_at": record.created_at, "updated_at": clock.wall()}
        await self._announce(entry)
        return info.chunk_id

    async def publish_missing(self) -> list[str]:
        """Publish the completed batches this cache has no manifest object for (recorded
        before manifests were stored on the nodes); their ids."""
        records = await asyncio.to_thread(self.manifest.batches)
        missing = [r for r in records if r.status == "success" and not r.manifest_object]
        for record in missing:
            await self.publish(record.batch_id, record.result or {
                "status": "success", "batch_id": record.batch_id})
        return [r.batch_id for r in missing]

    async def forget(self, batch_id: str) -> int:
        """Leave a tombstone for a deleted batch on every healthy node; nodes told."""
        return await self._announce({"batch_id": batch_id, "status": "deleted",
                                     "updated_at": clock.wall()})

    def _encode(self, raw: bytes) -> tuple[memoryview, BlobInfo]:
        chunk_id = hashlib.sha256(raw).hexdigest()
        chunk = Chunk(chunk_id=chunk_id, file=MANIFEST_FILE_NAME, index=0, offset=0,
                      size_bytes=len(raw), source_cloud=self.location.cloud)
        return TransformChain(self.processing, self.key).apply(chunk, raw)

    async def _store(self, info: BlobInfo, blob: Body, cloud: str) -> list[str]:
        healthy = self.cluster.healthy_nodes(cloud) or self.cluster.healthy_nodes()
        if not healthy:
            raise QuorumNotReached(f"no healthy node to store the manifest of chunk "
                                   f"{info.chunk_id[:12]} on")
        wanted = min(self.distribution.replication_factor, len(self.cluster.healthy_nodes()))
        targets = self.placement.select_target_nodes(info.chunk_id, healthy[0].id, wanted,
                                                     size_bytes=info.blob_size)
        # Sent from the batch's source cloud, where the run's plan and records live.
        origin = self._location(cloud)
        # A target that fails is replaced by the next healthy node, as a chunk's is: one
        # node down must not fail a batch whose every chunk committed.
        spare = [n.id for n in self.cluster.healthy_nodes() if n.id not in targets]
        holders: list[str] = []
        tried: list[str] = []
        batch = list(targets)
        while batch:
            tried += batch
            results = await asyncio.gather(
                *(self.cluster.client.write(self.cluster.get(t), info, blob, origin)
                  for t in batch), return_exceptions=True)
            for target, outcome in zip(batch, results, strict=True):
                if isinstance(outcome, MulticloudError):
                    log.warning("batch manifest %s not stored on %s: %s", info.chunk_id[:12],
                                target, outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    holders.append(target)
            short = wanted - len(holders)
            batch, spare = spare[:short], spare[short:]
        targets = tried
        if len(holders) < self.distribution.write_quorum:
            raise QuorumNotReached(
                f"the batch manifest reached {len(holders)} of {len(targets)} nodes, "
                f"write_quorum is {self.distribution.write_quorum}; bring nodes back and "
                f"run the same command again")
        return sorted(holders)

    def _record_object(self, batch_id: str, info: BlobInfo, holders: list[str]) -> None:
        self.manifest.add_blob(info)
        self.manifest.add_replicas([(info.chunk_id, h) for h in holders])
        self.manifest.set_manifest_object(batch_id, info.chunk_id)
        if self._short(holders):
            # Too few nodes or clouds up for a full set: a node that comes back gets a copy.
            self.manifest.add_hints([(info.chunk_id, ANY_NODE)])

    def _short(self, holders: list[str]) -> bool:
        """Below the replication factor, or the cloud spread while a cloud is away."""
        return (len(holders) < self.distribution.replication_factor
                or spread_short({self.cluster.get(h).cloud for h in holders},
                                set(self.cluster.clouds(healthy_only=False)),
                                self.distribution))

    async def _announce(self, entry: dict[str, Any]) -> int:
        nodes = self.cluster.healthy_nodes()
        results = await asyncio.gather(*(self.cluster.client.catalog_put(n, entry)
                                         for n in nodes), return_exceptions=True)
        told = 0
        for node, outcome in zip(nodes, results, strict=True):
            if isinstance(outcome, MulticloudError):
                log.warning("node %s did not record batch %s: %s", node.id,
                            entry["batch_id"], outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                told += 1
        if self.cluster.registry_catalog is not None:
            try:
                await self.cluster.registry_catalog.put(entry)
            except MulticloudError as exc:  # the nodes have it; the next publish retries
                log.warning("the registry did not record batch %s: %s", entry["batch_id"], exc)
        if not told:
            raise ClusterError(f"no node recorded batch {entry['batch_id']!r} in its catalog; "
                               f"bring nodes back and run the same command again")
        return told

    # -- recovering -----------------------------------------------------------------------

    async def entries(self, report: RecoverReport | None = None) -> dict[str, dict[str, Any]]:
        """The newest entry of every batch the reachable nodes know, tombstones included."""
        nodes = self.cluster.healthy_nodes()
        results: list[list[dict[str, Any]] | BaseException] = list(await asyncio.gather(
            *(self.cluster.client.catalog_list(n) for n in nodes), return_exceptions=True))
        sources: list[str] = [n.id for n in nodes]
        if self.cluster.registry_catalog is not None:
            try:
                results.append(await self.cluster.registry_catalog.entries())
                sources.append("the registry")
            except MulticloudError as exc:
                log.warning("the registry did not list its catalog: %s", exc)
        newest: dict[str, dict[str, Any]] = {}
        answered = 0
        for node, outcome in zip(sources, results, strict=True):
            if isinstance(outcome, MulticloudError):
                log.warning("%s did not list its catalog: %s", node, outcome)
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            answered += 1
            for entry in outcome:
                batch_id = entry.get("batch_id")
                if not isinstance(batch_id, str):
                    continue
                if batch_id not in newest or precedence(entry) > precedence(newest[batch_id]):
                    newest[batch_id] = entry
        if report is not None:
            report.nodes_asked, report.nodes_answered = len(sources), answered
        if nodes and not answered:
            raise ClusterError("no node answered with its catalog; check the cluster "
                               "(`multicloud cluster status`) and try again")
        return newest

    async def recover(self, only: str | None = None, *,
                      missing_only: bool = False) -> RecoverReport:
        """Rebuild the cache from the nodes (every batch, or only the one named); with
        missing_only, only the batches this cache does not hold (tombstones are honoured
        either way), so a record here newer than the catalogue's is not replaced."""
        report = RecoverReport()
        entries = await self.entries(report)
        if only is not None:
            entries = {k: v for k, v in entries.items() if k == only}
        if missing_only:
            held = {r.batch_id for r in await asyncio.to_thread(self.manifest.batches)}
            entries = {k: v for k, v in entries.items()
                       if k not in held or v.get("status") == "deleted"}
        if not entries:
            return report
        inventories = await self._inventories()
        # A manifest no holder had intact is lost only if every node could be asked: one
        # that is down may hold the copy a repair moved there.
        everyone = len(inventories) == len(self.cluster.nodes)
        for batch_id, entry in sorted(entries.items(), key=lambda kv: _when(kv[1])):
            if entry.get("status") == "deleted":
                report.deleted.append(batch_id)
                await asyncio.to_thread(self._drop_local, batch_id)
                continue
            try:
                await self._recover_one(entry, inventories)
            except (KeyError, TypeError, ValueError) as exc:  # a damaged catalogue entry
                report.failed[batch_id] = f"its catalogue entry is damaged ({exc!r})"
                log.error("batch %s could not be recovered: %s", batch_id,
                          report.failed[batch_id])
                continue
            except MulticloudError as exc:
                report.failed[batch_id] = str(exc)
                if isinstance(exc, ManifestUnreadable) and exc.lost and everyone:
                    report.lost.append(batch_id)
                log.error("batch %s could not be recovered: %s", batch_id, exc)
                continue
            report.batches.insert(0, batch_id)
        return report

    async def drop_if_deleted(self, batch_id: str) -> bool:
        """Whether the nodes' newest entry for batch_id is a tombstone; if so, this cache's
        record of it goes too (a delete raced the recovery that brought it back)."""
        entry = (await self.entries()).get(batch_id)
        if entry is None or entry.get("status") != "deleted":
            return False
        await asyncio.to_thread(self._drop_local, batch_id)
        return True

    async def recover_everything(self) -> RecoverReport:
        """Publish what only this cache knows, then recover every batch the cluster knows;
        ClusterError when any could not be read or a node did not list its catalog.

        What gc needs before it deletes: an object is unreferenced only if no batch
        anywhere refers to it, and batches from before manifests were stored on the nodes
        must be on them before another machine's gc looks.
        """
        await self.publish_missing()
        report = await self.recover()
        await self.republish_unreadable(report)
        if report.failed or report.nodes_answered < report.nodes_asked:
            unread = ", ".join(f"{b} ({why})" for b, why in sorted(report.failed.items()))
            lost = " ".join(f"`multicloud delete {b}`" for b in sorted(report.lost))
            raise ClusterError(
                "gc needs every batch the cluster knows, and "
                + (f"could not read {unread}" if unread else
                   f"only {report.nodes_answered} of {report.nodes_asked} nodes listed "
                   f"their catalog")
                + "; nothing was deleted: bring the nodes back (or give this machine the "
                  "encryption key) and run gc again"
                + (f"; a manifest corrupt or gone on every node that held it cannot come "
                   f"back: give its batch up with {lost}" if lost else ""))
        return report

    async def republish_unreadable(self, report: RecoverReport) -> list[str]:
        """Publish again, from this cache, the completed batches it knows whose manifest
        object is lost (every holder answered, none had it intact: bit rot or loss on all
        of them): a new object, the old one left for gc. A manifest whose holders are only
        unreachable is not lost, and stays failed. They leave report.failed; their ids."""
        records = {r.batch_id: r for r in await asyncio.to_thread(self.manifest.batches)}
        again = await self.publish_again([records[b] for b in sorted(report.lost)
                                          if b in records and records[b].status == "success"])
        for batch_id in again:
            del report.failed[batch_id]
            report.lost.remove(batch_id)
        return again

    async def publish_again(self, records: list[BatchRecord]) -> list[str]:
        """Publish these completed batches' manifests again from this cache (their old
        objects are lost); the ids published. One that cannot be (too few nodes now) is
        logged and skipped, so it does not hold up the rest."""
        done = []
        for record in records:
            try:
                await self.publish(record.batch_id, record.result or {
                    "status": "success", "batch_id": record.batch_id})
            except MulticloudError as exc:
                log.warning("could not publish batch %s's manifest again: %s",
                            record.batch_id, exc)
                continue
            done.append(record.batch_id)
            log.warning("published batch %s's manifest again: no node had it intact",
                        record.batch_id)
        return done

    async def _recover_one(self, entry: dict[str, Any],
                           inventories: dict[str, set[str]]) -> None:
        info = BlobInfo.from_json(entry["blob"])
        holders = [h for h in entry.get("holders", []) if h in self.cluster.nodes]
        holders += sorted(n for n, ids in inventories.items()
                          if info.chunk_id in ids and n not in holders)
        data = await self._fetch(info, holders)
        batch_id = await asyncio.to_thread(self.manifest.import_batch, data, info.chunk_id)
        # Replicas are where they are now: repairs since the batch ran may have moved them.
        ids = {c[4] for c in data["chunks"]} | {info.chunk_id}
        pairs = [(c, n) for n, held in inventories.items() for c in ids & held]
        await asyncio.to_thread(self._replace_replicas, ids, pairs, info, set(inventories))
        log.info("recovered batch %s from manifest %s", batch_id, info.chunk_id[:12])

    def _replace_replicas(self, ids: set[str], pairs: list[tuple[str, str]],
                          info: BlobInfo, listed: set[str]) -> None:
        # Only the nodes that listed their objects are known not to hold the others.
        known = self.manifest.replicas(sorted(ids))
        self.manifest.remove_replicas([(c, n) for c, nodes in known.items() for n in nodes
                                       if n in listed])
        self.manifest.add_blob(info)
        self.manifest.add_replicas(pairs)

    def _drop_local(self, batch_id: str) -> None:
        # Not in this cache, or a live run holds it: nothing to undo.
        with contextlib.suppress(MulticloudError):
            self.manifest.delete_batch(batch_id)

    async def _fetch(self, info: BlobInfo, holders: list[str]) -> dict[str, Any]:
        """The manifest behind info, from the first holder with an intact copy."""
        problems = []
        unreachable = not holders
        for node_id in holders:
            node = self.cluster.nodes.get(node_id)
            if node is None or not node.healthy:
                unreachable = True
                continue
            blob: bytes | None = None
            try:
                blob = await self.cluster.client.read(node, info.chunk_id, self.location)
                raw = await asyncio.to_thread(decode_blob, blob, self.key, info.chunk_id)
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise StorageError("not a JSON object")
                return data
            except IntegrityError as exc:
                problems.append(f"{node_id}: {exc}")
                # An envelope that checks out failed only to decode (this machine lacks
                # the key, say): the copy is intact, so the manifest is not lost.
                if blob is not None and _intact(blob, info.chunk_id):
                    unreachable = True
            except (ChunkNotFound, ValueError) as exc:
                problems.append(f"{node_id}: {exc}")
            except (ClusterError, StorageError) as exc:
                unreachable = True
                problems.append(f"{node_id}: {exc}")
        raise ManifestUnreadable(f"no replica of manifest {info.chunk_id[:12]} could be read "
                                 f"({'; '.join(problems) or 'no healthy holder'})",
                                 lost=not unreachable)

    async def _inventories(self) -> dict[str, set[str]]:
        nodes: list[WorkerNode] = self.cluster.healthy_nodes()
        results = await asyncio.gather(*(self.cluster.client.inventory(n) for n in nodes),
                                       return_exceptions=True)
        found = {}
        for node, outcome in zip(nodes, results, strict=True):
            if isinstance(outcome, MulticloudError):
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            found[node.id] = set(outcome)
        return found
