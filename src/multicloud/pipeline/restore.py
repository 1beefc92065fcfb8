"""Proving durability: rebuild a batch byte-exact from its replicas, and scrub replicas.

Restore fetches each chunk from one replica at a time (healthy nodes nearest the restorer
first), decodes it, and checks its SHA-256 against the chunk id; a missing or corrupt
replica is skipped for the next and reported. A file is assembled in a temp file beside
its destination, checked whole (size and chunk digest), fsynced and renamed into place,
so a failed file leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from multicloud.blob import decode_blob
from multicloud.comm.cluster import Cluster
from multicloud.core.errors import (
    ChunkNotFound,
    ClusterError,
    ConfigError,
    IntegrityError,
    RestoreError,
    StorageError,
)
from multicloud.core.network import Location
from multicloud.core.types import FileEntry, ReplicaProblem, RestoreReport, VerifyReport
from multicloud.pipeline.ingestion import file_digest
from multicloud.pipeline.manifest import ChunkRecord, Manifest

log = logging.getLogger(__name__)

_FILES_AT_ONCE = 4
_CHECKS_AT_ONCE = 16


class BatchRestorer:
    """Restores and verifies the batches recorded in a manifest."""

    def __init__(self, node_registry: Cluster, manifest: Manifest,
                 key: bytes | None = None, location: Location | None = None) -> None:
        self.registry = node_registry
        self.manifest = manifest
        self.key = key
        cloud = node_registry.config.default_source_cloud
        regions = node_registry.config.regions.get(cloud) or ["default"]
        self.location = location or Location(cloud, regions[0])

    async def restore(self, batch_id: str, dest_dir: str | Path) -> RestoreReport:
        """Rebuild every file of the batch under dest_dir; raise RestoreError if any fails."""
        batch = await asyncio.to_thread(self.manifest.batch, batch_id)
        if batch.status != "success":
            raise RestoreError(f"batch {batch_id!r} did not complete (status {batch.status}); "
                               f"run it again before restoring")
        files = await asyncio.to_thread(self.manifest.files, batch_id)
        records = await asyncio.to_thread(self.manifest.chunks, batch_id)
        by_file: dict[str, list[ChunkRecord]] = defaultdict(list)
        for record in records:
            by_file[record.path].append(record)
        replicas = await asyncio.to_thread(self.manifest.replicas,
                                           sorted({r.chunk_id for r in records}))
        dest = Path(dest_dir)
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        report = RestoreReport(batch_id)
        limit = asyncio.Semaphore(_FILES_AT_ONCE)

        async def one(entry: FileEntry) -> None:
            async with limit:
                await self._restore_file(entry, by_file.get(entry.path, []), replicas, dest,
                                         report)

        try:
            async with asyncio.TaskGroup() as group:
                for entry in files:
                    group.create_task(one(entry))
        except* ConfigError as group:  # e.g. no key: the same for every file, report it once
            raise group.exceptions[0] from None
        if report.failed_files:
            shown = ", ".join(sorted(report.failed_files)[:5])
            raise RestoreError(f"{len(report.failed_files)} file(s) of batch {batch_id!r} "
                               f"could not be restored from any replica: {shown}")
        return report

    async def _restore_file(self, entry: FileEntry, chunks: list[ChunkRecord],
                            replicas: dict[str, list[str]], dest: Path,
                            report: RestoreReport) -> None:
        target = _safe_join(dest, entry.path)
        fd, tmp = await asyncio.to_thread(_open_temp, target)
        try:
            ids = []
            for record in sorted(chunks, key=lambda r: r.index):
                raw = await self._fetch_chunk(record, replicas.get(record.chunk_id, []), report)
                if raw is None:
                    raise RestoreError(f"no good replica of chunk {record.index} of {entry.path}")
                await asyncio.to_thread(_write_at, fd, record.offset, raw)
                ids.append(record.chunk_id)
            if file_digest(ids) != entry.digest:
                raise RestoreError(f"{entry.path}: its chunks do not match the manifest's digest")
            await asyncio.to_thread(_commit_file, fd, tmp, target, entry.size)
        except RestoreError as exc:
            log.error("restore of %s failed: %s", entry.path, exc)
            report.failed_files.append(entry.path)
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            return
        except BaseException:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise
        finally:
            os.close(fd)
        report.files_restored += 1
        report.bytes_restored += entry.size

    async def _fetch_chunk(self, record: ChunkRecord, holders: list[str],
                           report: RestoreReport) -> bytes | None:
        for node_id in self._order(holders):
            node = self.registry.nodes.get(node_id)
            if node is None:
                continue
            try:
                blob = await self.registry.client.read(node, record.chunk_id, self.location)
                return await asyncio.to_thread(decode_blob, blob, self.key, record.chunk_id)
            except ChunkNotFound as exc:
                problem = ReplicaProblem(record.chunk_id, node_id, "missing", str(exc))
            except IntegrityError as exc:
                problem = ReplicaProblem(record.chunk_id, node_id, "corrupt", str(exc))
            except ConfigError:
                raise  # an encrypted blob without its key: no replica will do better
            except (ClusterError, StorageError) as exc:
                problem = ReplicaProblem(record.chunk_id, node_id, "unavailable", str(exc))
            log.warning("restore skipped %s replica of %s on %s", problem.problem,
                        record.chunk_id[:12], node_id)
            report.skipped_replicas.append(problem)
        return None

    def _order(self, holders: list[str]) -> list[str]:
        """Healthy holders first, nearest (same cloud, then same region) first."""
        def rank(node_id: str) -> tuple[int, int, int, str]:
            node = self.registry.nodes.get(node_id)
            if node is None:
                return (2, 2, 2, node_id)
            return (0 if node.healthy else 1, node.cloud != self.location.cloud,
                    node.region != self.location.region, node_id)
        return sorted(holders, key=rank)

    async def verify(self, batch_id: str) -> VerifyReport:
        """Scrub every replica of the batch in place; list missing, corrupt, unreachable."""
        await asyncio.to_thread(self.manifest.batch, batch_id)
        ids = await asyncio.to_thread(self.manifest.chunk_ids, batch_id)
        replicas = await asyncio.to_thread(self.manifest.replicas, ids)
        report = VerifyReport(batch_id, chunks=len(ids))
        limit = asyncio.Semaphore(_CHECKS_AT_ONCE)

        async def check(chunk_id: str, node_id: str) -> None:
            async with limit:
                problem = await self._check(chunk_id, node_id)
            report.replicas_checked += 1
            if problem is None:
                report.replicas_ok += 1
            else:
                report.problems.append(problem)

        async with asyncio.TaskGroup() as group:
            for chunk_id in ids:
                for node_id in replicas.get(chunk_id, []):
                    group.create_task(check(chunk_id, node_id))
        for chunk_id in ids:
            if not replicas.get(chunk_id):
                report.problems.append(ReplicaProblem(chunk_id, "-", "missing",
                                                      "no replica recorded"))
        report.problems.sort(key=lambda p: (p.chunk_id, p.node_id))
        return report

    async def _check(self, chunk_id: str, node_id: str) -> ReplicaProblem | None:
        node = self.registry.nodes.get(node_id)
        if node is None:
            return ReplicaProblem(chunk_id, node_id, "unavailable", "node is not in the cluster")
        try:
            state = await self.registry.client.check(node, chunk_id)
        except (ClusterError, StorageError) as exc:
            return ReplicaProblem(chunk_id, node_id, "unavailable", str(exc))
        if state == "ok":
            return None
        return ReplicaProblem(chunk_id, node_id, state)


def _open_temp(target: Path) -> tuple[int, Path]:
    """A temp file beside target, so the final rename stays on one file system."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    return fd, Path(name)


def _commit_file(fd: int, tmp: Path, target: Path, expected_size: int) -> None:
    """Check the size, make the file durable, and move it into place."""
    size = os.fstat(fd).st_size
    if size != expected_size:
        raise RestoreError(f"{target.name}: rebuilt {size} bytes, the manifest says "
                           f"{expected_size}")
    os.fsync(fd)
    os.replace(tmp, target)


def _write_at(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _safe_join(root: Path, rel_path: str) -> Path:
    """root/rel_path, refusing paths that would escape root."""
    target = Path(os.path.realpath(root / rel_path))
    if not target.is_relative_to(os.path.realpath(root)):
        raise RestoreError(f"manifest path {rel_path!r} escapes the destination; refusing")
    return target
