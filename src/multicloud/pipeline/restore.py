"""Proving durability: rebuild a batch byte-exact from its replicas, and scrub replicas.

Restore fetches each chunk from one replica at a time (healthy nodes nearest the restorer
first), decodes it, and checks its SHA-256 against the chunk id; a missing or corrupt
replica is skipped for the next and reported. A file is assembled in a temp file beside
its destination, checked whole (size and chunk digest), given its recorded mode and
modification time, fsynced and renamed into place, so a failed file leaves nothing behind.

A symlink entry is recreated as a link (made under a temp name beside it, then renamed
over whatever is there, so it replaces atomically and is never followed); its target is
data and may point anywhere. Links are made after every regular file, and no file is ever
written through a symlink under the destination: a path whose parent is a link (restored
earlier or found there) is refused, like one that escapes the destination. Directories
are left as they are.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from multicloud.blob import decode_blob
from multicloud.cloud import ObjectStore
from multicloud.comm.cluster import Cluster
from multicloud.core.errors import (
    ChunkNotFound,
    CloudError,
    ClusterError,
    ConfigError,
    IntegrityError,
    RestoreError,
    StorageError,
)
from multicloud.core.network import Location
from multicloud.core.types import FileEntry, ReplicaProblem, RestoreReport, VerifyReport
from multicloud.core.units import display_path
from multicloud.pipeline.ingestion import file_digest
from multicloud.pipeline.manifest import ChunkRecord, Manifest

log = logging.getLogger(__name__)

_FILES_AT_ONCE = 4
_SINGLE_PUT_BYTES = 8 * 1024 * 1024  # larger files go up as multipart uploads
_CHECKS_AT_ONCE = 16


class BatchRestorer:
    """Restores and verifies the batches recorded in a manifest."""

    def __init__(self, node_registry: Cluster, manifest: Manifest,
                 key: bytes | None = None, location: Location | None = None,
                 replication_factor: int = 0) -> None:
        self.registry = node_registry
        self.manifest = manifest
        self.key = key
        # verify reports chunks with fewer verified replicas (0: any one will do)
        self.replication_factor = replication_factor
        cloud = node_registry.config.default_source_cloud
        regions = node_registry.config.regions.get(cloud) or ["default"]
        self.location = location or Location(cloud, regions[0])

    async def restore(self, batch_id: str, dest_dir: str | Path) -> RestoreReport:
        """Rebuild every file of the batch under dest_dir; raise RestoreError if any fails."""
        files, by_file, replicas = await self._plan(batch_id)
        dest = Path(dest_dir)
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        report = RestoreReport(batch_id)
        failures: dict[str, str] = {}  # path -> why, for the error message
        limit = asyncio.Semaphore(_FILES_AT_ONCE)

        async def one(entry: FileEntry) -> None:
            async with limit:
                await self._restore_file(entry, by_file.get(entry.path, []), replicas, dest,
                                         report, failures)

        try:
            async with asyncio.TaskGroup() as group:
                for entry in files:
                    if entry.kind != "symlink":
                        group.create_task(one(entry))
        except* ConfigError as group:  # e.g. no key: the same for every file, report it once
            raise group.exceptions[0] from None
        # Links last, one by one (cheap): a link made while files were still being written
        # could be a parent directory one of them then went through.
        for entry in files:
            if entry.kind == "symlink":
                await asyncio.to_thread(_restore_link, entry, dest, report, failures)
        _raise_failures(batch_id, report, failures)
        return report

    async def restore_to_store(self, batch_id: str, store: ObjectStore) -> RestoreReport:
        """Rebuild every file of the batch as an object under the store's prefix.

        Each object appears only once all of its chunks were fetched and verified and
        the file's digest matched: a big file streams up as a multipart upload that is
        aborted on any failure, a small one goes up in one PUT. Symlinks are not objects:
        they are listed in `skipped_links` (a folder restore recreates them), and the
        modes and times of files are not kept either.
        """
        files, by_file, replicas = await self._plan(batch_id)
        report = RestoreReport(batch_id)
        failures: dict[str, str] = {}
        limit = asyncio.Semaphore(_FILES_AT_ONCE)
        loop = asyncio.get_running_loop()
        # Uploads block their thread while it waits for chunks fetched on the loop, which
        # needs the default pool's threads to decode them: so uploads get their own.
        uploads = ThreadPoolExecutor(_FILES_AT_ONCE, thread_name_prefix="restore-upload")
        stopping = threading.Event()  # set when the restore ends: uploads take no more

        async def one(entry: FileEntry) -> None:
            chunks = sorted(by_file.get(entry.path, []), key=lambda r: r.index)

            def parts() -> Iterator[bytes]:  # on the upload's thread; fetches on the loop
                ids = []
                for record in chunks:
                    if stopping.is_set():  # the restore failed or was cancelled meanwhile
                        raise RestoreError(f"{display_path(entry.path)}: the restore stopped")
                    raw = asyncio.run_coroutine_threadsafe(
                        self._fetch_chunk(record, replicas.get(record.chunk_id, []), report),
                        loop).result()
                    if raw is None:
                        raise RestoreError(f"no good replica of chunk {record.index} of "
                                           f"{display_path(entry.path)}")
                    ids.append(record.chunk_id)
                    yield raw
                if file_digest(ids) != entry.digest:
                    raise RestoreError(f"{display_path(entry.path)}: its chunks do not match "
                                       f"the manifest's digest")

            async with limit:
                try:
                    key = _object_key(entry.path)
                    if entry.size <= _SINGLE_PUT_BYTES:
                        data = await loop.run_in_executor(uploads, b"".join, parts())
                        await loop.run_in_executor(uploads, store.put, key, data)
                    else:
                        await loop.run_in_executor(uploads, store.put_parts, key, parts())
                except (RestoreError, CloudError) as exc:
                    _failed(report, failures, entry.path, str(exc))
                    return
            report.files_restored += 1
            report.bytes_restored += entry.size

        try:
            async with asyncio.TaskGroup() as group:
                for entry in files:
                    if entry.kind == "symlink":
                        report.skipped_links.append(entry.path)
                    else:
                        group.create_task(one(entry))
        except* ConfigError as group:
            raise group.exceptions[0] from None
        finally:
            # Uploads still going (the restore failed or was cancelled) stop at their next
            # chunk, aborting their multipart upload; none outlives the restore.
            stopping.set()
            await asyncio.shield(asyncio.to_thread(uploads.shutdown, wait=True))
        _raise_failures(batch_id, report, failures)
        return report

    async def _plan(self, batch_id: str) -> tuple[list[FileEntry], dict[str, list[ChunkRecord]],
                                                  dict[str, list[str]]]:
        """A completed batch's files, their chunks by file, and each chunk's holders."""
        batch = await asyncio.to_thread(self.manifest.batch, batch_id)
        if batch.status != "success":
            raise RestoreError(f"batch {batch_id!r} did not complete (status {batch.state}); "
                               f"run it again before restoring")
        files = await asyncio.to_thread(self.manifest.files, batch_id)
        records = await asyncio.to_thread(self.manifest.chunks, batch_id)
        by_file: dict[str, list[ChunkRecord]] = defaultdict(list)
        for record in records:
            by_file[record.path].append(record)
        replicas = await asyncio.to_thread(self.manifest.replicas,
                                           sorted({r.chunk_id for r in records}))
        return files, by_file, replicas

    async def _restore_file(self, entry: FileEntry, chunks: list[ChunkRecord],
                            replicas: dict[str, list[str]], dest: Path,
                            report: RestoreReport, failures: dict[str, str]) -> None:
        try:
            target = _safe_join(dest, entry.path)
            fd, tmp = await asyncio.to_thread(_open_temp, dest, entry.path, target)
        except (RestoreError, OSError) as exc:  # OSError: a read-only or full destination
            _failed(report, failures, entry.path, _why(entry.path, exc))
            return
        try:
            ids = []
            for record in sorted(chunks, key=lambda r: r.index):
                raw = await self._fetch_chunk(record, replicas.get(record.chunk_id, []), report)
                if raw is None:
                    raise RestoreError(f"no good replica of chunk {record.index} of "
                                       f"{display_path(entry.path)}")
                await asyncio.to_thread(_write_at, fd, record.offset, raw)
                ids.append(record.chunk_id)
            if file_digest(ids) != entry.digest:
                raise RestoreError(f"{display_path(entry.path)}: its chunks do not match the "
                                   f"manifest's digest")
            await asyncio.to_thread(_commit_file, fd, tmp, target, entry)
        except (RestoreError, OSError) as exc:  # OSError: a directory in the way, a full disk
            _failed(report, failures, entry.path, _why(entry.path, exc))
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
        batch = await asyncio.to_thread(self.manifest.batch, batch_id)
        ids = await asyncio.to_thread(self.manifest.chunk_ids, batch_id)
        report = VerifyReport(batch_id, chunks=len(ids), status=batch.state)
        if batch.manifest_object:
            ids.append(batch.manifest_object)  # the batch's own manifest is data too
        replicas = await asyncio.to_thread(self.manifest.replicas, ids)
        limit = asyncio.Semaphore(_CHECKS_AT_ONCE)
        verified: dict[str, int] = dict.fromkeys(ids, 0)

        async def check(chunk_id: str, node_id: str) -> None:
            async with limit:
                problem = await self._check(chunk_id, node_id)
            report.replicas_checked += 1
            if problem is None:
                report.replicas_ok += 1
                verified[chunk_id] += 1
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
        wanted = self.replication_factor or 1
        report.under_replicated = sum(1 for count in verified.values() if count < wanted)
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


def _open_temp(dest: Path, rel_path: str, target: Path) -> tuple[int, Path]:
    """A temp file beside target, so the final rename stays on one file system."""
    _make_parent(dest, rel_path, target)
    # Not named after the file: a name near the 255-byte limit would not leave room.
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".multicloud-", suffix=".partial")
    return fd, Path(name)


def _make_parent(dest: Path, rel_path: str, target: Path) -> None:
    """Create target's directory, and check again that no link leads out of the way.

    `_safe_join` checked before; mkdir(exist_ok) follows a link that appeared since, so
    the check is repeated once the directories exist, before anything is created in them.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file where a directory of the path should be
        raise RestoreError(f"cannot create the directory of {display_path(rel_path)}: "
                           f"{exc.strerror}") from exc
    _safe_join(dest, rel_path)


