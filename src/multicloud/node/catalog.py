"""A node's list of committed batches: where each batch's manifest object is stored.

Every node keeps the whole list (it is small: one entry per batch), so any client that can
reach one node can find every batch and rebuild its manifest from the replicas. Entries
are JSON named by a hash of the batch id; a newer entry (by `updated_at`) replaces an
older one, and a deleted batch keeps a tombstone so a lagging node cannot bring it back.
A tombstone wins a tie (see `precedence`): clocks of two machines, or a simulated one,
can stamp a delete and the success it deletes alike.

The entries live where the node's replicas do: files under `<root>/catalog/` beside an
on-disk chunk store (written durably: temp file, fsync, rename), or objects under
`catalog/` in the bucket of a bucket-backed node, so that losing the node's machine loses
nothing (see `multicloud.node.stores.catalog_for`).

In a bucket, the first entry of a batch is a create-only PUT; a later one is read,
compared and then overwritten. Between that read and the overwrite another writer of the
same prefix could store a newer entry, which ours (older) would then replace: the
`ObjectStore` interface has no compare-and-swap on a version. The only writer of a node's
prefix is that node, and within it a lock serialises puts, so this takes two processes
configured onto one prefix; even then the catalogue publishes every entry to every node
and `recover` keeps the newest it finds, so one node's lost update is made good.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from multicloud.cloud import ObjectStore
from multicloud.core.errors import (
    CloudError,
    ObjectExists,
    ObjectMissing,
    StorageError,
    storage_error,
)

__all__ = ["CATALOG_PREFIX", "CatalogStore", "precedence"]

CATALOG_PREFIX = "catalog/"
# A create-only put that finds an entry (another writer got in first) reads and compares
# again; past this many rounds the store is not settling and the put fails.
_CREATE_ROUNDS = 3



def precedence(entry: dict[str, Any]) -> tuple[float, int]:
    """How entries of one batch order: by updated_at, a tombstone after a success entry
    stamped the same (a delete wins the tie, as Cassandra's tombstones do)."""
    updated = entry.get("updated_at", 0)
    return (float(updated) if isinstance(updated, int | float) else 0.0,
            1 if entry.get("status") == "deleted" else 0)

class CatalogStore:
    """Batch entries, one file or object each, in a directory or a bucket; blocking (call
    from a thread).

    `root` is a directory (entries go to `<root>/catalog/`) or an `ObjectStore` (entries go
    to `catalog/` under its prefix).
    """

    def __init__(self, root: str | Path | ObjectStore, owner: str = "node") -> None:
        self.owner = owner
        self._entries: _Entries
        # The directory entries go to (None for a bucket): tests and tools look inside.
        self.dir: Path | None
        if isinstance(root, ObjectStore):
            self.dir = None
            self._entries = _BucketEntries(root)
        else:
            self.dir = Path(root) / "catalog"
            self._entries = _DirEntries(self.dir)
        self._lock = threading.Lock()

    def put(self, entry: dict[str, Any]) -> bool:
        """Keep entry unless a newer one for its batch is held; True when it was kept."""
        batch_id = entry.get("batch_id")
        updated = entry.get("updated_at")
        if not isinstance(batch_id, str) or not batch_id or not isinstance(updated, int | float):
            raise StorageError(f"a catalog entry needs a batch_id and updated_at, got "
                               f"{sorted(entry)}")
        name = hashlib.sha256(batch_id.encode()).hexdigest()[:32] + ".json"
        data = json.dumps(entry, sort_keys=True).encode()
        what = f"{self.owner} cannot record batch {batch_id!r}"
        with self._lock:
            for _ in range(_CREATE_ROUNDS):
                current, present = self._entries.read(name, what)
                if current is not None and precedence(current) >= precedence(entry):
                    return False
                try:
                    # Create-only where nothing is there yet: a writer that got in first is
                    # compared with, not overwritten. A damaged entry is overwritten.
                    self._entries.write(name, data, create_only=not present, what=what)
                except ObjectExists:
                    continue
                return True
        raise StorageError(f"{what}: its entry kept changing while it was written; try "
                           f"again")

    def entries(self) -> list[dict[str, Any]]:
        """Every entry held (tombstones included), in no particular order."""
        what = f"{self.owner} cannot list its catalog"
        found = []
        for name in self._entries.names(what):
            entry, _ = self._entries.read(name, what)
            if entry is not None:
                found.append(entry)
        return found


def _parse(data: bytes) -> dict[str, Any] | None:
    """An entry from its bytes; None when damaged (other nodes hold it too)."""
    try:
        value = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return value if isinstance(value, dict) else None


class _Entries(abc.ABC):
    """Where entries are kept: named blobs of JSON."""

    @abc.abstractmethod
    def names(self, what: str) -> Iterator[str]:
        """The name of every entry held (`*.json`)."""

    @abc.abstractmethod
    def read(self, name: str, what: str) -> tuple[dict[str, Any] | None, bool]:
        """(the entry, None when absent or damaged; whether anything is there at all)."""

    @abc.abstractmethod
    def write(self, name: str, data: bytes, *, create_only: bool, what: str) -> None:
        """Store data durably as the entry name (ObjectExists: create_only found one)."""


class _DirEntries(_Entries):
    """Entries as files in a directory, each replaced atomically and durably."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def names(self, what: str) -> Iterator[str]:
        if not self.dir.is_dir():
            return
        for path in self.dir.glob("*.json"):
            yield path.name

    def read(self, name: str, what: str) -> tuple[dict[str, Any] | None, bool]:
        try:
            data = (self.dir / name).read_bytes()
        except FileNotFoundError:
            return None, False
        except OSError:
            return None, True  # unreadable: damaged, as far as this node goes
        return _parse(data), True

    def write(self, name: str, data: bytes, *, create_only: bool, what: str) -> None:
        # One process writes a directory's entries under the store's lock: the rename
        # replaces whatever is there, create_only or not.
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".entry.")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.dir / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise storage_error(exc, what) from exc


class _BucketEntries(_Entries):
    """Entries as objects under `catalog/` in a bucket; a PUT is atomic and durable."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    def names(self, what: str) -> Iterator[str]:
        try:
            for info in self.objects.list(CATALOG_PREFIX):
                name = info.key[len(CATALOG_PREFIX):]
                if "/" not in name and name.endswith(".json") and not name.startswith("."):
                    yield name
        except CloudError as exc:
            raise _named(exc, what) from exc

    def read(self, name: str, what: str) -> tuple[dict[str, Any] | None, bool]:
        try:
            data = bytes(self.objects.get(CATALOG_PREFIX + name))
        except ObjectMissing:
            return None, False
        except CloudError as exc:
            # Not "absent": putting blindly could replace a newer entry we failed to read.
            raise _named(exc, what) from exc
        return _parse(data), True

    def write(self, name: str, data: bytes, *, create_only: bool, what: str) -> None:
        try:
            self.objects.put(CATALOG_PREFIX + name, data, create_only=create_only)
        except ObjectExists:
            raise
        except CloudError as exc:
            raise _named(exc, what) from exc


def _named(exc: CloudError, what: str) -> CloudError:
    """The store's error, saying which node failed to do what (same class, so credentials
    stay a CloudAuthError)."""
    return type(exc)(f"{what}: {exc}")
