"""A node's on-disk chunk store: content-addressed, durable, atomic.

Objects live at `objects/<id[:2]>/<id[2:4]>/<id>`, where the id is the SHA-256 of the
chunk's raw bytes. A write goes to a temp file, is fsynced, renamed over the final path,
and the directory is fsynced, so a crash leaves either the whole object or none of it.
Every OSError is mapped into the exception tree here, naming the node and what it was
doing; a full disk (or quota) is `DiskFull` and leaves no temp file behind.

Temp files live in `tmp/` and carry their owner: `<id[:16]>.<pid>.<boot>.<random>`, where
boot is the first 8 characters of the kernel's boot id ("0" where it cannot be read). Any
process may open a store that another one is writing to (`multicloud status` beside a
`multicloud run`), so opening one only clears temp files whose writer is gone: a process
no longer alive on this host, a process of an earlier boot, or this process itself (when
no write of its own still has the file open). Names of the kind `write_partial` leaves
(`*.partial`) and of the kind written before owners were recorded (`<id[:16]>.<random>`)
have no live writer by construction; any other name is cleared once it is an hour old.

The store keeps its object count and bytes as it goes (one directory walk when it opens),
so usage and metrics are exact right after a write without walking the disk again. The
methods are blocking: nodes call them from worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from multicloud.core.buffers import padded
from multicloud.core.errors import ChunkNotFound, InvalidChunkId, storage_error
from multicloud.core.host import boot_marker, process_alive

_CHUNK_ID = re.compile(r"[0-9a-f]{64}")
# A temp file of a write in progress: <id[:16]>.<pid>.<boot>.<mkstemp's random part>.
_TEMP_NAME = re.compile(r"[0-9a-f]{16}\.(?P<pid>[0-9]+)\.(?P<boot>[0-9a-z]+)\.[a-z0-9_]+")
# Written before temp files carried their owner; that version cleared every temp file
# whenever a store opened, so no writer of it relies on one surviving.
_OWNERLESS_TEMP_NAME = re.compile(r"[0-9a-f]{16}\.[a-z0-9_]+")
# What write_partial leaves: the write of a process that crashed, never a live one's.
_CRASHED_SUFFIX = ".partial"
# A name none of the above explains may be a writer we do not know: give it time.
_UNKNOWN_TEMP_MAX_AGE_S = 3600.0

# Temp files of this process's writes in flight, by name (names are unique enough: a
# chunk-id prefix, the pid and a random part). A second store opened on the same root in
# this process, or a node restart, must not take a file from under a write still using it.
_in_flight: set[str] = set()
_in_flight_lock = threading.Lock()

FsyncObserver = Callable[[float], None]
# Who may still use a temp file: a process alive now, none, or this very process.
TempWriter = Literal["alive", "gone", "this process"]


def _temp_writer(path: Path) -> TempWriter:
    """Whose temp file this is, as far as clearing it goes (rules: the module docstring)."""
    name = path.name
    if name.endswith(_CRASHED_SUFFIX) or _OWNERLESS_TEMP_NAME.fullmatch(name):
        return "gone"
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "alive"  # renamed or removed since the listing: nothing to clear
        return "gone" if age > _UNKNOWN_TEMP_MAX_AGE_S else "alive"
    if match["boot"] != boot_marker():
        return "gone"  # written before this host last booted: that process is gone
    pid = int(match["pid"])
    if pid == os.getpid():
        return "this process"
    return "alive" if process_alive(pid) else "gone"


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def temp_prefix(chunk_id: str, pid: int | None = None) -> str:
    """The start of a temp file's name for a write of chunk_id by process pid (this one)."""
    return f"{chunk_id[:16]}.{os.getpid() if pid is None else pid}.{boot_marker()}."


def check_chunk_id(chunk_id: str) -> str:
    """Return chunk_id if it is 64 lowercase hex characters, else raise InvalidChunkId."""
    if not isinstance(chunk_id, str) or _CHUNK_ID.fullmatch(chunk_id) is None:
        raise InvalidChunkId(str(chunk_id))
    return chunk_id


