"""The one exception tree of multicloud.

Library code raises these; the CLI renders any of them as one line and exits 2.
Every message names the bad value, what would be valid, and what to do about it.

    MulticloudError
    ├── ConfigError              invalid YAML, unknown key, bad value
    ├── SourceError              missing or unreadable source data
    ├── ValidationFailed         a chunk's records do not parse
    ├── ClusterError
    │   ├── NodeUnavailable      a node is down, unhealthy or cut off
    │   ├── InsufficientNodes    fewer healthy nodes or clouds than the policy needs
    │   ├── TransferTimeout      a transfer took longer than its adaptive timeout
    │   └── QuorumNotReached     a chunk could not get write_quorum verified replicas
    ├── StorageError
    │   ├── InvalidChunkId       an id that is not 64 lowercase hex characters
    │   ├── IntegrityError       bytes whose checksum does not match
    │   ├── ChunkNotFound        a node does not hold the asked-for chunk
    │   └── UnknownBatch         a batch id the manifest does not know
    ├── RestoreError             a file could not be rebuilt from any replica
    └── ProfileError             a profiling request that cannot be measured
"""

from __future__ import annotations


class MulticloudError(Exception):
    """Base of every error multicloud raises on purpose."""


class ConfigError(MulticloudError):
    """A configuration file or value is invalid."""


class SourceError(MulticloudError):
    """The source data cannot be found or read."""


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


class UnknownBatch(StorageError):
    """The manifest has no batch with this id."""


class RestoreError(MulticloudError):
    """One or more files could not be rebuilt from any replica."""


class ProfileError(MulticloudError):
    """A profiling request that cannot be measured (no runs, or a run that fails)."""
