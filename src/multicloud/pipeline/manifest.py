"""The durable record of what each batch stored and where its replicas live (SQLite).

Content model: a batch has files, a file has ordered chunks, a chunk id maps to one stored
blob, and replicas are (chunk id, node id) pairs shared by every batch that references the
chunk. One connection per ``Manifest``, guarded by a lock, serves all threads of a process;
WAL mode lets a later (or concurrent) process read what an earlier one committed.

Batch ids are immutable: `begin_batch` runs an id once, resumes it after a crash or an
interruption (its committed chunks stay), says when it is already done, and refuses it for
different content or while another live run holds its lease. File names that are not
UTF-8 (surrogate-escaped in Python) are stored as BLOBs, every other name as TEXT, so one
name always maps to one key and comes back exactly.

The manifest is a cache: `export_batch` gives a batch as plain data, which the catalogue
stores on the nodes, and `import_batch` puts it back (`multicloud recover`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from multicloud.core import clock
from multicloud.core.errors import (
    BatchExists,
    BatchLeased,
    DiskFull,
    StorageError,
    UnknownBatch,
    storage_error,
)
from multicloud.core.types import BlobInfo, Chunk, FileEntry
from multicloud.pipeline.lease import describe_owner
from multicloud.pipeline.manifest_schema import (
    BATCH_COLUMNS,
    FILE_COLUMNS,
    SCHEMA_V1,
    SCHEMA_V2,
    SCHEMA_V3,
    SCHEMA_VERSION,
    BatchRecord,
    ChunkRecord,
    batch_record,
    check_batch_id,
    db_path,
    file_entry,
    py_path,
)

__all__ = ["SCHEMA_VERSION", "BatchRecord", "ChunkRecord", "Manifest"]

log = logging.getLogger(__name__)

EXPORT_FORMAT = "multicloud-manifest/1"

# How long a writer waits for another process's write transaction before giving up.
_BUSY_TIMEOUT_S = 30.0
# Stays well under SQLite's host-parameter limit (999 on old builds) for IN (...) lookups.
_IN_BATCH = 500
# Longest list of known batch ids an UnknownBatch message spells out.
_KNOWN_SHOWN = 20
_FINAL_STATUSES = ("success", "failed", "interrupted")


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
                for statement in (*SCHEMA_V1, *SCHEMA_V2, *SCHEMA_V3):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                log.debug("created manifest %s (schema v%d)", self.path, SCHEMA_VERSION)
            elif row[0] in (1, 2):
                for statement in (*(SCHEMA_V2 if row[0] == 1 else ()), *SCHEMA_V3):
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                log.info("upgraded manifest %s to schema v%d", self.path, SCHEMA_VERSION)
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

    def begin_batch(self, batch_id: str, source: str, source_cloud: str, *,
                    fingerprint: str = "", owner: str = "", replace: bool = False) -> str:
        """Take the batch's lease and say how to run it: "new", "resume" or "done".

        - an unknown id is "new";
        - a completed id is "done" for the same fingerprint, refused (BatchExists) for
          another one unless ``replace``, which runs it anew;
        - a running id whose holder lives is refused (BatchLeased);
        - an id whose run did not complete is "resume" for the same fingerprint (its
          committed chunks stay), else "new" (its old chunk references are dropped).
        """
        check_batch_id(batch_id)
        with self._transaction(write=True) as conn:
            row = conn.execute(f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = ?",
                               (batch_id,)).fetchone()
            old = None if row is None else batch_record(row)
            mode = "new"
            if old is not None:
                # A fingerprint is "<content>:<chunking>": the same content is the same
                # batch, but only the same chunking too lets a run reuse committed chunks.
                same = bool(fingerprint) and fingerprint == old.fingerprint
                same_content = bool(fingerprint) and (fingerprint.split(":")[0]
                                                      == old.fingerprint.split(":")[0])
                if old.lease_live and old.owner != owner:
                    raise BatchLeased(
                        f"batch {batch_id!r} is being run by {describe_owner(old.owner)}; "
                        f"wait for it, stop it, or choose another --batch-id")
                if old.status == "success" and not replace:
                    if same_content:
                        return "done"
                    raise BatchExists(
                        f"batch {batch_id!r} already holds other content (run from "
                        f"{old.source}); batch ids are immutable: choose another --batch-id, "
                        f"or pass --replace to make {batch_id!r} name the new content")
                if same and old.status != "success":
                    mode = "resume"
            if mode == "new":
                # Blobs and replicas stay: they are shared, and the new run may use them.
                conn.execute("DELETE FROM file_chunks WHERE batch_id = ?", (batch_id,))
                conn.execute("DELETE FROM files WHERE batch_id = ?", (batch_id,))
            conn.execute(
                "INSERT INTO batches"
                " (batch_id, status, source, source_cloud, created_at, finished_at, result, seq,"
                "  fingerprint, owner, heartbeat_at, manifest_object)"
                " VALUES (?, 'running', ?, ?, ?, NULL, NULL,"
                "  (SELECT COALESCE(MAX(seq), 0) + 1 FROM batches), ?, ?, ?, NULL)"
                " ON CONFLICT (batch_id) DO UPDATE SET"
                "  status = excluded.status, source = excluded.source,"
                "  source_cloud = excluded.source_cloud, created_at = excluded.created_at,"
                "  finished_at = NULL, result = NULL, seq = excluded.seq,"
                "  fingerprint = excluded.fingerprint, owner = excluded.owner,"
                "  heartbeat_at = excluded.heartbeat_at, manifest_object = NULL",
                (batch_id, db_path(source), source_cloud, clock.wall(), fingerprint, owner,
                 clock.wall()),
            )
            return mode

    def renew_lease(self, batch_id: str, owner: str) -> bool:
        """Keep the batch's lease alive (a run calls this every few seconds); False when
        owner no longer holds it (another run took it over)."""
        with self._transaction(write=True) as conn:
            cursor = conn.execute(
                "UPDATE batches SET heartbeat_at = ? WHERE batch_id = ? AND owner = ?"
                " AND status = 'running'", (clock.wall(), batch_id, owner))
            return cursor.rowcount > 0

    def set_manifest_object(self, batch_id: str, chunk_id: str) -> None:
        """Record where the batch's manifest is stored on the nodes."""
        with self._transaction(write=True) as conn:
            self._require_batch(conn, batch_id)
            conn.execute("UPDATE batches SET manifest_object = ? WHERE batch_id = ?",
                         (chunk_id, batch_id))

    def delete_batch(self, batch_id: str) -> BatchRecord:
        """Forget a batch (its objects stay for gc); refused while a live run holds it."""
        with self._transaction(write=True) as conn:
            record = self._batch(conn, batch_id)
            if record.lease_live:
                raise BatchLeased(f"batch {batch_id!r} is being run by "
                                  f"{describe_owner(record.owner)}; stop that run first")
            for table in ("file_chunks", "files", "batches"):
                conn.execute(f"DELETE FROM {table} WHERE batch_id = ?", (batch_id,))
        return record

    def add_files(self, batch_id: str, files: list[FileEntry]) -> None:
        """Record the batch's source files (a path given again replaces its entry)."""
        rows = [(batch_id, db_path(f.path), f.size, f.chunk_count, f.digest, f.mode,
                 f.mtime_ns, f.kind, None if f.link_target is None else db_path(f.link_target),
                 f.quarantine) for f in files]
        with self._transaction(write=True) as conn:
            self._require_batch(conn, batch_id)
            conn.executemany(
                "INSERT OR REPLACE INTO files (batch_id, path, size, chunk_count, digest, mode,"
                " mtime_ns, kind, link_target, quarantine) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def set_quarantine(self, batch_id: str, reasons: dict[str, str]) -> None:
        """Note why each of these files was stored with records that do not parse."""
        with self._transaction(write=True) as conn:
            self._require_batch(conn, batch_id)
            conn.executemany("UPDATE files SET quarantine = ? WHERE batch_id = ? AND path = ?",
                             [(why, batch_id, db_path(path)) for path, why in reasons.items()])

    def add_chunks(self, batch_id: str, chunks: list[tuple[Chunk, BlobInfo]]) -> None:
        """Record where each chunk sits in its file and the blob it is stored as."""
        self.record_commits(batch_id, chunks, [])

    def record_commits(self, batch_id: str | None, chunks: list[tuple[Chunk, BlobInfo]],
                       replicas: Sequence[tuple[str, str]],
                       hints: Sequence[tuple[str, str]] = (),
                       unhints: Sequence[tuple[str, str]] = (),
                       clean: Sequence[tuple[str, str]] = ()) -> None:
        """Record committed chunks, their verified replicas, and the hints given and taken
        back, in one transaction: a crash never leaves a chunk recorded without the
        replicas that committed it (a resumed run skips recorded chunks), nor a chunk
        short of its factor without its hint."""
        refs: list[tuple[str | None, str | bytes, int, int, int, str, int]] = []
        blobs = []
        for chunk, blob in chunks:
            if chunk.chunk_id != blob.chunk_id:
                raise StorageError(
                    f"chunk {chunk.file}#{chunk.index} has id {chunk.chunk_id} but its blob "
                    f"describes {blob.chunk_id}; pair each chunk with its own BlobInfo"
                )
            if chunk.members:  # a pack: a row for each small file in it
                refs.extend((batch_id, db_path(m.file), 0, 0, m.size, chunk.chunk_id, m.at)
                            for m in chunk.members)
            else:
                refs.append((batch_id, db_path(chunk.file), chunk.index, chunk.offset,
                             chunk.size_bytes, chunk.chunk_id, 0))
            blobs.append(
                (blob.chunk_id, blob.raw_size, blob.blob_size, blob.blob_checksum, blob.codec)
            )
        with self._transaction(write=True) as conn:
            if hints:
                conn.executemany(
                    "INSERT OR IGNORE INTO hints (chunk_id, node_id) VALUES (?, ?)", hints)
            if refs and batch_id is not None:
                self._require_batch(conn, batch_id)
                # Last write wins: the blob just written to the nodes is the one to verify
                # against.
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
                    " (batch_id, path, idx, offset, size, chunk_id, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    refs,
                )
            if replicas:
                conn.executemany(
                    "INSERT OR IGNORE INTO replicas (chunk_id, node_id) VALUES (?, ?)",
                    replicas)
            if unhints:
                conn.executemany("DELETE FROM hints WHERE chunk_id = ? AND node_id = ?",
                                 unhints)
            if clean:
                conn.executemany(
                    "INSERT OR IGNORE INTO clean_records (chunk_id, context) VALUES (?, ?)",
                    clean)

    def add_blob(self, blob: BlobInfo) -> None:
        """Record how an object no file chunk names (a batch's manifest) is stored."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO blobs (chunk_id, raw_size, blob_size, blob_checksum,"
                " codec) VALUES (?, ?, ?, ?, ?)",
                (blob.chunk_id, blob.raw_size, blob.blob_size, blob.blob_checksum, blob.codec))

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
        self, batch_id: str, status: str, result: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> None:
        """Mark a batch "success", "failed" or "interrupted", keep its result (as JSON) and
        release its lease. With owner, only while owner holds the lease (BatchLeased if
        another run took it over)."""
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
            fence = "" if owner is None else " AND owner = ?"
            cursor = conn.execute(
                "UPDATE batches SET status = ?, finished_at = ?, result = ?, owner = ''"
                " WHERE batch_id = ?" + fence,
                (status, clock.wall(), text, batch_id, *(() if owner is None else (owner,))),
            )
            if not cursor.rowcount:
                raise BatchLeased(f"batch {batch_id!r} is no longer this run's: another run "
                                  f"took it over, and its run decides the batch")

    # -- reads ----------------------------------------------------------------------------

    def batch(self, batch_id: str) -> BatchRecord:
        """The batch with this id; UnknownBatch names the known ones."""
        with self._transaction(write=False) as conn:
            return self._batch(conn, batch_id)

    def batches(self) -> list[BatchRecord]:
        """Every batch, newest first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches ORDER BY seq DESC"
            ).fetchall()
        return [batch_record(row) for row in rows]

    def files(self, batch_id: str) -> list[FileEntry]:
        """The batch's source files, sorted by path."""
        with self._transaction(write=False) as conn:
            self._require_batch(conn, batch_id)
            rows = conn.execute(
                f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = ?", (batch_id,)
            ).fetchall()
        return sorted((file_entry(row) for row in rows), key=lambda f: f.path)

    def chunks(self, batch_id: str) -> list[ChunkRecord]:
        """Every chunk reference of the batch, ordered by path and index."""
        with self._transaction(write=False) as conn:
            self._require_batch(conn, batch_id)
            rows = conn.execute(
                "SELECT fc.path, fc.idx, fc.offset, fc.size, fc.chunk_id,"
                "  b.blob_size, b.blob_checksum, b.codec, fc.at, b.raw_size"
                " FROM file_chunks AS fc JOIN blobs AS b ON b.chunk_id = fc.chunk_id"
                " WHERE fc.batch_id = ? ORDER BY fc.path, fc.idx",
                (batch_id,),
            ).fetchall()
        records = [ChunkRecord(py_path(row[0]), *row[1:]) for row in rows]
        records.sort(key=lambda r: (r.path, r.index))
        return records

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

    # -- hints: replicas a write could not place, replayed when nodes come back -----------

    def add_hints(self, pairs: list[tuple[str, str]]) -> None:
        """Remember (chunk_id, node_id) replicas still owed ("*": any node will do)."""
        if not pairs:
            return
        with self._transaction(write=True) as conn:
            conn.executemany("INSERT OR IGNORE INTO hints (chunk_id, node_id) VALUES (?, ?)",
                             pairs)

    def hints(self) -> dict[str, list[str]]:
        """Chunk id -> the node ids hinted for it, sorted."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT chunk_id, node_id FROM hints ORDER BY chunk_id, node_id").fetchall()
        found: dict[str, list[str]] = {}
        for chunk_id, node_id in rows:
            found.setdefault(chunk_id, []).append(node_id)
        return found

    def remove_hints(self, pairs: list[tuple[str, str]]) -> None:
        """Forget hints that were replayed; unknown pairs are ignored."""
        if not pairs:
            return
        with self._transaction(write=True) as conn:
            conn.executemany("DELETE FROM hints WHERE chunk_id = ? AND node_id = ?", pairs)

    # -- what gc may not take -------------------------------------------------------------

    def referenced_chunk_ids(self) -> tuple[set[str], bool]:
        """Chunk ids of every batch still recorded (their manifests included), and whether
        a live run is in progress (its fresh writes may not be recorded yet).

        A batch that did not finish (killed, interrupted, failed) keeps its chunks: they
        were committed, and the same command resumes from them. Only `delete` lets them go.
        """
        with self._transaction(write=False) as conn:
            batches = [batch_record(row) for row in
                       conn.execute(f"SELECT {BATCH_COLUMNS} FROM batches").fetchall()]
            ids: set[str] = {b.manifest_object for b in batches
                             if b.status == "success" and b.manifest_object}
            ids.update(row[0] for row in conn.execute(
                "SELECT DISTINCT chunk_id FROM file_chunks"))
        return ids, any(b.lease_live for b in batches)

    def stored(self, chunk_id: str, context: str | None) -> tuple[BlobInfo, list[str]] | None:
        """How a chunk is stored and the nodes with a verified replica of it, if some batch
        stored it (and, given a records context, found its records clean there)."""
        with self._transaction(write=False) as conn:
            if context is not None and conn.execute(
                    "SELECT 1 FROM clean_records WHERE chunk_id = ? AND context = ?",
                    (chunk_id, context)).fetchone() is None:
                return None
            row = conn.execute("SELECT raw_size, blob_size, blob_checksum, codec FROM blobs"
                               " WHERE chunk_id = ?", (chunk_id,)).fetchone()
            if row is None:
                return None
            holders = [n for (n,) in conn.execute(
                "SELECT node_id FROM replicas WHERE chunk_id = ? ORDER BY node_id",
                (chunk_id,))]
        return BlobInfo(chunk_id, *row), holders

    def forget_chunks(self, chunk_ids: list[str]) -> None:
        """Drop the blob, replica and hint rows of chunks gc removed from every node."""
        with self._transaction(write=True) as conn:
            for table in ("blobs", "replicas", "hints", "clean_records"):
                conn.executemany(f"DELETE FROM {table} WHERE chunk_id = ?",
                                 [(c,) for c in chunk_ids])

    # -- the manifest as data, for the copy kept on the nodes -----------------------------

    def export_batch(self, batch_id: str, status: str | None = None,
                     result: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to restore the batch, as JSON-ready data (``status`` and
        ``result`` as they will be once the batch is finished, when given)."""
        with self._transaction(write=False) as conn:
            record = self._batch(conn, batch_id)
            files = [file_entry(r) for r in conn.execute(
                f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = ?", (batch_id,))]
            refs = conn.execute(
                "SELECT path, idx, offset, size, chunk_id, at FROM file_chunks"
                " WHERE batch_id = ?", (batch_id,)).fetchall()
            blobs = conn.execute(
                "SELECT b.chunk_id, b.raw_size, b.blob_size, b.blob_checksum, b.codec"
                " FROM blobs AS b WHERE b.chunk_id IN"
                " (SELECT chunk_id FROM file_chunks WHERE batch_id = ?)", (batch_id,)).fetchall()
            replicas = conn.execute(
                "SELECT chunk_id, node_id FROM replicas WHERE chunk_id IN"
                " (SELECT chunk_id FROM file_chunks WHERE batch_id = ?)"
                " ORDER BY chunk_id, node_id", (batch_id,)).fetchall()
        placement: dict[str, list[str]] = {}
        for chunk_id, node_id in replicas:
            placement.setdefault(chunk_id, []).append(node_id)
        return {
            "format": EXPORT_FORMAT,
            "batch": {"batch_id": record.batch_id, "status": status or record.status,
                      "source": record.source, "source_cloud": record.source_cloud,
                      "created_at": record.created_at,
                      "finished_at": record.finished_at or clock.wall(),
                      "fingerprint": record.fingerprint,
                      "result": record.result if result is None else result},
            "files": sorted([f.path, f.size, f.chunk_count, f.digest, f.mode, f.mtime_ns,
                              f.kind, f.link_target, f.quarantine] for f in files),
            # A packed file's row has a sixth field, where it starts in its pack.
            "chunks": sorted([py_path(p), i, o, n, c, *([at] if at else [])]
                             for p, i, o, n, c, at in refs),
            "blobs": {c: [raw, size, checksum, codec] for c, raw, size, checksum, codec in blobs},
            "replicas": placement,
        }

    def import_batch(self, data: dict[str, Any], manifest_object: str | None = None) -> str:
        """Put back a batch `export_batch` gave (replacing what this cache knows of it)."""
        if data.get("format") != EXPORT_FORMAT:
            raise StorageError(f"not a multicloud batch manifest (format "
                               f"{data.get('format')!r}, expected {EXPORT_FORMAT!r})")
        try:
            batch = data["batch"]
            batch_id = str(batch["batch_id"])
            files = [FileEntry(*row) for row in data["files"]]
            refs = [(batch_id, db_path(p), i, o, n, c, int(at[0]) if at else 0)
                    for p, i, o, n, c, *at in data["chunks"]]
            blobs = [(c, *v) for c, v in data["blobs"].items()]
            pairs = [(c, n) for c, nodes in data["replicas"].items() for n in nodes]
            result = batch.get("result")
            row = (batch_id, batch["status"], db_path(batch["source"]), batch["source_cloud"],
                   batch["created_at"], batch.get("finished_at"),
                   None if result is None else json.dumps(result, sort_keys=True),
                   batch.get("fingerprint", ""), manifest_object)
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"batch manifest is damaged ({exc!r}); try another "
                               f"replica or `multicloud recover` again") from exc
        with self._transaction(write=True) as conn:
            here = conn.execute(f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = ?",
                                (batch_id,)).fetchone()
            if here is not None and batch_record(here).lease_live:
                # A run here holds it (e.g. --replace): its rows are the truth until it ends.
                raise BatchLeased(f"batch {batch_id!r} is being run by "
                                  f"{describe_owner(batch_record(here).owner)}; recover it "
                                  f"once that run has ended")
            for table in ("file_chunks", "files", "batches"):
                conn.execute(f"DELETE FROM {table} WHERE batch_id = ?", (batch_id,))
            conn.execute(
                "INSERT INTO batches (batch_id, status, source, source_cloud, created_at,"
                " finished_at, result, fingerprint, manifest_object, seq) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM batches))",
                row)
            conn.executemany(
                "INSERT OR REPLACE INTO files (batch_id, path, size, chunk_count, digest, mode,"
                " mtime_ns, kind, link_target, quarantine) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(batch_id, db_path(f.path), f.size, f.chunk_count, f.digest, f.mode,
                  f.mtime_ns, f.kind, None if f.link_target is None else db_path(f.link_target),
                  f.quarantine) for f in files])
            conn.executemany(
                "INSERT OR REPLACE INTO file_chunks (batch_id, path, idx, offset, size, chunk_id,"
                " at) VALUES (?, ?, ?, ?, ?, ?, ?)", refs)
            conn.executemany(
                "INSERT OR IGNORE INTO blobs (chunk_id, raw_size, blob_size, blob_checksum,"
                " codec) VALUES (?, ?, ?, ?, ?)", blobs)
            conn.executemany("INSERT OR IGNORE INTO replicas (chunk_id, node_id) VALUES (?, ?)",
                             pairs)
        return batch_id

    # -- internals ------------------------------------------------------------------------

    def _batch(self, conn: sqlite3.Connection, batch_id: str) -> BatchRecord:
        row = conn.execute(f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = ?",
                           (batch_id,)).fetchone()
        if row is None:
            raise self._unknown_batch(conn, batch_id)
        return batch_record(row)

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

