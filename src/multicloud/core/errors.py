"""The one exception tree of multicloud.

Library code raises these; the CLI renders any of them as one line and exits 2.
Every message names the bad value, what would be valid, and what to do about it.

    MulticloudError
    ├── ConfigError              invalid YAML, unknown key, bad value
    ├── SourceError              missing or unreadable source data
    │   └── SourceChanged        a source file or object changed while the run read it
    ├── ValidationFailed         a chunk's records do not parse
    ├── ClusterError
    │   ├── NodeUnavailable      a node is down, unhealthy or cut off
    │   ├── SourceLost           the processing node holding a staged chunk failed
    │   ├── ReplicaRefused       a target did not store a replica (its cause attached)
    │   ├── InsufficientNodes    fewer healthy nodes or clouds than the policy needs
    │   ├── TransferTimeout      a transfer took longer than its adaptive timeout
    │   └── QuorumNotReached     a chunk could not get write_quorum verified replicas
    ├── StorageError
    │   ├── InvalidChunkId       an id that is not 64 lowercase hex characters
    │   ├── IntegrityError       bytes whose checksum does not match
    │   ├── ChunkNotFound        a node does not hold the asked-for chunk
    │   ├── DiskFull             a disk (a node's or the manifest's) has no room left
    │   ├── UnknownBatch         a batch id the manifest does not know
    │   └── CloudError           an object store (S3, GCS, Azure Blob) failed a request
    │       ├── CloudAuthError   credentials missing, or refused by the store
    │       ├── ObjectMissing    no such bucket, container or object
    │       ├── ObjectExists     a create-only write found the object already there
    │       └── ObjectChanged    the object is no longer the version that was asked for
    ├── BatchConflict
    │   ├── BatchExists          a completed batch id given for different content
    │   └── BatchLeased          another live run holds the batch
    ├── RestoreError             a file could not be rebuilt from any replica
    ├── ProfileError             a profiling request that cannot be measured
    └── UsageError               a command line that cannot be run as given

Errors cross process boundaries: a node's handler raises one, the carrier (in-process or
HTTP) sends `to_wire(exc)` and the caller raises `from_wire(...)`, the same class with the
same message, whichever way the message travelled.
"""

from __future__ import annotations

import errno
from typing import Any


class MulticloudError(Exception):
    """Base of every error multicloud raises on purpose."""


class ConfigError(MulticloudError):
    """A configuration file or value is invalid."""


class SourceError(MulticloudError):
    """The source data cannot be found or read."""


class SourceChanged(SourceError):
    """A source file or object changed while the run was reading it: its chunks would mix
    two versions, so the run stops (run it again to store the new version)."""


class ValidationFailed(MulticloudError):
    """A chunk failed validation (its records do not parse, or its checksum is wrong)."""


class ClusterError(MulticloudError):
    """The cluster cannot do what was asked."""


class NodeUnavailable(ClusterError):
    """A node is down, marked unhealthy, or cut off by a partition."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(f"node {node_id} is unavailable: {reason}")
        self.node_id = node_id
        self.reason = reason


class InsufficientNodes(ClusterError):
    """Fewer healthy nodes or clouds than the replication policy needs."""


class TransferTimeout(ClusterError):
    """A transfer did not finish within its adaptive timeout."""

    def __init__(self, src: str, dst: str, timeout_s: float) -> None:
        super().__init__(f"transfer {src} -> {dst} timed out after {timeout_s:.2f}s")
        self.src = src
        self.dst = dst
        self.timeout_s = timeout_s


class SourceLost(ClusterError):
    """The processing node holding a chunk's staged blob failed before quorum."""


class ReplicaRefused(ClusterError):
    """A target node did not store a replica: down, cut off, out of room, too slow, or the
    bytes arrived damaged. The pushing node is not at fault; `cause` says what happened."""

    def __init__(self, node_id: str, chunk_id: str, cause: MulticloudError) -> None:
        super().__init__(f"node {node_id} did not store chunk {chunk_id[:12]}: {cause}")
        self.node_id = node_id
        self.chunk_id = chunk_id
        self.cause = cause


class QuorumNotReached(ClusterError):
    """A chunk could not reach write_quorum verified replicas."""


class StorageError(MulticloudError):
    """A chunk store or the manifest refused or failed an operation."""


class InvalidChunkId(StorageError):
    """A chunk id that is not 64 lowercase hexadecimal characters."""

    def __init__(self, chunk_id: str) -> None:
        shown = chunk_id if len(chunk_id) <= 80 else chunk_id[:77] + "..."
        super().__init__(
            f"invalid chunk id {shown!r}: expected 64 lowercase hex characters (a SHA-256)"
        )
        self.chunk_id = chunk_id


