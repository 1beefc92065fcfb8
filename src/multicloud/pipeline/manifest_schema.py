"""The manifest's tables, its records, and how rows and file names map to them.

Version 2 added batch fingerprints and leases, the batch's manifest object, file modes,
times, kinds and quarantine notes, and hints; version 3 where a file's piece starts in its
chunk (a small file packed with others), and the chunks whose records were found clean;
older files gain them when opened.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from multicloud.core.errors import IntegrityError, UsageError
from multicloud.core.types import FileEntry
from multicloud.core.units import display_path, is_utf8
from multicloud.pipeline.lease import owner_alive

SCHEMA_VERSION = 3

SCHEMA_V1 = (
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
# Version 1 manifests gain these on open; new ones are made with them.
SCHEMA_V2 = (
    "ALTER TABLE batches ADD COLUMN fingerprint TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE batches ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE batches ADD COLUMN heartbeat_at REAL",
    "ALTER TABLE batches ADD COLUMN manifest_object TEXT",
    "ALTER TABLE files ADD COLUMN mode INTEGER NOT NULL DEFAULT 420",
    "ALTER TABLE files ADD COLUMN mtime_ns INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE files ADD COLUMN kind TEXT NOT NULL DEFAULT 'file'",
    "ALTER TABLE files ADD COLUMN link_target",
    "ALTER TABLE files ADD COLUMN quarantine TEXT",
    # A replica a write could not place (node_id "*": no node was left to hint at).
    "CREATE TABLE hints ("
    " chunk_id TEXT NOT NULL,"
    " node_id TEXT NOT NULL,"
    " PRIMARY KEY (chunk_id, node_id)) WITHOUT ROWID",
)
# Where a file's piece starts in its chunk's raw bytes: 0 for a chunk cut from the file,
# the file's place in the pack for a small file packed with others (`size` is its length).
SCHEMA_V3 = (
    "ALTER TABLE file_chunks ADD COLUMN at INTEGER NOT NULL DEFAULT 0",
    # Chunks whose every record parsed where they stood (`Chunk.records_context`): a later
    # batch with the same chunk in the same place need not send it to be checked again.
    "CREATE TABLE clean_records ("
    " chunk_id TEXT NOT NULL,"
    " context TEXT NOT NULL,"
    " PRIMARY KEY (chunk_id, context)) WITHOUT ROWID",
)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch as the manifest knows it."""

    batch_id: str
    status: str  # "running", "interrupted", "success" or "failed"
    source: str  # the source URL or directory as given
    source_cloud: str
    created_at: float  # epoch seconds when the (latest) run began
    finished_at: float | None  # None while running
    result: dict[str, Any] | None  # what finish_batch recorded, usually PipelineResult.to_dict()
    fingerprint: str = ""  # the source listing the batch was run from
    owner: str = ""  # the lease holder while running ("host:pid:boot")
    heartbeat_at: float | None = None
    manifest_object: str | None = None  # the chunk id of its manifest on the nodes

    @property
    def lease_live(self) -> bool:
        """Whether a live process runs this batch now."""
        return self.status == "running" and owner_alive(self.owner, self.heartbeat_at)

    @property
    def state(self) -> str:
        """The status as a user should read it: a `running` batch whose process is gone
        (kill -9, a lost machine) is `stopped`, and resumes on the same command."""
        return "stopped" if self.status == "running" and not self.lease_live else self.status


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One chunk reference of a file, with the blob it is stored as.

    The file's bytes `[offset, offset + size)` are the chunk's raw bytes `[at, at + size)`:
    all of them for a chunk cut from the file, one member's for a pack of small files.
    """

    path: str
    index: int
    offset: int
    size: int  # raw bytes
    chunk_id: str
    blob_size: int
    blob_checksum: str
    codec: str
    at: int = 0
    raw_size: int = 0  # of the whole chunk (a pack's, for a packed file)

    @property
    def whole(self) -> bool:
        """Whether the file's piece is all of its chunk (not one file of a pack)."""
        return self.at == 0 and self.size == self.raw_size

    def piece(self, raw: bytes) -> tuple[bytes, str]:
        """This file's bytes out of the chunk's raw bytes (all of them, unless packed), and
        the id the file's digest lists for them: the chunk id for the whole chunk, else
        the SHA-256 of the piece (a packed file's own id, as if it were a chunk alone)."""
        if self.at == 0 and self.size == len(raw):
            return raw, self.chunk_id
        if self.at + self.size > len(raw):
            raise IntegrityError(f"chunk {self.chunk_id} holds {len(raw)} bytes, too few for "
                                 f"{self.size} bytes at {self.at} ({display_path(self.path)})")
        piece = raw[self.at:self.at + self.size]
        return piece, hashlib.sha256(piece).hexdigest()


BATCH_COLUMNS = ("batch_id, status, source, source_cloud, created_at, finished_at, result,"
                  " fingerprint, owner, heartbeat_at, manifest_object")
FILE_COLUMNS = "path, size, chunk_count, digest, mode, mtime_ns, kind, link_target, quarantine"


def batch_record(row: tuple[Any, ...]) -> BatchRecord:
    """A BatchRecord from a row of ``BATCH_COLUMNS``."""
    (batch_id, status, source, source_cloud, created_at, finished_at, result, fingerprint,
     owner, heartbeat_at, manifest_object) = row
    return BatchRecord(
        batch_id=batch_id,
        status=status,
        source=py_path(source),
        source_cloud=source_cloud,
        created_at=created_at,
        finished_at=finished_at,
        result=None if result is None else json.loads(result),
        fingerprint=fingerprint,
        owner=owner,
        heartbeat_at=heartbeat_at,
        manifest_object=manifest_object,
    )


def file_entry(row: tuple[Any, ...]) -> FileEntry:
    """A FileEntry from a row of ``FILE_COLUMNS``."""
    path, size, chunk_count, digest, mode, mtime_ns, kind, link_target, quarantine = row
    return FileEntry(path=py_path(path), size=size, chunk_count=chunk_count, digest=digest,
                     mode=mode, mtime_ns=mtime_ns, kind=kind,
                     link_target=None if link_target is None else py_path(link_target),
                     quarantine=quarantine)


def db_path(path: str) -> str | bytes:
    """How a file name is keyed: TEXT when it is UTF-8, else its raw bytes as a BLOB."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")
    return path


def py_path(value: str | bytes) -> str:
    """The Python name of a stored path (undecodable bytes as surrogate escapes)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


_MAX_BATCH_ID = 200


def check_batch_id(batch_id: str) -> str:
    """batch_id if it can name a batch everywhere (SQLite, JSON, a terminal), else UsageError."""
    if (not batch_id or len(batch_id) > _MAX_BATCH_ID or not batch_id.isprintable()
            or not is_utf8(batch_id)):
        raise UsageError(f"batch id {display_path(batch_id)!r} cannot be used: give 1 to "
                         f"{_MAX_BATCH_ID} printable UTF-8 characters, e.g. sales-2026-12")
    return batch_id
