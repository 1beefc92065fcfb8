"""Proving durability: rebuild a batch byte-exact from its replicas, and scrub replicas.

Restore fetches each chunk from one replica at a time (healthy nodes nearest the restorer
first), decodes it, and checks its SHA-256 against the chunk id; a missing or corrupt
replica is skipped for the next and reported. Only the chunks the restored files name are
read, and a chunk several of them share (a pack of small files, or identical content) is
fetched and decoded once: it is kept while a file still needs it and dropped when its last
one has its piece. Files are worked through so that those sharing a chunk come together,
and a few chunks are fetched ahead of the small files that need them.

A file is assembled in a temp file beside its destination, checked whole (size and
digest) and given its recorded mode and modification time; it appears under its name only
complete and durable, so a failed file leaves nothing behind. Files of up to 8 MiB are
committed in groups, one worker-thread call a group: their temp files are written without
an fsync each, made durable at once (syncfs(2) on their file system), renamed into place,
and the renames made durable the same way. A larger file is written chunk by chunk,
fsynced alone and renamed. The writing is in `restore_files`.

A symlink entry is recreated as a link (made under a temp name beside it, then renamed
over whatever is there, so it replaces atomically and is never followed); its target is
data and may point anywhere. Links are made after every regular file, and no file is ever
written through a symlink under the destination: a path whose parent is a link (restored
earlier or found there) is refused, like one that escapes the destination. Directories
are left as they are.

Verify scrubs each replica of the batch's distinct chunks where it lies: its cost follows
the chunks, not the files (a pack of thousands of files is one chunk to check).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Collection, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
from multicloud.pipeline.manifest import ChunkRecord, Manifest
from multicloud.pipeline.restore_files import (
    GROUP_FILE_BYTES,
    Outcome,
    Pieces,
    check_digest,
    commit_group,
    describe,
    restore_link,
    take_piece,
    write_large,
)

log = logging.getLogger(__name__)

_FILES_AT_ONCE = 4  # large files written, or objects uploaded, at once
_FETCHES_AHEAD = 4  # chunks fetched before the small files that need them come up
_GROUP_FILES = 4096  # small files made durable together...
_GROUP_BYTES = 16 * 1024 * 1024  # ...and the most of their bytes held while they are written
_GROUPS_AT_ONCE = 2  # groups written at once (file creation is the kernel's CPU work)
_SINGLE_PUT_BYTES = 8 * 1024 * 1024  # larger files go up as multipart uploads
_CHECKS_AT_ONCE = 16

Fetch = Callable[[str], Coroutine[Any, Any, bytes | None]]


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

    async def restore(self, batch_id: str, dest_dir: str | Path,
                      paths: Collection[str] | None = None) -> RestoreReport:
        """Rebuild every file of the batch (or those named in paths) under dest_dir;
        raise RestoreError if any fails."""
        report = RestoreReport(batch_id)
        files, by_file, chunks = await self._plan(batch_id, paths, report)
        dest = Path(dest_dir)
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        failures: dict[str, str] = {}  # path -> why, for the error message
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(_FILES_AT_ONCE)
        # Writers block their thread on chunks fetched on the loop, which needs the default
        # pool's threads to decode them: so writers get their own (and groups theirs).
        writers = ThreadPoolExecutor(_FILES_AT_ONCE + _GROUPS_AT_ONCE,
                                     thread_name_prefix="restore-write")
        stopping = threading.Event()  # set when the restore ends: writers leave off and clean up
        regular = [entry for entry in files if entry.kind != "symlink"]
        small = [entry for entry in regular if entry.size <= GROUP_FILE_BYTES]

        async def large(entry: FileEntry) -> None:
            records = by_file.get(entry.path, [])
            taken = 0  # how many of records the writer took from the shared chunks

            def take(chunk_id: str) -> bytes | None:  # on the writer's thread
                nonlocal taken
                taken += 1  # a take uses the chunk up even when it fails
                return asyncio.run_coroutine_threadsafe(chunks.take(chunk_id), loop).result()

            async with limit:
                try:
                    await loop.run_in_executor(writers, write_large, dest, entry, records, take,
                                               stopping)
                except (RestoreError, IntegrityError, OSError) as exc:
                    _failed(report, failures, entry.path, describe(entry.path, exc))
                    return
                finally:
                    chunks.drop_rest(records[taken:])
            report.files_restored += 1
            report.bytes_restored += entry.size

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._restore_small(small, by_file, chunks, dest, writers,
                                                      stopping, report, failures))
                for entry in regular:
                    if entry.size > GROUP_FILE_BYTES:
                        group.create_task(large(entry))
        except* ConfigError as errors:  # e.g. no key: the same for every file, report it once
            raise errors.exceptions[0] from None
        finally:
            # Writers still going (the restore failed or was cancelled) stop at their next
            # file or chunk and remove their temp files; none outlives the restore.
            stopping.set()
            await chunks.aclose()
            await asyncio.shield(asyncio.to_thread(writers.shutdown, wait=True))
        # Links last, one by one (cheap): a link made while files were still being written
        # could be a parent directory one of them then went through.
        for entry in files:
            if entry.kind == "symlink":
                why = await asyncio.to_thread(restore_link, entry, dest)
                if why is None:
                    report.files_restored += 1
                else:
                    _failed(report, failures, entry.path, why)
        _raise_failures(batch_id, report, failures)
        return report

    async def _restore_small(self, files: list[FileEntry],
                             by_file: dict[str, list[ChunkRecord]], chunks: SharedChunks,
                             dest: Path, writers: ThreadPoolExecutor, stopping: threading.Event,
                             report: RestoreReport, failures: dict[str, str]) -> None:
        """Restore files of up to 8 MiB in groups, each written and made durable at once.

        The loop gathers a group's bytes (its chunks fetched ahead) while worker threads
        write the groups before it, two at a time: at most three groups are held.
        """
        loop = asyncio.get_running_loop()
        writing: deque[asyncio.Future[list[Outcome]]] = deque()  # oldest first

        async def hand_over(group: list[tuple[FileEntry, Pieces]]) -> None:
            if len(writing) >= _GROUPS_AT_ONCE:
                _tally(report, failures, await writing.popleft())
            writing.append(loop.run_in_executor(writers, commit_group, dest, group, stopping))

        order = [r.chunk_id for entry in files for r in by_file.get(entry.path, [])]
        # Not in a TaskGroup of its own: a ConfigError must reach restore() unwrapped.
        ahead = asyncio.create_task(chunks.prefetch(order))
        try:
            group: list[tuple[FileEntry, Pieces]] = []
            held = 0
            for entry in files:
                try:
                    pieces = await _gather(entry, by_file.get(entry.path, []), chunks)
                except (RestoreError, IntegrityError) as exc:
                    _failed(report, failures, entry.path, str(exc))
                    continue
                group.append((entry, pieces))
                held += entry.size
                if len(group) >= _GROUP_FILES or held >= _GROUP_BYTES:
                    await hand_over(group)
                    group, held = [], 0
            if group:
                await hand_over(group)
            while writing:
                _tally(report, failures, await writing.popleft())
        finally:
            ahead.cancel()  # nothing is left to fetch ahead for
            await asyncio.gather(ahead, return_exceptions=True)

    async def restore_to_store(self, batch_id: str, store: ObjectStore,
                               paths: Collection[str] | None = None) -> RestoreReport:
        """Rebuild every file of the batch (or those named in paths) as an object under the
        store's prefix.

        Each object appears only once all of its chunks were fetched and verified and
        the file's digest matched: a big file streams up as a multipart upload that is
        aborted on any failure, a small one goes up in one PUT. Symlinks are not objects:
        they are listed in `skipped_links` (a folder restore recreates them), and the
        modes and times of files are not kept either.
        """
        report = RestoreReport(batch_id)
        files, by_file, chunks = await self._plan(batch_id, paths, report)
        failures: dict[str, str] = {}
        limit = asyncio.Semaphore(_FILES_AT_ONCE)
        loop = asyncio.get_running_loop()
        # Uploads block their thread while it waits for chunks fetched on the loop, which
        # needs the default pool's threads to decode them: so uploads get their own.
        uploads = ThreadPoolExecutor(_FILES_AT_ONCE, thread_name_prefix="restore-upload")
        stopping = threading.Event()  # set when the restore ends: uploads take no more

        async def one(entry: FileEntry) -> None:
            records = by_file.get(entry.path, [])
            taken = 0  # how many of records the upload took from the shared chunks

            def parts() -> Iterator[bytes]:  # on the upload's thread; fetches on the loop
                nonlocal taken
                ids = []
                for record in records:
                    if stopping.is_set():  # the restore failed or was cancelled meanwhile
                        raise RestoreError(f"{display_path(entry.path)}: the restore stopped")
                    taken += 1
                    raw = asyncio.run_coroutine_threadsafe(chunks.take(record.chunk_id),
                                                           loop).result()
                    piece, piece_id = take_piece(entry, record, raw)
                    ids.append(piece_id)
                    yield piece
                check_digest(entry, ids)

            async with limit:
                try:
                    key = _object_key(entry.path)
                    if entry.size <= _SINGLE_PUT_BYTES:
                        data = await loop.run_in_executor(uploads, b"".join, parts())
                        await loop.run_in_executor(uploads, store.put, key, data)
                    else:
                        await loop.run_in_executor(uploads, store.put_parts, key, parts())
                except (RestoreError, IntegrityError, CloudError) as exc:
                    _failed(report, failures, entry.path, str(exc))
                    return
                finally:
                    chunks.drop_rest(records[taken:])
            report.files_restored += 1
            report.bytes_restored += entry.size

        try:
            async with asyncio.TaskGroup() as group:
                for entry in files:
                    if entry.kind == "symlink":
                        report.skipped_links.append(entry.path)
                    else:
                        group.create_task(one(entry))
        except* ConfigError as errors:
            raise errors.exceptions[0] from None
        finally:
            # Uploads still going (the restore failed or was cancelled) stop at their next
            # chunk, aborting their multipart upload; none outlives the restore.
            stopping.set()
            await chunks.aclose()
            await asyncio.shield(asyncio.to_thread(uploads.shutdown, wait=True))
        _raise_failures(batch_id, report, failures)
        return report

    async def _plan(self, batch_id: str, paths: Collection[str] | None, report: RestoreReport,
                    ) -> tuple[list[FileEntry], dict[str, list[ChunkRecord]], SharedChunks]:
        """A completed batch's files to restore (those sharing a chunk together), their
        chunks in order by file, and the fetcher that shares those chunks among them."""
        batch = await asyncio.to_thread(self.manifest.batch, batch_id)
        if batch.status != "success":
            raise RestoreError(f"batch {batch_id!r} did not complete (status {batch.state}); "
                               f"run it again before restoring")
        files = await asyncio.to_thread(self.manifest.files, batch_id)
        records = await asyncio.to_thread(self.manifest.chunks, batch_id)
        if paths is not None:
            files = _only(batch_id, files, paths)
            wanted = {entry.path for entry in files}
            records = [record for record in records if record.path in wanted]
        by_file: dict[str, list[ChunkRecord]] = defaultdict(list)
        for record in sorted(records, key=lambda r: (r.path, r.index)):
            by_file[record.path].append(record)
        uses = Counter(record.chunk_id for record in records)
        replicas = await asyncio.to_thread(self.manifest.replicas, sorted(uses))

        async def fetch(chunk_id: str) -> bytes | None:
            return await self._fetch_chunk(chunk_id, replicas.get(chunk_id, []), report)

        return _sharing_order(files, by_file), by_file, SharedChunks(fetch, uses)

    async def _fetch_chunk(self, chunk_id: str, holders: list[str],
                           report: RestoreReport) -> bytes | None:
        for node_id in self._order(holders):
            node = self.registry.nodes.get(node_id)
            if node is None:
                continue
            try:
                blob = await self.registry.client.read(node, chunk_id, self.location)
                return await asyncio.to_thread(decode_blob, blob, self.key, chunk_id)
            except ChunkNotFound as exc:
                problem = ReplicaProblem(chunk_id, node_id, "missing", str(exc))
            except IntegrityError as exc:
                problem = ReplicaProblem(chunk_id, node_id, "corrupt", str(exc))
            except ConfigError:
                raise  # an encrypted blob without its key: no replica will do better
            except (ClusterError, StorageError) as exc:
                problem = ReplicaProblem(chunk_id, node_id, "unavailable", str(exc))
            log.warning("restore skipped %s replica of %s on %s", problem.problem,
                        chunk_id[:12], node_id)
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
        """Scrub every replica of the batch in place; list missing, corrupt, unreachable.

        It works on the batch's distinct chunks, so a pack shared by thousands of small
        files is checked once per replica.
        """
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


class SharedChunks:
    """The chunks of one restore, each fetched once and kept while files still need it.

    Every file takes (or, failing before it gets there, drops) each chunk it names once;
    a chunk is dropped with its last use, so a pack of small files stays in memory while
    its members are restored and a chunk one file uses is let go as soon as it has it.
    """

    def __init__(self, fetch: Fetch, uses: Counter[str]) -> None:
        self._fetch = fetch
        self._uses = uses  # chunk id -> takes and drops still to come
        self._fetches: dict[str, asyncio.Task[bytes | None]] = {}
        self._running: set[asyncio.Task[bytes | None]] = set()  # also those let go
        # Chunks fetched ahead and not taken yet: each holds one of the window's places,
        # so fetching ahead never holds more than a few chunks nobody has used.
        self._ahead: set[str] = set()
        self._window = asyncio.Semaphore(_FETCHES_AHEAD)
        self._closed = False

    async def take(self, chunk_id: str) -> bytes | None:
        """The chunk's raw bytes (None: no good replica), fetched if nobody has yet."""
        task = self._start(chunk_id)
        try:
            # Shielded: a taker cancelled must not cancel the fetch others wait for.
            return await asyncio.shield(task)
        finally:
            self._used(chunk_id)

    def drop_rest(self, records: list[ChunkRecord]) -> None:
        """Give up the uses of chunks a failed file will not take after all."""
        for record in records:
            self._used(record.chunk_id)

    async def prefetch(self, order: list[str]) -> None:
        """Fetch chunks in the order they will be taken, a few ahead of the takers."""
        for chunk_id in order:
            if chunk_id in self._fetches or self._uses[chunk_id] <= 0:
                continue
            await self._window.acquire()
            if chunk_id in self._fetches or self._uses[chunk_id] <= 0 or self._closed:
                self._window.release()  # a taker got there first, or it is no longer needed
                continue
            self._ahead.add(chunk_id)
            self._start(chunk_id)

    async def aclose(self) -> None:
        """Stop fetching and let every chunk go (the restore is over)."""
        self._closed = True
        tasks = [*self._fetches.values(), *self._running]
        for task in tasks:
            task.cancel()
        # Gathered so that an error no taker saw (a fetch ahead) is not reported as lost.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fetches.clear()

    def _start(self, chunk_id: str) -> asyncio.Task[bytes | None]:
        task = self._fetches.get(chunk_id)
        if task is None:
            if self._closed:
                raise RestoreError("the restore stopped")
            task = asyncio.create_task(self._fetch(chunk_id))
            self._fetches[chunk_id] = task
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return task

    def _used(self, chunk_id: str) -> None:
        if chunk_id in self._ahead:
            self._ahead.discard(chunk_id)
            self._window.release()
        self._uses[chunk_id] -= 1
        if self._uses[chunk_id] <= 0:
            task = self._fetches.pop(chunk_id, None)
            if task is not None and not task.done():
                task.cancel()  # fetched ahead for files that failed before they took it
            if task is not None:
                # Nobody awaits it again: its outcome (a failure too) is retrieved here.
                task.add_done_callback(_retrieved)


