"""A node's on-disk chunk store: content-addressed, durable, atomic.

Objects live at `objects/<id[:2]>/<id[2:4]>/<id>`, where the id is the SHA-256 of the
chunk's raw bytes. A write goes to a temp file, is fsynced, renamed over the final path,
and the directory is fsynced, so a crash leaves either the whole object or none of it.
The methods are blocking: nodes call them from worker threads.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from multicloud.core.errors import ChunkNotFound, InvalidChunkId, StorageError

_CHUNK_ID = re.compile(r"[0-9a-f]{64}")


def check_chunk_id(chunk_id: str) -> str:
    """Return chunk_id if it is 64 lowercase hex characters, else raise InvalidChunkId."""
    if not isinstance(chunk_id, str) or _CHUNK_ID.fullmatch(chunk_id) is None:
        raise InvalidChunkId(str(chunk_id))
    return chunk_id


class ChunkStore:
    """Durable, content-addressed object files under one directory."""

    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._clear_temp_files()

    def path_for(self, chunk_id: str) -> Path:
        """Where the object with this id lives (whether or not it exists)."""
        check_chunk_id(chunk_id)
        return self._objects / chunk_id[:2] / chunk_id[2:4] / chunk_id

    def put(self, chunk_id: str, blob: bytes | memoryview) -> None:
        """Write an object durably; replaces an existing one atomically."""
        final = self.path_for(chunk_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=chunk_id[:16] + ".")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(final.parent)

    def get(self, chunk_id: str) -> bytes:
        """The object's bytes (unverified: the caller checks them)."""
        try:
            return self.path_for(chunk_id).read_bytes()
        except FileNotFoundError:
            raise ChunkNotFound(f"chunk {chunk_id} is not in {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read chunk {chunk_id} in {self.root}: {exc}") from exc

    def exists(self, chunk_id: str) -> bool:
        """Whether the object is present."""
        return self.path_for(chunk_id).is_file()

    def size(self, chunk_id: str) -> int | None:
        """The object's size in bytes, or None when absent."""
        try:
            return self.path_for(chunk_id).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, chunk_id: str) -> bool:
        """Remove the object; False when it was not there."""
        try:
            self.path_for(chunk_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def inventory(self) -> Iterator[str]:
        """Ids of every object held."""
        for path in self._objects.glob("*/*/*"):
            if _CHUNK_ID.fullmatch(path.name):
                yield path.name

    def usage(self) -> tuple[int, int]:
        """(object count, total bytes)."""
        count = total = 0
        for chunk_id in self.inventory():
            size = self.size(chunk_id)
            if size is not None:
                count += 1
                total += size
        return count, total

    def _clear_temp_files(self) -> None:
        # Leftovers of writes that a crash interrupted: never acknowledged, safe to drop.
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
