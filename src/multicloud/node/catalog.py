"""A node's list of committed batches: where each batch's manifest object is stored.

Every node keeps the whole list (it is small: one entry per batch), so any client that can
reach one node can find every batch and rebuild its manifest from the replicas. Entries
are JSON files named by a hash of the batch id, written durably (temp file, fsync,
rename); a newer entry (by `updated_at`) replaces an older one, and a deleted batch keeps
a tombstone so a lagging node cannot bring it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from multicloud.core.errors import StorageError, storage_error

__all__ = ["CatalogStore"]


class CatalogStore:
    """Batch entries under `<root>/catalog/`, one file each; blocking (call from a thread)."""

    def __init__(self, root: str | Path, owner: str = "node") -> None:
        self.dir = Path(root) / "catalog"
        self.owner = owner
        self._lock = threading.Lock()

    def put(self, entry: dict[str, Any]) -> bool:
        """Keep entry unless a newer one for its batch is held; True when it was kept."""
        batch_id = entry.get("batch_id")
        updated = entry.get("updated_at")
        if not isinstance(batch_id, str) or not batch_id or not isinstance(updated, int | float):
            raise StorageError(f"a catalog entry needs a batch_id and updated_at, got "
                               f"{sorted(entry)}")
        path = self.dir / (hashlib.sha256(batch_id.encode()).hexdigest()[:32] + ".json")
        with self._lock:
            current = self._read(path)
            if current is not None and current.get("updated_at", 0) >= updated:
                return False
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".entry.")
                try:
                    with os.fdopen(fd, "w") as handle:
                        json.dump(entry, handle, sort_keys=True)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(tmp, path)
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
                raise storage_error(exc, f"{self.owner} cannot record batch {batch_id!r}") \
                    from exc
        return True

    def entries(self) -> list[dict[str, Any]]:
        """Every entry held (tombstones included), in no particular order."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.glob("*.json"):
            entry = self._read(path)
            if entry is not None:
                found.append(entry)
        return found

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a damaged entry: other nodes hold it too
        return value if isinstance(value, dict) else None
