"""Writing restored files: kept under the destination, complete and durable before named.

Small files (up to 8 MiB, whose bytes the restorer holds) are committed in groups by
`commit_group`: each goes to a temp file beside its destination with its mode and time,
the group is made durable at once (syncfs(2) on each file system it touched, os.sync()
where the C library has none), renamed into place, and the renames made durable the same
way. One fsync per file costs milliseconds; one sync per group costs about as much for
thousands. A large file is written chunk by chunk by `write_large`, fsynced alone and
renamed. Either way a file that fails, or a restore that stops, leaves no temp file.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import cast

from multicloud.core.errors import MulticloudError, RestoreError
from multicloud.core.types import FileEntry
from multicloud.core.units import display_path
from multicloud.pipeline.ingestion import file_digest
from multicloud.pipeline.manifest import ChunkRecord

GROUP_FILE_BYTES = 8 * 1024 * 1024  # larger files are written alone, with their own fsync
# A temp file is new (never one found there), never a link followed, not inherited.
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Pieces = list[tuple[int, bytes]]  # a file's bytes as (offset, bytes)
Outcome = tuple[FileEntry, str | None]  # a file and why it failed (None: it is in place)


def take_piece(entry: FileEntry, record: ChunkRecord, raw: bytes | None) -> tuple[bytes, str]:
    """The file's bytes out of a fetched chunk, and the id its digest lists for them;
    RestoreError when no replica of the chunk was good (raw None)."""
    if raw is None:
        raise RestoreError(f"no good replica of chunk {record.index} of "
                           f"{display_path(entry.path)}")
    return record.piece(raw)


def check_digest(entry: FileEntry, ids: list[str]) -> None:
    """RestoreError unless the pieces' ids make the digest the manifest recorded."""
    if file_digest(ids) != entry.digest:
        raise RestoreError(f"{display_path(entry.path)}: its chunks do not match the "
                           f"manifest's digest")


def commit_group(dest: Path, group: list[tuple[FileEntry, Pieces]],
                 stopping: threading.Event) -> list[Outcome]:
    """Write a group of small files, make them durable at once, then move them into place.

    A file that fails is in the outcomes with why and leaves nothing behind; the others go
    on. When stopping is set (the restore failed or was cancelled) it removes its temp
    files and returns what it had done.
    """
    outcomes: list[Outcome] = []
    pending: dict[Path, tuple[FileEntry, Path]] = {}  # temp file -> its entry and target
    # A directory fd per file system written to, opened before the group's first write to
    # it: syncfs reports write-back errors that happened since its fd was opened.
    syncs: dict[int, int] = {}
    ready: set[Path] = set()  # directories made and checked since the group began
    real_root = Path(os.path.realpath(dest))
    try:
        for entry, pieces in group:
            if stopping.is_set():
                return outcomes
            try:
                target = _join_under(real_root, entry.path, ready)
                if target.parent not in ready:
                    _make_parent(real_root, entry.path, target)
                    _watch(target.parent, syncs)
                    ready.add(target.parent)
                fd, tmp = _temp_beside(target)
            except (RestoreError, OSError) as exc:  # OSError: a read-only or full destination
                outcomes.append((entry, describe(entry.path, exc)))
                continue
            pending[tmp] = (entry, target)
            try:
                for offset, piece in pieces:
                    _write_at(fd, offset, piece)
                _set_mode_and_time(fd, entry)
            except OSError as exc:  # a full disk
                del pending[tmp]
                tmp.unlink(missing_ok=True)
                outcomes.append((entry, describe(entry.path, exc)))
            finally:
                os.close(fd)
        try:
            _sync(syncs.values())
        except OSError as exc:  # which file the error hit is not known: none is named
            outcomes.extend((entry, _not_durable(entry, exc)) for entry, _ in pending.values())
            return outcomes
        placed: list[tuple[FileEntry, Path]] = []
        for tmp, (entry, target) in list(pending.items()):
            if stopping.is_set():
                break  # the ones placed already still get their renames made durable
            try:
                os.replace(tmp, target)
            except OSError as exc:  # e.g. a directory where the file goes
                outcomes.append((entry, describe(entry.path, exc)))
                continue  # its temp file is removed below
            del pending[tmp]
            placed.append((entry, target))
        try:
            _sync(syncs.values())
        except OSError as exc:  # a failed file leaves nothing behind, even once renamed
            for entry, target in placed:
                target.unlink(missing_ok=True)
                outcomes.append((entry, _not_durable(entry, exc)))
            return outcomes
        outcomes.extend((entry, None) for entry, _ in placed)
        return outcomes
    finally:
        for tmp in pending:
            tmp.unlink(missing_ok=True)
        for fd in syncs.values():
            os.close(fd)