def _commit_file(fd: int, tmp: Path, target: Path, entry: FileEntry) -> None:
    """Check the size, set mode and mtime, make the file durable, and move it into place."""
    size = os.fstat(fd).st_size
    if size != entry.size:
        raise RestoreError(f"{display_path(entry.path)}: rebuilt {size} bytes, the manifest "
                           f"says {entry.size}")
    # Through the descriptor, before the rename: the path may be replaced meanwhile, and
    # the file appears under its name complete, mode and time included.
    # setuid/setgid are dropped: ownership is not restored (the restorer owns every file),
    # and a set-id file owned by whoever restores (root, say) is a privilege nobody had.
    # cp -p and tar do the same when they cannot restore the owner.
    os.fchmod(fd, entry.mode & 0o1777)
    if entry.mtime_ns != 0:  # 0 is "unknown" (an older manifest); before 1970 is negative
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
    os.fsync(fd)
    os.replace(tmp, target)


def _raise_failures(batch_id: str, report: RestoreReport, failures: dict[str, str]) -> None:
    """RestoreError naming the first few files that failed, if any did."""
    if report.failed_files:
        shown = "; ".join(failures[p] for p in sorted(failures)[:5])
        raise RestoreError(f"{len(report.failed_files)} file(s) of batch {batch_id!r} "
                           f"could not be restored: {shown}")