class IntegrityError(StorageError):
    """Bytes whose checksum does not match the expected one."""


class ChunkNotFound(StorageError):
    """A node does not hold the chunk that was asked for."""


class DiskFull(StorageError):
    """A disk has no room (or no quota) left for a write; nothing was half-written."""


class UnknownBatch(StorageError):
    """The manifest has no batch with this id."""


class CloudError(StorageError):
    """An object store failed a request after its retries (5xx, throttling, the network).

    A StorageError, so a node whose bucket fails is treated like a node whose disk fails.
    Messages name the store by its URL and never carry credentials.
    """


class CloudAuthError(CloudError):
    """The store found no credentials, or refused the ones it was given."""


class ObjectMissing(CloudError):
    """No such bucket, container or object."""


class ObjectExists(CloudError):
    """A create-only write found an object already at that key (nothing was replaced)."""


class ObjectChanged(CloudError):
    """The object is no longer the version (ETag, generation) the caller asked for."""


class BatchConflict(MulticloudError):
    """A batch id cannot be run now as asked."""


class BatchExists(BatchConflict):
    """The batch id names a completed batch with different content; batch ids are immutable."""


class BatchLeased(BatchConflict):
    """Another live run holds the batch's lease (its owner is in the message)."""


class RestoreError(MulticloudError):
    """One or more files could not be rebuilt from any replica."""


class ProfileError(MulticloudError):
    """A profiling request that cannot be measured (no runs, or a run that fails)."""


class UsageError(MulticloudError):
    """A command line that cannot be run as given (a missing option, a bad value)."""


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def storage_error(exc: OSError, what: str) -> StorageError:
    """The tree's error for an OSError; `what` failed ("node x cannot write chunk y")."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_ROOM:
        return DiskFull(f"{what}: {reason}; free some space and run again")
    return StorageError(f"{what}: {reason}")


# Wire codes, one per class that crosses a process boundary; the most specific class wins.
_CODES: dict[type[MulticloudError], str] = {
    InvalidChunkId: "invalid_id",
    ChunkNotFound: "not_found",
    IntegrityError: "integrity",
    DiskFull: "disk_full",
    UnknownBatch: "unknown_batch",
    CloudAuthError: "cloud_auth",
    ObjectMissing: "object_missing",
    ObjectExists: "object_exists",
    ObjectChanged: "object_changed",
    CloudError: "cloud",
    StorageError: "storage",
    ValidationFailed: "validation",
    NodeUnavailable: "node_unavailable",
    SourceLost: "source_lost",
    InsufficientNodes: "insufficient_nodes",
    TransferTimeout: "transfer_timeout",
    QuorumNotReached: "quorum",
    ClusterError: "cluster",
    ConfigError: "config",
    SourceChanged: "source_changed",
    SourceError: "source",
    RestoreError: "restore",
    BatchExists: "batch_exists",
    BatchLeased: "batch_leased",
    BatchConflict: "batch_conflict",
    MulticloudError: "error",
}
_CLASSES = {code: cls for cls, code in _CODES.items()}


def error_code(exc: MulticloudError) -> str:
    """The wire code of an error (the code of its nearest ancestor with one)."""
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return "error"  # pragma: no cover - every MulticloudError has MulticloudError in its mro


def to_wire(exc: MulticloudError) -> dict[str, Any]:
    """A JSON-ready description of exc that `from_wire` turns back into the same error."""
    body: dict[str, Any] = {"error": error_code(exc), "message": str(exc)}
    if isinstance(exc, NodeUnavailable):
        body.update(node_id=exc.node_id, reason=exc.reason)
    elif isinstance(exc, InvalidChunkId):
        body["chunk_id"] = exc.chunk_id
    elif isinstance(exc, TransferTimeout):
        body.update(src=exc.src, dst=exc.dst, timeout_s=exc.timeout_s)
    return body


def from_wire(body: dict[str, Any]) -> MulticloudError:
    """The error a `to_wire` body describes (a plain MulticloudError for unknown codes)."""
    code = str(body.get("error", ""))
    message = str(body.get("message") or code or "unknown error")
    cls = _CLASSES.get(code, MulticloudError)
    if cls is NodeUnavailable:
        return NodeUnavailable(str(body.get("node_id", "?")), str(body.get("reason", message)))
    if cls is InvalidChunkId:
        return InvalidChunkId(str(body.get("chunk_id", message)))
    if cls is TransferTimeout:
        return TransferTimeout(str(body.get("src", "?")), str(body.get("dst", "?")),
                               float(body.get("timeout_s", 0.0)))
    return cls(message)