def write_large(dest: Path, entry: FileEntry, records: list[ChunkRecord],
                take: Callable[[str], bytes | None], stopping: threading.Event) -> None:
    """Write a large file chunk by chunk (take fetches one, blocking), check it whole, fsync
    it and rename it into place; a failure leaves nothing behind."""
    target = _safe_join(dest, entry.path)
    fd, tmp = _open_temp(dest, entry.path, target)
    try:
        ids = []
        for record in records:
            if stopping.is_set():  # the restore failed or was cancelled meanwhile
                raise RestoreError(f"{display_path(entry.path)}: the restore stopped")
            piece, piece_id = take_piece(entry, record, take(record.chunk_id))
            _write_at(fd, record.offset, piece)
            ids.append(piece_id)
        check_digest(entry, ids)
        _commit_file(fd, tmp, target, entry)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def restore_link(entry: FileEntry, dest: Path) -> str | None:
    """Recreate a symlink entry under dest, replacing what is at its path atomically;
    why it failed, or None."""
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
        return str(exc)
    except OSError as exc:  # e.g. a directory where the link goes
        return f"{display_path(entry.path)}: cannot create the symlink: {exc.strerror}"
    return None


def _open_temp(dest: Path, rel_path: str, target: Path) -> tuple[int, Path]:
    """A temp file beside target, so the final rename stays on one file system."""
    _make_parent(dest, rel_path, target)
    return _temp_beside(target)


def _temp_beside(target: Path) -> tuple[int, Path]:
    """A new empty file (mode 0600) under a free temp name in target's directory."""
    # Not named after the file: a name near the 255-byte limit would not leave room.
    # mkstemp's way, in a third of its time (it counts for thousands of small files).
    for _ in range(100):
        tmp = target.parent / f".multicloud-{os.urandom(6).hex()}.partial"
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o600), tmp
        except FileExistsError:
            continue
    raise RestoreError(f"{display_path(target.name)}: no free temp name in "
                       f"{display_path(str(target.parent))}")


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


def _set_mode_and_time(fd: int, entry: FileEntry) -> None:
    """Give the file its recorded mode and modification time."""
    # Through the descriptor, before the rename: the path may be replaced meanwhile, and
    # the file appears under its name complete, mode and time included.
    # setuid/setgid are dropped: ownership is not restored (the restorer owns every file),
    # and a set-id file owned by whoever restores (root, say) is a privilege nobody had.
    # cp -p and tar do the same when they cannot restore the owner.
    os.fchmod(fd, entry.mode & 0o1777)
    if entry.mtime_ns != 0:  # 0 is "unknown" (an older manifest); before 1970 is negative
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def _commit_file(fd: int, tmp: Path, target: Path, entry: FileEntry) -> None:
    """Check the size, set mode and mtime, make the file durable, and move it into place."""
    size = os.fstat(fd).st_size
    if size != entry.size:
        raise RestoreError(f"{display_path(entry.path)}: rebuilt {size} bytes, the manifest "
                           f"says {entry.size}")
    _set_mode_and_time(fd, entry)
    os.fsync(fd)
    os.replace(tmp, target)


def _watch(directory: Path, syncs: dict[int, int]) -> None:
    """Note directory's file system among those a group syncs (a mount under the
    destination is another one)."""
    device = os.stat(directory).st_dev
    if device not in syncs:
        syncs[device] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


def _sync(fds: Collection[int]) -> None:
    """Make everything written to the file systems of these fds durable."""
    syncfs = _syncfs()
    if syncfs is None:
        if fds:
            os.sync()  # every file system, and no error reported: the best there is
        return
    for fd in fds:
        if syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), which flushes one file system (os.sync flushes all of them)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError, TypeError):  # no such call (TypeError: Windows)
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


def _not_durable(entry: FileEntry, exc: OSError) -> str:
    return (f"{display_path(entry.path)}: the file system could not make it durable: "
            f"{exc.strerror or exc}")


def describe(path: str, exc: MulticloudError | OSError) -> str:
    """What went wrong with a file, in one line (our own errors name the file already)."""
    if isinstance(exc, OSError):
        return f"{display_path(path)}: {exc.strerror or exc}"
    return str(exc)


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
    return _join_under(Path(os.path.realpath(root)), rel_path, ())


def _join_under(real_root: Path, rel_path: str, ready: Collection[Path]) -> Path:
    """real_root/rel_path as `_safe_join` checks it (real_root resolved already); a parent
    in ready was made and checked a moment ago, within the same group, and is not again."""
    target = real_root / rel_path  # an absolute rel_path replaces the root: refused below
    parts = Path(rel_path).parts
    parent = target.parent
    # realpath of the parent equals the parent as written exactly when no component of it
    # is a link, "..", or (for an absolute path) outside the root.
    if (not parts or ".." in parts or target.name in ("", ".", "..")
            or (parent not in ready
                and (Path(os.path.realpath(parent)) != parent
                     or not parent.is_relative_to(real_root)))):
        raise RestoreError(f"manifest path {display_path(rel_path)!r} escapes the destination "
                           f"or goes through a symlink; refusing")
    return target