async def _gather(entry: FileEntry, records: list[ChunkRecord],
                  chunks: SharedChunks) -> Pieces:
    """A small file's bytes as (offset, bytes) pieces, checked whole (size and digest)."""
    pieces: Pieces = []
    ids = []
    taken = 0
    try:
        for record in records:
            taken += 1  # take uses the chunk up even when it fails
            piece, piece_id = take_piece(entry, record, await chunks.take(record.chunk_id))
            pieces.append((record.offset, piece))
            ids.append(piece_id)
    finally:
        chunks.drop_rest(records[taken:])
    size = max((offset + len(piece) for offset, piece in pieces), default=0)
    if size != entry.size:
        raise RestoreError(f"{display_path(entry.path)}: rebuilt {size} bytes, the manifest "
                           f"says {entry.size}")
    check_digest(entry, ids)
    return pieces


def _sharing_order(files: list[FileEntry],
                   by_file: dict[str, list[ChunkRecord]]) -> list[FileEntry]:
    """Files (sorted by path) ordered so that those starting with the same chunk (a pack's
    members, identical content) come one after another, and it is held no longer."""
    first: dict[str, int] = {}  # chunk id -> where it first starts a file

    def key(entry: FileEntry) -> tuple[int, str]:
        records = by_file.get(entry.path)
        if not records:
            return (-1, entry.path)
        return (first.setdefault(records[0].chunk_id, len(first)), entry.path)

    return sorted(files, key=key)  # sorted calls key in list order: ranks follow paths


