"""The durable record of what each batch stored and where its replicas live (SQLite).

Content model: a batch has files, a file has ordered chunks, a chunk id maps to one stored
blob, and replicas are (chunk id, node id) pairs shared by every batch that references the
chunk. One connection per ``Manifest``, guarded by a lock, serves all threads of a process;
WAL mode lets a later (or concurrent) process read what an earlier one committed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from multicloud.core.errors import DiskFull, StorageError, UnknownBatch, storage_error
from multicloud.core.types import BlobInfo, Chunk, FileEntry

__all__ = ["SCHEMA_VERSION", "BatchRecord", "ChunkRecord", "Manifest"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# How long a writer waits for another process's write transaction before giving up.
_BUSY_TIMEOUT_S = 30.0
# Stays well under SQLite's host-parameter limit (999 on old builds) for IN (...) lookups.
_IN_BATCH = 500
# Longest list of known batch ids an UnknownBatch message spells out.
_KNOWN_SHOWN = 20
_FINAL_STATUSES = ("success", "failed")

_SCHEMA = (
    "CREATE TABLE batches ("
    " batch_id TEXT PRIMARY KEY,"
    " status TEXT NOT NULL,"
    " source TEXT NOT NULL,"
    " source_cloud TEXT NOT NULL,"
    " created_at REAL NOT NULL,"
    " finished_at REAL,"
    " result TEXT,"
    # Bumped on every begin_batch: orders batches newest first even when clock readings tie.
    " seq INTEGER NOT NULL)",
    "CREATE TABLE files ("
    " batch_id TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " size INTEGER NOT NULL,"
    " chunk_count INTEGER NOT NULL,"
    " digest TEXT NOT NULL,"
    " PRIMARY KEY (batch_id, path)) WITHOUT ROWID",
    # The primary key's batch_id prefix is the by-batch index, and (path, idx) its order.
    "CREATE TABLE file_chunks ("
    " batch_id TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " idx INTEGER NOT NULL,"
    " offset INTEGER NOT NULL,"
    " size INTEGER NOT NULL,"
    " chunk_id TEXT NOT NULL,"
    " PRIMARY KEY (batch_id, path, idx)) WITHOUT ROWID",
    "CREATE TABLE blobs ("
    " chunk_id TEXT PRIMARY KEY,"
    " raw_size INTEGER NOT NULL,"
    " blob_size INTEGER NOT NULL,"
    " blob_checksum TEXT NOT NULL,"
    " codec TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE replicas ("
    " chunk_id TEXT NOT NULL,"
    " node_id TEXT NOT NULL,"
    " PRIMARY KEY (chunk_id, node_id)) WITHOUT ROWID",
    "CREATE INDEX replicas_by_node ON replicas (node_id, chunk_id)",
)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch as the manifest knows it."""

    batch_id: str
    status: str  # "running", "success" or "failed"
    source: str  # the source URL or directory as given
    source_cloud: str
    created_at: float  # epoch seconds when the (latest) run began
    finished_at: float | None  # None while running
    result: dict[str, Any] | None  # what finish_batch recorded, usually PipelineResult.to_dict()


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One chunk reference of a file, with the blob it is stored as."""

    path: str
    index: int
    offset: int
    size: int  # raw bytes
    chunk_id: str
    blob_size: int
    blob_checksum: str
    codec: str


class Manifest:
    """The SQLite manifest at ``path``; safe to share between threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"cannot create the manifest directory "
                                     f"{self.path.parent} (choose a writable data dir)") from exc
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so every public write is
            # exactly one transaction, and BEGIN IMMEDIATE takes the write lock up front.
            self._conn = sqlite3.connect(
                self.path,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StorageError(
                f"cannot open the manifest {self.path}: {exc}; check the path and permissions"
            ) from exc
        try:
            self._configure()
        except BaseException:
            self._conn.close()
            self._closed = True
            raise

    def _configure(self) -> None:
        """Set the journal and durability pragmas and create or check the schema."""
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # FULL syncs the WAL on every commit: a committed chunk or replica survives power
            # loss, which restore depends on. Writes are batched, so the cost is per batch.
            self._conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise StorageError(
                f"cannot open the manifest {self.path}: {exc}; "
                "is it a multicloud manifest (an SQLite file)?"
            ) from exc
        if str(mode).lower() != "wal":
            # Some network file systems refuse WAL; SQLite then keeps a rollback journal,
            # which is still correct, only readers block writers.
            log.warning("manifest %s runs in %s journal mode, not WAL", self.path, mode)
        with self._transaction(write=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                log.debug("created manifest %s (schema v%d)", self.path, SCHEMA_VERSION)
            elif row[0] != SCHEMA_VERSION:
                raise StorageError(
                    f"manifest {self.path} has schema version {row[0]}, this multicloud reads "
                    f"version {SCHEMA_VERSION}; use the multicloud release that wrote it"
                )

    def close(self) -> None:
        """Close the connection; later calls raise StorageError. Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------

    def begin_batch(self, batch_id: str, source: str, source_cloud: str) -> None:
        """Record a batch as running; re-running an id drops its old files and chunk refs."""
        with self._transaction(write=True) as conn:
            # Blobs and replicas stay: they are shared, and the re-run will reference them.
            conn.execute("DELETE FROM file_chunks WHERE batch_id = ?", (batch_id,))
            conn.execute("DELETE FROM files WHERE batch_id = ?", (batch_id,))
            conn.execute(
                "INSERT INTO batches"
                " (batch_id, status, source, source_cloud, created_at, finished_at, result, seq)"
                " VALUES (?, 'running', ?, ?, ?, NULL, NULL,"
                "  (SELECT COALESCE(MAX(seq), 0) + 1 FROM batches))"
                " ON CONFLICT (batch_id) DO UPDATE SET"
                "  status = excluded.status, source = excluded.source,"
                "  source_cloud = excluded.source_cloud, created_at = excluded.created_at,"
                "  finished_at = NULL, result = NULL, seq = excluded.seq",
                (batch_id, source, source_cloud, time.time()),
            )

    def add_files(self, batch_id: str, files: list[FileEntry]) -> None:
        """Record the batch's source files (a path given again replaces its entry)."""
        rows = [(batch_id, f.path, f.size, f.chunk_count, f.digest) for f in files]
        with self._transaction(write=True) as conn:
            self._require_batch(conn, batch_id)
            conn.executemany(
                "INSERT OR REPLACE INTO files (batch_id, path, size, chunk_count, digest)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def add_chunks(self, batch_id: str, chunks: list[tuple[Chunk, BlobInfo]]) -> None:
        """Record where each chunk sits in its file and the blob it is stored as."""
        refs = []
        blobs = []
        for chunk, blob in chunks:
            if chunk.chunk_id != blob.chunk_id:
                raise StorageError(
                    f"chunk {chunk.file}#{chunk.index} has id {chunk.chunk_id} but its blob "
                    f"describes {blob.chunk_id}; pair each chunk with its own BlobInfo"
                )
            refs.append(
                (batch_id, chunk.file, chunk.index, chunk.offset, chunk.size_bytes, chunk.chunk_id)
            )
            blobs.append(
                (blob.chunk_id, blob.raw_size, blob.blob_size, blob.blob_checksum, blob.codec)
            )
        with self._transaction(write=True) as conn:
            self._require_batch(conn, batch_id)
            # Last write wins: the blob just written to the nodes is the one to verify against.
            conn.executemany(
                "INSERT INTO blobs (chunk_id, raw_size, blob_size, blob_checksum, codec)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (chunk_id) DO UPDATE SET"
                "  raw_size = excluded.raw_size, blob_size = excluded.blob_size,"
                "  blob_checksum = excluded.blob_checksum, codec = excluded.codec",
                blobs,
            )
            conn.executemany(
                "INSERT OR REPLACE INTO file_chunks"
                " (batch_id, path, idx, offset, size, chunk_id) VALUES (?, ?, ?, ?, ?, ?)",
                refs,
            )

    def add_replicas(self, pairs: list[tuple[str, str]]) -> None:
        """Record verified replicas as (chunk_id, node_id) pairs; known pairs are ignored."""
        if not pairs:
            return
        with self._transaction(write=True) as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO replicas (chunk_id, node_id) VALUES (?, ?)", pairs
            )

    def remove_replicas(self, pairs: list[tuple[str, str]]) -> None:
        """Forget replicas (lost, corrupt or moved); unknown pairs are ignored."""
        if not pairs:
            return
        with self._transaction(write=True) as conn:
            conn.executemany("DELETE FROM replicas WHERE chunk_id = ? AND node_id = ?", pairs)

    def finish_batch(
        self, batch_id: str, status: str, result: dict[str, Any] | None = None
    ) -> None:
        """Mark a batch "success" or "failed" and keep its result (stored as JSON)."""
        if status not in _FINAL_STATUSES:
            raise StorageError(
                f"cannot finish batch {batch_id!r} with status {status!r}: "
                f"expected one of {', '.join(_FINAL_STATUSES)}"
            )
        try:
            text = None if result is None else json.dumps(result, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StorageError(
                f"result of batch {batch_id!r} is not JSON-serialisable ({exc}); "
                "pass plain dicts, lists, strings and numbers, e.g. PipelineResult.to_dict()"
            ) from exc
        with self._transaction(write=True) as conn:
            self._require_batch(conn, batch_id)
            conn.execute(
                "UPDATE batches SET status = ?, finished_at = ?, result = ? WHERE batch_id = ?",
                (status, time.time(), text, batch_id),
            )

    # -- reads ----------------------------------------------------------------------------

    def batch(self, batch_id: str) -> BatchRecord:
        """The batch with this id; UnknownBatch names the known ones."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            if row is None:
                raise self._unknown_batch(conn, batch_id)
        return _batch_record(row)

    def batches(self) -> list[BatchRecord]:
        """Every batch, newest first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches ORDER BY seq DESC"
            ).fetchall()
        return [_batch_record(row) for row in rows]

    def files(self, batch_id: str) -> list[FileEntry]:
        """The batch's source files, sorted by path."""
        with self._transaction(write=False) as conn:
            self._require_batch(conn, batch_id)
            rows = conn.execute(
                "SELECT path, size, chunk_count, digest FROM files"
                " WHERE batch_id = ? ORDER BY path",
                (batch_id,),
            ).fetchall()
        return [FileEntry(path=p, size=s, chunk_count=n, digest=d) for p, s, n, d in rows]

    def chunks(self, batch_id: str) -> list[ChunkRecord]:
        """Every chunk reference of the batch, ordered by path and index."""
        with self._transaction(write=False) as conn:
            self._require_batch(conn, batch_id)
            rows = conn.execute(
                "SELECT fc.path, fc.idx, fc.offset, fc.size, fc.chunk_id,"
                "  b.blob_size, b.blob_checksum, b.codec"
                " FROM file_chunks AS fc JOIN blobs AS b ON b.chunk_id = fc.chunk_id"
                " WHERE fc.batch_id = ? ORDER BY fc.path, fc.idx",
                (batch_id,),
            ).fetchall()
        return [ChunkRecord(*row) for row in rows]

    def chunk_ids(self, batch_id: str) -> list[str]:
        """The distinct chunk ids the batch references, sorted."""
        with self._transaction(write=False) as conn:
            self._require_batch(conn, batch_id)
            rows = conn.execute(
                "SELECT DISTINCT chunk_id FROM file_chunks WHERE batch_id = ? ORDER BY chunk_id",
                (batch_id,),
            ).fetchall()
        return [row[0] for row in rows]

    def blob(self, chunk_id: str) -> BlobInfo | None:
        """How the chunk is stored, or None if no batch ever stored it."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT chunk_id, raw_size, blob_size, blob_checksum, codec FROM blobs"
                " WHERE chunk_id = ?",
                (chunk_id,),
            ).fetchone()
        return None if row is None else BlobInfo(*row)

    def replicas(self, chunk_ids: list[str] | None = None) -> dict[str, list[str]]:
        """Chunk id -> sorted node ids holding a replica.

        Every asked-for id is a key, with an empty list when no replica is recorded; with
        ``None``, the keys are every chunk that has a blob or a replica, so chunks that lost
        all their replicas show up too.
        """
        with self._transaction(write=False) as conn:
            if chunk_ids is None:
                found: dict[str, list[str]] = {
                    row[0]: [] for row in conn.execute("SELECT chunk_id FROM blobs")
                }
                pairs: list[tuple[str, str]] = conn.execute(
                    "SELECT chunk_id, node_id FROM replicas ORDER BY chunk_id, node_id"
                ).fetchall()
            else:
                found = {chunk_id: [] for chunk_id in chunk_ids}
                wanted = list(found)
                pairs = []
                for start in range(0, len(wanted), _IN_BATCH):
                    part = wanted[start : start + _IN_BATCH]
                    marks = ", ".join("?" * len(part))
                    pairs.extend(
                        conn.execute(
                            "SELECT chunk_id, node_id FROM replicas"
                            f" WHERE chunk_id IN ({marks}) ORDER BY chunk_id, node_id",
                            part,
                        ).fetchall()
                    )
        for chunk_id, node_id in pairs:
            found.setdefault(chunk_id, []).append(node_id)
        return found

    def chunks_on_node(self, node_id: str) -> list[str]:
        """The chunk ids the node holds a replica of, sorted."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT chunk_id FROM replicas WHERE node_id = ? ORDER BY chunk_id", (node_id,)
            ).fetchall()
        return [row[0] for row in rows]

    def node_usage(self) -> dict[str, tuple[int, int]]:
        """Node id -> (replica count, blob bytes) over every recorded replica."""
        with self._transaction(write=False) as conn:
            # LEFT JOIN: a replica recorded before its blob still counts, with 0 bytes.
            rows = conn.execute(
                "SELECT r.node_id, COUNT(*), COALESCE(SUM(b.blob_size), 0)"
                " FROM replicas AS r LEFT JOIN blobs AS b ON b.chunk_id = r.chunk_id"
                " GROUP BY r.node_id ORDER BY r.node_id"
            ).fetchall()
        return {node_id: (count, size) for node_id, count, size in rows}

    # -- internals ------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """Hold the lock for one transaction; sqlite3 failures surface as StorageError."""
        with self._lock:
            if self._closed:
                raise StorageError(f"manifest {self.path} is closed; open a new Manifest")
            conn = self._conn
            # Reads get a transaction too, so multi-statement reads see one snapshot even
            # while another process writes.
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise self._storage_error(exc) from exc
            try:
                yield conn
            except sqlite3.Error as exc:
                self._rollback()
                raise self._storage_error(exc) from exc
            except BaseException:
                self._rollback()
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._storage_error(exc) from exc

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already done so."""
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                # The original error is the one worth reporting; SQLite rolls back on close.
                log.exception("rollback failed on manifest %s", self.path)

    def _storage_error(self, exc: sqlite3.Error) -> StorageError:
        """Wrap a sqlite3 failure with the manifest's path and a hint."""
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc):
            return DiskFull(f"manifest {self.path} cannot be written: {exc}; free some "
                            f"space on its disk and run the command again")
        hint = (
            f"another process held the write lock for over {_BUSY_TIMEOUT_S:.0f}s; retry"
            if "locked" in str(exc) or "busy" in str(exc)
            else "check the disk and the file's permissions"
        )
        return StorageError(f"manifest {self.path} failed: {exc}; {hint}")

    def _require_batch(self, conn: sqlite3.Connection, batch_id: str) -> None:
        """Raise UnknownBatch unless the batch exists (called inside a transaction)."""
        if conn.execute("SELECT 1 FROM batches WHERE batch_id = ?", (batch_id,)).fetchone():
            return
        raise self._unknown_batch(conn, batch_id)

    @staticmethod
    def _unknown_batch(conn: sqlite3.Connection, batch_id: str) -> UnknownBatch:
        """The UnknownBatch error for ``batch_id``, naming the known batches newest first."""
        total = conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        if not total:
            return UnknownBatch(
                f"unknown batch {batch_id!r}: known batches: none yet; run `multicloud run` first"
            )
        known = [
            row[0]
            for row in conn.execute(
                "SELECT batch_id FROM batches ORDER BY seq DESC LIMIT ?", (_KNOWN_SHOWN,)
            )
        ]
        listed = ", ".join(known)
        if total > len(known):
            listed += f", ... and {total - len(known)} more"
        return UnknownBatch(f"unknown batch {batch_id!r}: known batches: {listed}")


_BATCH_COLUMNS = "batch_id, status, source, source_cloud, created_at, finished_at, result"


def _batch_record(row: tuple[Any, ...]) -> BatchRecord:
    """A BatchRecord from a row of ``_BATCH_COLUMNS``."""
    batch_id, status, source, source_cloud, created_at, finished_at, result = row
    return BatchRecord(
        batch_id=batch_id,
        status=status,
        source=source,
        source_cloud=source_cloud,
        created_at=created_at,
        finished_at=finished_at,
        result=None if result is None else json.loads(result),
    )
