"""A node's chunk store in an object-store bucket: the twin of the on-disk `ChunkStore`.

A node whose cluster config names a bucket URL for it (`ClusterConfig.node_stores` or its
own `NodeSpec.store`) keeps its replicas as objects at `chunks/<id>` under that URL's
prefix, and its batch catalogue under `catalog/` beside them (see `multicloud.node.stores`),
so losing the node's machine loses nothing. The node does exactly what it does over a
disk: verify before it acknowledges, acknowledge only once the store confirmed the write.

Writes are create-only first: the common case, a new replica, is one PUT that can never
land on top of another writer's object unnoticed. When an object is already there, the
write still ends with this write's bytes at the key, as a rename does on a disk: the ack
(and so the manifest) describes this blob, and a body of the same chunk that was coded
another way (an older key, encryption switched on since) must not stay behind it. The
PUT also refreshes the object's modification time: gc deletes an unreferenced object
only when it is older than its cut-off, and a run that has just written the chunk again
must win.

Times are the store's: `delete(older_than=...)` compares the caller's clock with the
object's Last-Modified, so a clock far off the store's makes gc's grace period shorter or
longer by that much. The methods block: nodes call them from worker threads.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from multicloud.cloud import ObjectInfo, ObjectStore, open_store
from multicloud.core.config import StoreOptions
from multicloud.core.errors import (
    ChunkNotFound,
    CloudAuthError,
    CloudError,
    DiskFull,
    ObjectExists,
    ObjectMissing,
    StorageError,
)
from multicloud.node.store import FsyncObserver, check_chunk_id

__all__ = ["CHUNKS_PREFIX", "UNBOUNDED_FREE_BYTES", "BucketChunkStore"]

CHUNKS_PREFIX = "chunks/"
_CHUNK_KEY = re.compile(r"chunks/(?P<id>[0-9a-f]{64})")
# What `disk_free` reports without a quota: a bucket has no disk to fill, and placement
# counts a node's room from its configured capacity (`capacity_gb`) and what it holds, not
# from this figure. 1 PiB: more than any node is given, exact as a float (the metrics gauge)
# and as JSON (the `usage` reply).
UNBOUNDED_FREE_BYTES = 1 << 50


class BucketChunkStore:
    """Content-addressed objects under `chunks/` in one bucket prefix; blocking."""

    def __init__(self, objects: ObjectStore, *, owner: str = "node") -> None:
        self.objects = objects
        self.root = str(objects.url)  # where the store is, for messages (a URL here)
        self.owner = owner  # who is writing, for error messages: "node aws-node-1"
        # Room this store may use in all, or None for no limit of its own (the disk-full
        # fault sets it to what is stored now, as on a disk).
        self.quota_bytes: int | None = None
        self._on_fsync: FsyncObserver | None = None
        # A fault: writes stop before the store's PUT until this is set (None: never stop).
        self.commit_gate: threading.Event | None = None
        self.commit_held = threading.Event()  # set once a write stopped at the gate
        self._lock = threading.Lock()
        self.count, self.bytes = self._list_usage()

    @classmethod
    def open(cls, url: str, options: StoreOptions | None = None, *,
             owner: str = "node") -> BucketChunkStore:
        """The store behind a bucket URL (one listing to count what it holds)."""
        return cls(open_store(url, options), owner=owner)

    def observe_fsync(self, observer: FsyncObserver) -> None:
        """Call observer(seconds) after every PUT that makes a write durable: the node's
        fsync histogram keeps meaning "time until the bytes were durable"."""
        self._on_fsync = observer

    def key_for(self, chunk_id: str) -> str:
        """The object's key under the store's prefix (whether or not it exists)."""
        return CHUNKS_PREFIX + check_chunk_id(chunk_id)

    def put(self, chunk_id: str, blob: bytes | memoryview) -> None:
        """Store an object durably, create-only; an object already there is kept when its
        envelope is good for this chunk (and replaced when it is damaged)."""
        key = self.key_for(chunk_id)
        size = len(blob)
        what = f"cannot write chunk {chunk_id[:12]}"
        with self._errors(what):
            self._check_quota(chunk_id, size)
            if self.commit_gate is not None:
                self.commit_held.set()
                self.commit_gate.wait()
            previous: int | None = None  # the size of what was there, if anything
            try:
                self._timed_put(key, blob, create_only=True)
            except ObjectExists:
                previous, size = self._settle_existing(chunk_id, key, blob)
        with self._lock:
            if previous is None:
                self.count += 1
            self.bytes += size - (previous or 0)

    def get(self, chunk_id: str) -> bytes:
        """The object's bytes (unverified: the caller checks them)."""
        key = self.key_for(chunk_id)
        with self._errors(f"cannot read chunk {chunk_id[:12]}"):
            try:
                return bytes(self.objects.get(key))
            except ObjectMissing:
                raise ChunkNotFound(f"chunk {chunk_id} is not on {self.owner}") from None

    def exists(self, chunk_id: str) -> bool:
        """Whether the object is present."""
        return self.size(chunk_id) is not None

    def size(self, chunk_id: str) -> int | None:
        """The object's size in bytes, or None when absent."""
        info = self._head(chunk_id)
        return None if info is None else info.size

    def delete(self, chunk_id: str, older_than: float | None = None) -> bool:
        """Remove the object; False when it was not there (or, with ``older_than``, when
        the store says it was last written at or after that time)."""
        info = self._head(chunk_id)
        if info is None or (older_than is not None and info.mtime >= older_than):
            return False
        with self._errors(f"cannot delete chunk {chunk_id[:12]}"):
            self.objects.delete(self.key_for(chunk_id))
        with self._lock:
            self.count -= 1
            self.bytes -= info.size
        return True

    def inventory(self) -> Iterator[str]:
        """Ids of every object held (streamed from the listing, page by page)."""
        for chunk_id, _, _ in self._listing():
            yield chunk_id

    def describe(self) -> list[tuple[str, int, float]]:
        """(id, size, mtime) of every object held, for gc."""
        return list(self._listing())

    def usage(self) -> tuple[int, int]:
        """(object count, total bytes), as kept since the store opened."""
        with self._lock:
            return self.count, self.bytes

    def disk_free(self) -> int:
        """Bytes this store can still write: what the quota leaves, else
        `UNBOUNDED_FREE_BYTES` (a bucket has no disk; see that constant)."""
        if self.quota_bytes is None:
            return UNBOUNDED_FREE_BYTES
        return max(self.quota_bytes - self.bytes, 0)

    def clear_temp_files(self) -> None:
        """Nothing to clear: an object PUT is atomic, so no write leaves a partial object
        (and writes are single PUTs, never multipart uploads that could be left open)."""

    def write_partial(self, name: str, nbytes: int) -> None:
        """The crash-in-the-middle-of-a-write fault: a no-op here, because a PUT cut short
        leaves nothing at its key; the node still crashes (the fault's visible part)."""

    def corrupt(self, chunk_id: str, offset: int) -> None:
        """Flip one byte of a stored object behind the node's back (bit rot; a fault)."""
        key = self.key_for(chunk_id)
        with self._errors(f"cannot corrupt chunk {chunk_id[:12]}"):
            try:
                data = bytearray(self.objects.get(key))
            except ObjectMissing:
                raise ChunkNotFound(f"chunk {chunk_id} is not on {self.owner}") from None
            data[offset % len(data)] ^= 0xFF
            self.objects.put(key, bytes(data))

    # -- internals ------------------------------------------------------------------------

    def _check_quota(self, chunk_id: str, size: int) -> None:
        """DiskFull when the write would take the store over its quota; nothing is sent."""
        quota = self.quota_bytes
        if quota is None or self.bytes + size <= quota:
            return
        # Over it only if this adds bytes: a chunk already held is written in place.
        previous = self.size(chunk_id) or 0
        if self.bytes - previous + size > quota:
            # Worded as the on-disk store words it: callers and tests see one message.
            raise DiskFull(f"{self.owner} cannot write chunk {chunk_id[:12]}: No space left "
                           f"on device (the node's quota is used); free some space and run "
                           f"again")

    def _settle_existing(self, chunk_id: str, key: str,
                         blob: bytes | memoryview) -> tuple[int | None, int]:
        """A create found an object at key: what this write acknowledges must be there.

        The same bytes are written again (so the object's age says it was just written,
        which gc's grace relies on). Any other body is replaced, damaged or not: a valid
        envelope of the same chunk may be encrypted with another key or coded another way
        (a key rotation, encryption switched on), and the ack, which the manifest records,
        describes this write's blob. The disk store's rename does the same.

        Returns (the size it had, None when it has gone since; the size it has now) for
        the usage figures.
        """
        try:
            existing = bytes(self.objects.get(key))
        except ObjectMissing:
            # Deleted since the create failed (gc, a lost-replica fault): write ours.
            self._timed_put(key, blob, create_only=False)
            return None, len(blob)
        self._timed_put(key, blob, create_only=False)
        return len(existing), len(blob)

    def _timed_put(self, key: str, data: bytes | memoryview, *, create_only: bool) -> None:
        started = time.perf_counter()
        self.objects.put(key, data, create_only=create_only)
        if self._on_fsync is not None:
            self._on_fsync(time.perf_counter() - started)

    def _head(self, chunk_id: str) -> ObjectInfo | None:
        key = self.key_for(chunk_id)
        with self._errors(f"cannot look up chunk {chunk_id[:12]}"):
            try:
                return self.objects.head(key)
            except ObjectMissing:
                return None

    def _listing(self, what: str = "cannot list its chunks") -> Iterator[tuple[str, int, float]]:
        with self._errors(what):
            for info in self.objects.list(CHUNKS_PREFIX):
                match = _CHUNK_KEY.fullmatch(info.key)
                if match is not None:  # anything else under chunks/ is not a replica
                    yield match["id"], info.size, info.mtime

    def _list_usage(self) -> tuple[int, int]:
        count = total = 0
        for _, size, _ in self._listing(f"cannot open its chunk store {self.root}"):
            count += 1
            total += size
        return count, total

    def _errors(self, what: str) -> _NodeErrors:
        return _NodeErrors(self.owner, what)


class _NodeErrors:
    """Re-raises a store's CloudError naming the node and what it was doing.

    Credentials stay a CloudAuthError (the operator's fix differs), any other failure is a
    CloudError, a StorageError like a failing disk's; ObjectMissing and ObjectExists, which
    the store's methods turn into answers themselves, never get here as such.
    """

    def __init__(self, owner: str, what: str) -> None:
        self.owner = owner
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        if not isinstance(exc, CloudError):
            return
        cls: Callable[[str], StorageError] = (
            CloudAuthError if isinstance(exc, CloudAuthError) else CloudError)
        raise cls(f"{self.owner} {self.what}: {exc}") from exc