def _object_key(path: str) -> str:
    """A file's path as an object key (UTF-8); RestoreError for a name that is not text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise RestoreError(f"{display_path(path)}: the name is not UTF-8, which object keys "
                           f"must be; restore to a folder instead") from None
    return path


def _why(path: str, exc: RestoreError | OSError) -> str:
    """What went wrong with a file, in one line (a RestoreError names the file itself)."""
    if isinstance(exc, RestoreError):
        return str(exc)
    return f"{display_path(path)}: {exc.strerror or exc}"


def _failed(report: RestoreReport, failures: dict[str, str], path: str, why: str) -> None:
    """Count path as failed, saying why in the log and in the final error."""
    log.error("restore of %s failed: %s", display_path(path), why)
    report.failed_files.append(path)
    failures[path] = why


def _restore_link(entry: FileEntry, dest: Path, report: RestoreReport,
                  failures: dict[str, str]) -> None:
    """Recreate a symlink entry under dest, replacing what is at its path atomically."""
    try:
        if entry.link_target is None:
            raise RestoreError(f"{display_path(entry.path)}: a symlink with no target in "
                               f"the manifest")
        target = _safe_join(dest, entry.path)
        _make_parent(dest, entry.path, target)
        tmp = _link_beside(entry.link_target, target)
        try:
            if entry.mtime_ns != 0 and os.utime in os.supports_follow_symlinks:
                os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
            os.replace(tmp, target)  # rename never follows: a link or file there is replaced
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except RestoreError as exc:
        _failed(report, failures, entry.path, str(exc))
        return
    except OSError as exc:  # e.g. a directory where the link goes
        _failed(report, failures, entry.path,
                f"{display_path(entry.path)}: cannot create the symlink: {exc.strerror}")
        return
    report.files_restored += 1


def _link_beside(link_target: str, target: Path) -> Path:
    """A new symlink to link_target under a free temp name in target's directory."""
    for attempt in range(100):
        tmp = target.parent / f".{target.name}.{os.getpid()}.{attempt}.link"
        try:
            os.symlink(link_target, tmp)
        except FileExistsError:
            continue  # a leftover of an interrupted restore, or another restorer's
        return tmp
    raise RestoreError(f"{display_path(target.name)}: no free temp name for the link in "
                       f"{display_path(str(target.parent))}")


def _write_at(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _safe_join(root: Path, rel_path: str) -> Path:
    """root/rel_path, refusing paths that escape root or go through a symlink under it.

    The path's last component is not resolved: what is there (a file, a link from an
    earlier restore) is replaced by rename, never written through.
    """
    real_root = Path(os.path.realpath(root))
    target = real_root / rel_path  # an absolute rel_path replaces the root: refused below
    parts = Path(rel_path).parts
    # realpath of the parent equals the parent as written exactly when no component of it
    # is a link, "..", or (for an absolute path) outside the root.
    if (not parts or ".." in parts or target.name in ("", ".", "..")
            or Path(os.path.realpath(target.parent)) != target.parent
            or not target.parent.is_relative_to(real_root)):
        raise RestoreError(f"manifest path {display_path(rel_path)!r} escapes the destination "
                           f"or goes through a symlink; refusing")
    return target