def _only(batch_id: str, files: list[FileEntry], paths: Collection[str]) -> list[FileEntry]:
    """The entries of files named in paths; RestoreError naming paths the batch lacks."""
    wanted = set(paths)
    chosen = [entry for entry in files if entry.path in wanted]
    if len(chosen) != len(wanted):
        missing = sorted(wanted - {entry.path for entry in chosen})
        shown = ", ".join(repr(display_path(p)) for p in missing[:5])
        raise RestoreError(f"batch {batch_id!r} has no file {shown}: give paths relative "
                           f"to the batch's source, with forward slashes")
    return chosen


def _tally(report: RestoreReport, failures: dict[str, str], outcomes: list[Outcome]) -> None:
    """Count a written group's files as restored or failed."""
    for entry, why in outcomes:
        if why is None:
            report.files_restored += 1
            report.bytes_restored += entry.size
        else:
            _failed(report, failures, entry.path, why)


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


def _failed(report: RestoreReport, failures: dict[str, str], path: str, why: str) -> None:
    """Count path as failed, saying why in the log and in the final error."""
    log.error("restore of %s failed: %s", display_path(path), why)
    report.failed_files.append(path)
    failures[path] = why


def _retrieved(task: asyncio.Task[bytes | None]) -> None:
    if not task.cancelled():
        task.exception()
