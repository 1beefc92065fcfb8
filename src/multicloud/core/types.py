"""The plain records that flow between the stages, and the results users get back."""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PipelineStatus(enum.StrEnum):
    """Lifecycle of one orchestrator."""

    IDLE = "idle"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class NodeStatus(enum.StrEnum):
    """Health of a node; compares equal to the plain strings "healthy" / "unhealthy"."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Stage(enum.StrEnum):
    """The four pipeline stages, in order."""

    INGESTION = "ingestion"
    PROCESSING = "processing"
    DISTRIBUTION = "distribution"
    STORAGE = "storage"


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a chunk's raw bytes are in a bucket, for the node that reads them itself.

    The orchestrator sends this instead of the bytes (bytes then never pass through its
    machine); the node reads `[offset, offset + size)` of `key` pinned to `version`, so an
    object that changes during the run is detected instead of mixed.
    """

    store: str  # the source's bucket URL with its prefix ("s3://logs/2026/11/")
    key: str  # the object's key relative to that prefix
    version: str | None  # ETag or generation when listed
    # How to reach the store (endpoint, allow_http, region, retries; never secrets): the
    # node takes credentials from its own environment.
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"store": self.store, "key": self.key, "version": self.version,
                "options": self.options}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SourceRef:
        """The SourceRef a `to_json` view describes."""
        return cls(str(raw["store"]), str(raw["key"]),
                   None if raw.get("version") is None else str(raw["version"]),
                   dict(raw.get("options") or {}))

    @property
    def placement_key(self) -> str:
        """A stable stand-in for the chunk id until the node has hashed the bytes: which
        node reads the chunk is chosen by it, the same on every run of the same object."""
        return hashlib.sha256(f"{self.store}\0{self.key}\0{self.version}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PackMember:
    """A small file packed into a shared chunk with others: its bytes are the pack's raw
    bytes `[at, at + size)` (backup tools such as restic and borg pack small files so)."""

    file: str  # path relative to the batch source, as Chunk.file
    at: int
    size: int
    record_format: str | None = None  # "jsonl" / "csv": the node checks its records
    path: Path | None = field(default=None, compare=False)  # to re-read it; not sent

    def to_json(self) -> list[Any]:
        """A JSON-ready view (the `process` request carries it)."""
        return [self.file, self.at, self.size, self.record_format]

    @classmethod
    def from_json(cls, raw: list[Any]) -> PackMember:
        """The PackMember a `to_json` view describes."""
        file, at, size, record_format = raw
        return cls(str(file), int(at), int(size),
                   None if record_format is None else str(record_format))


@dataclass(slots=True)
class Chunk:
    """A fixed-size piece of one source file, identified by the SHA-256 of its raw bytes."""

    chunk_id: str  # SHA-256 hex of the raw bytes ("" until a node read a SourceRef chunk)
    file: str  # path relative to the batch source, with forward slashes
    index: int  # position of the chunk within its file
    offset: int  # byte offset within the file
    size_bytes: int
    source_cloud: str  # cloud the source bucket lives in
    path: Path | None = None  # where to re-read the raw bytes from; None for in-memory data
    record_format: str | None = None  # "jsonl" / "csv" when records are validated
    csv_columns: int | None = None  # field count from the CSV header, for later chunks
    at_file_end: bool = True  # whether the chunk's last line is complete by construction
    # The unfinished last line of the file's previous chunk (b"" when that chunk ended on a
    # newline, None when unknown), so the line that straddles the boundary is validated
    # here, by the chunk it ends in.
    line_prefix: bytes | None = field(default=None, repr=False)
    # xxh3-128 hex of the raw bytes, taken by ingestion with the SHA-256, so processing
    # can check the bytes arrived intact without a second SHA-256 pass (None: use SHA-256).
    raw_xxh3: str | None = None
    # The raw bytes while they are in flight; dropped once processed.
    data: bytes | memoryview | None = field(default=None, repr=False, compare=False)
    # In a bucket: the processing node reads the bytes itself (data and path stay None).
    source_ref: SourceRef | None = None
    # A pack of small files (their bytes one after another): who is where. `file` then
    # only names the pack in messages, and index and offset are 0.
    members: tuple[PackMember, ...] = ()

    @property
    def placement_key(self) -> str:
        """What ranks the nodes that may process the chunk: its id, or for a chunk not yet
        read, its place in the source (the same object range on every run)."""
        if self.chunk_id or self.source_ref is None:
            return self.chunk_id
        return hashlib.sha256(f"{self.source_ref.placement_key}:{self.offset}".encode()
                              ).hexdigest()

    @property
    def checksum(self) -> str:
        """SHA-256 hex of the raw bytes (the chunk id)."""
        return self.chunk_id

    @property
    def records_context(self) -> str | None:
        """What checking the chunk's records depends on besides its bytes, as a key (None
        when it has no records to check): its format, where it stands in its file and the
        line carried into it; for a pack, where each file with records is in it."""
        if self.members:
            formats = [m.to_json()[1:] for m in self.members if m.record_format is not None]
            if not formats:
                return None
            described = repr(formats).encode()
        elif self.record_format is not None:
            prefix = self.line_prefix if self.offset > 0 else b""
            described = repr((self.record_format, self.offset > 0, self.at_file_end,
                              self.csv_columns, prefix)).encode()
        else:
            return None
        return hashlib.sha256(described).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        """The metadata a processing node needs (never the bytes nor the local path)."""
        meta: dict[str, Any] = {name: getattr(self, name) for name in _CHUNK_FIELDS}
        prefix = self.line_prefix
        if prefix is not None and len(prefix) <= MAX_PREFIX_ON_WIRE:
            meta["line_prefix"] = base64.b64encode(prefix).decode()
        if self.source_ref is not None:
            meta["source_ref"] = self.source_ref.to_json()
        if self.members:
            meta["members"] = [member.to_json() for member in self.members]
        return meta

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Chunk:
        """The Chunk a `to_json` view describes (without data or path)."""
        prefix = raw.get("line_prefix")
        fields: dict[str, Any] = {name: raw.get(name) for name in _CHUNK_FIELDS}
        ref = raw.get("source_ref")
        return cls(**fields,
                   line_prefix=base64.b64decode(prefix) if prefix is not None else None,
                   source_ref=SourceRef.from_json(ref) if ref is not None else None,
                   members=tuple(PackMember.from_json(m) for m in raw.get("members") or ()))


_CHUNK_FIELDS = ("chunk_id", "file", "index", "offset", "size_bytes", "source_cloud",
                 "record_format", "csv_columns", "at_file_end", "raw_xxh3")
# An unfinished line carried from the previous chunk travels with the chunk when it is
# short; a longer one is left out, and that one boundary line goes unchecked.
MAX_PREFIX_ON_WIRE = 4096


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What processing made of a chunk: the stored form, staged on the processing node."""

    chunk_id: str
    raw_size: int
    blob_size: int
    blob_checksum: str  # xxh3-128 hex of the whole blob, checked by every receiver
    codec: str  # "raw", "zstd", "zstd+aes256gcm", ...

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BlobInfo:
        """The BlobInfo a `to_json` view describes."""
        return cls(**raw)


@dataclass(slots=True)
class ProcessedChunk:
    """The outcome of processing one chunk on a worker node."""

    chunk: Chunk
    node_id: str  # the node holding the staged blob
    result: BlobInfo | None  # None when processing failed
    latency_s: float = 0.0
    error: str | None = None
    # Why the chunk's records did not validate, e.g. "line 1234: not valid JSON: ...", when
    # it was stored as it is all the same (`processing.on_invalid_records: quarantine`).
    invalid: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    """A node's confirmation that it verified a blob and made it durable."""

    node_id: str
    chunk_id: str
    blob_checksum: str
    blob_size: int
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ReplicaAck:
        """The ReplicaAck a `to_json` view describes."""
        return cls(**raw)


@dataclass(slots=True)
class DistributedChunk:
    """A chunk whose replicas reached write quorum (the rest may still be in flight)."""

    chunk: Chunk
    blob: BlobInfo
    source_node: str
    replicas: list[ReplicaAck]
    failed_targets: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StoredChunk:
    """A chunk committed to the manifest with its verified replicas."""

    chunk: Chunk
    blob: BlobInfo
    replicas: list[str]
    committed: bool


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One source file of a batch (also the 0-byte ones, which have no chunks)."""

    path: str  # relative, forward slashes; a name that is not UTF-8 keeps its bytes as
    # surrogate escapes (os.fsdecode), so it is restored exactly
    size: int
    chunk_count: int
    digest: str  # SHA-256 over the concatenated chunk ids: a whole-file check
    mode: int = 0o644  # permission bits, restored
    mtime_ns: int = 0  # modification time, restored (0: unknown, left as restore time)
    kind: str = "file"  # "file" or "symlink" (a link has no chunks; link_target is it)
    link_target: str | None = None
    quarantine: str | None = None  # why its records did not validate, when they did not


@dataclass(slots=True)
class PipelineResult:
    """What run_pipeline returns."""

    status: str  # "success" or "failed"
    batch_id: str = ""
    duration_seconds: float = 0.0
    chunks_processed: int = 0
    bytes_processed: int = 0
    files: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "status": self.status,
            "batch_id": self.batch_id,
            "duration_seconds": self.duration_seconds,
            "chunks_processed": self.chunks_processed,
            "bytes_processed": self.bytes_processed,
            "files": self.files,
            "metrics": self.metrics,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class ReplicaProblem:
    """A replica that is missing, corrupt, or on a node that cannot be reached."""

    chunk_id: str
    node_id: str
    problem: str  # "missing", "corrupt" or "unavailable"
    detail: str = ""


@dataclass(slots=True)
class VerifyReport:
    """Result of checking every replica of a batch."""

    batch_id: str
    chunks: int = 0
    replicas_checked: int = 0
    replicas_ok: int = 0
    problems: list[ReplicaProblem] = field(default_factory=list)
    status: str = "success"  # the batch's status: only "success" is complete
    under_replicated: int = 0  # chunks with fewer verified replicas than the policy wants

    @property
    def complete(self) -> bool:
        """Whether the batch finished (an interrupted or failed one is never ok)."""
        return self.status == "success"

    @property
    def ok(self) -> bool:
        """True for a complete batch with nothing missing or corrupt and every chunk at its
        replication factor of verified replicas (a replica on a node that is down is
        reported, and counts against a chunk only when it leaves it short)."""
        return (self.complete and self.under_replicated == 0
                and all(p.problem == "unavailable" for p in self.problems))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "batch_id": self.batch_id,
            "ok": self.ok,
            "status": self.status,
            "complete": self.complete,
            "under_replicated": self.under_replicated,
            "chunks": self.chunks,
            "replicas_checked": self.replicas_checked,
            "replicas_ok": self.replicas_ok,
            "problems": [
                {"chunk_id": p.chunk_id, "node_id": p.node_id, "problem": p.problem,
                 "detail": p.detail}
                for p in self.problems
            ],
        }


@dataclass(slots=True)
class RestoreReport:
    """Result of rebuilding a batch's files."""

    batch_id: str
    files_restored: int = 0
    bytes_restored: int = 0
    skipped_replicas: list[ReplicaProblem] = field(default_factory=list)
    failed_files: list[str] = field(default_factory=list)
    # Symlinks a restore into a bucket left out: object stores have no links.
    skipped_links: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "batch_id": self.batch_id,
            "files_restored": self.files_restored,
            "bytes_restored": self.bytes_restored,
            "skipped_links": self.skipped_links,
            "skipped_replicas": [
                {"chunk_id": p.chunk_id, "node_id": p.node_id, "problem": p.problem,
                 "detail": p.detail}
                for p in self.skipped_replicas
            ],
            "failed_files": self.failed_files,
        }