class ChunkStore:
    """Durable, content-addressed object files under one directory."""

    def __init__(self, root: str | Path, fsync: bool = True, *, owner: str = "node") -> None:
        self.root = Path(root)
        self.fsync = fsync
        # Write blobs built for it (page-aligned) with O_DIRECT; cleared on a file system
        # that refuses it. Without fsync there is nothing to gain: the page cache is faster.
        self.direct_io = fsync
        self.owner = owner  # who is writing, for error messages: "node aws-node-1"
        # Room this store may use in all, or None for whatever the disk has (a node's
        # capacity; the disk-full fault sets it to what is stored now).
        self.quota_bytes: int | None = None
        self._on_fsync: FsyncObserver | None = None
        # A fault: writes stop before their rename until this is set (None: never stop).
        self.commit_gate: threading.Event | None = None
        self.commit_held = threading.Event()  # set once a write stopped at the gate
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._lock = threading.Lock()
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
            self.clear_temp_files()
            self.count, self.bytes = self._walk_usage()
        except OSError as exc:
            raise storage_error(exc, f"{owner} cannot open its chunk store {self.root}") from exc

    def observe_fsync(self, observer: FsyncObserver) -> None:
        """Call observer(seconds) after every fsync (a node's metrics)."""
        self._on_fsync = observer

    def path_for(self, chunk_id: str) -> Path:
        """Where the object with this id lives (whether or not it exists)."""
        return self.object_path(self.root, chunk_id)

    @staticmethod
    def object_path(root: Path, chunk_id: str) -> Path:
        """Where a store at root keeps the object chunk_id (for readers that must not open
        the store: opening clears a running node's temp files)."""
        check_chunk_id(chunk_id)
        return root / "objects" / chunk_id[:2] / chunk_id[2:4] / chunk_id

    @staticmethod
    def objects_in(root: Path) -> Iterator[str]:
        """Ids of every object a store at root holds, without opening it."""
        for path in (root / "objects").glob("*/*/*"):
            if _CHUNK_ID.fullmatch(path.name):
                yield path.name

    def put(self, chunk_id: str, blob: bytes | memoryview) -> None:
        """Write an object durably; replaces an existing one atomically."""
        final = self.path_for(chunk_id)
        size = len(blob)
        tmp_name: str | None = None
        in_flight: str | None = None
        try:
            previous = self.size(chunk_id) or 0
            if self.quota_bytes is not None and self.bytes - previous + size > self.quota_bytes:
                raise OSError(errno.ENOSPC, "No space left on device (the node's quota is used)")
            self._make_dirs(final.parent)
            # Created and registered under one lock: a store opening in another thread of
            # this process sees the file only once it knows the file is in use.
            with _in_flight_lock:
                fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=temp_prefix(chunk_id))
                in_flight = Path(tmp_name).name
                _in_flight.add(in_flight)
            try:
                self._write(fd, blob)
                if self.fsync:
                    self._timed_fsync(fd)
            finally:
                os.close(fd)
            if self.commit_gate is not None:
                self.commit_held.set()
                self.commit_gate.wait()
            os.replace(tmp_name, final)
            tmp_name = None
            if self.fsync:
                self._fsync_dir(final.parent)
        except OSError as exc:
            raise storage_error(exc, f"{self.owner} cannot write chunk {chunk_id[:12]}") from exc
        finally:
            if tmp_name is not None:
                Path(tmp_name).unlink(missing_ok=True)
            if in_flight is not None:
                # Only once the file is renamed or removed, so it is never unguarded.
                with _in_flight_lock:
                    _in_flight.discard(in_flight)
        with self._lock:
            if previous == 0:
                self.count += 1
            self.bytes += size - previous

    def _write(self, fd: int, blob: bytes | memoryview) -> None:
        """Write all of blob to the new file fd: from its own pages with O_DIRECT when it
        was built for that (no copy into the page cache: see multicloud.core.buffers),
        else through the page cache. Either way the caller's fsync makes it durable."""
        pages = padded(blob) if self.direct_io else None
        if pages is not None:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
                _write_all(fd, pages)  # whole pages; the padding is cut off below
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                os.ftruncate(fd, len(blob))
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # This file system takes no direct writes (tmpfs, some FUSE): stop asking.
                self.direct_io = False
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
        _write_all(fd, memoryview(blob))

    def get(self, chunk_id: str) -> bytes:
        """The object's bytes (unverified: the caller checks them)."""
        try:
            return self.path_for(chunk_id).read_bytes()
        except FileNotFoundError:
            raise ChunkNotFound(f"chunk {chunk_id} is not on {self.owner}") from None
        except OSError as exc:
            raise storage_error(exc, f"{self.owner} cannot read chunk {chunk_id[:12]}") from exc

    def exists(self, chunk_id: str) -> bool:
        """Whether the object is present."""
        return self.path_for(chunk_id).is_file()

    def size(self, chunk_id: str) -> int | None:
        """The object's size in bytes, or None when absent."""
        try:
            return self.path_for(chunk_id).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, chunk_id: str, older_than: float | None = None) -> bool:
        """Remove the object; False when it was not there (or, with ``older_than``, when
        it was written at or after that time)."""
        path = self.path_for(chunk_id)
        try:
            stat = path.stat()
            if older_than is not None and stat.st_mtime >= older_than:
                return False
            size = stat.st_size
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(exc, f"{self.owner} cannot delete chunk {chunk_id[:12]}") from exc
        with self._lock:
            self.count -= 1
            self.bytes -= size
        return True

    def inventory(self) -> Iterator[str]:
        """Ids of every object held."""
        return self.objects_in(self.root)

    def describe(self) -> list[tuple[str, int, float]]:
        """(id, size, mtime) of every object held, for gc."""
        found = []
        for chunk_id in self.inventory():
            try:
                stat = self.path_for(chunk_id).stat()
            except FileNotFoundError:
                continue  # deleted while listing
            found.append((chunk_id, stat.st_size, stat.st_mtime))
        return found

    def usage(self) -> tuple[int, int]:
        """(object count, total bytes), as kept since the store opened."""
        with self._lock:
            return self.count, self.bytes

    def disk_free(self) -> int:
        """Bytes this store can still write: the disk's free space, or what the quota leaves."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        if self.quota_bytes is not None:
            free = min(free, max(self.quota_bytes - self.bytes, 0))
        return free

    def clear_temp_files(self) -> None:
        """Drop leftovers of writes a crash interrupted: never acknowledged, safe to drop.

        Only files whose writer is gone (see the module docstring): a write another process
        is making right now keeps its temp file, or its rename would fail.
        """
        for leftover in self._tmp.iterdir():
            writer = _temp_writer(leftover)
            if writer == "gone":
                leftover.unlink(missing_ok=True)
            elif writer == "this process":
                with _in_flight_lock:  # one of its writes may still be using the file
                    if leftover.name not in _in_flight:
                        leftover.unlink(missing_ok=True)

    def write_partial(self, name: str, nbytes: int) -> Path:
        """Leave a partial temp file, as a crash in the middle of a write does (a fault).

        The name ends in `.partial` (added if missing), which marks a writer that crashed:
        the next open of the store, or the node's restart, clears it.
        """
        if not name.endswith(_CRASHED_SUFFIX):
            name += _CRASHED_SUFFIX
        path = self._tmp / name
        path.write_bytes(b"\0" * nbytes)
        return path

    def corrupt(self, chunk_id: str, offset: int) -> None:
        """Flip one byte of a stored object behind the node's back (bit rot; a fault)."""
        path = self.path_for(chunk_id)
        data = bytearray(path.read_bytes())
        data[offset % len(data)] ^= 0xFF
        path.write_bytes(bytes(data))

    def _make_dirs(self, directory: Path) -> None:
        """Create objects/ab/cd as needed; a new directory's entry is made durable too, or a
        crash could lose the directory and every object renamed into it."""
        if directory.is_dir():
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            self._fsync_dir(directory.parent)
            self._fsync_dir(self._objects)

    def _walk_usage(self) -> tuple[int, int]:
        count = total = 0
        for chunk_id in self.inventory():
            size = self.size(chunk_id)
            if size is not None:
                count += 1
                total += size
        return count, total

    def _timed_fsync(self, fd: int) -> None:
        started = time.perf_counter()
        os.fsync(fd)
        if self._on_fsync is not None:
            self._on_fsync(time.perf_counter() - started)

    def _fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            self._timed_fsync(fd)
        finally:
            os.close(fd)

