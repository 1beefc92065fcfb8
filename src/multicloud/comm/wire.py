"""What travels between the orchestrator, nodes and the registry in cluster mode.

Plain JSON shapes for chunk metadata, blob info, acks and links, and the error bodies that
servers send and clients turn back into the exceptions of `multicloud.core.errors`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from multicloud.core.errors import (
    ChunkNotFound,
    ClusterError,
    IntegrityError,
    InvalidChunkId,
    MulticloudError,
    NodeUnavailable,
    StorageError,
    ValidationFailed,
)
from multicloud.core.network import Link, Location
from multicloud.core.types import BlobInfo, Chunk, ReplicaAck

CHUNK_HEADER = "X-Multicloud-Chunk"
CHECKSUM_HEADER = "X-Multicloud-Checksum"
API = "/v1"

_CHUNK_FIELDS = ("chunk_id", "file", "index", "offset", "size_bytes", "source_cloud",
                 "record_format", "csv_columns", "at_file_end", "raw_xxh3")


# An unfinished line carried from the previous chunk rides in the header when it is short;
# a longer one is left out, and that one boundary line goes unchecked.
_MAX_PREFIX_IN_HEADER = 4096


def chunk_to_header(chunk: Chunk) -> str:
    """Chunk metadata (never its bytes) as a compact JSON header value."""
    meta: dict[str, Any] = {name: getattr(chunk, name) for name in _CHUNK_FIELDS}
    prefix = chunk.line_prefix
    if prefix is not None and len(prefix) <= _MAX_PREFIX_IN_HEADER:
        meta["line_prefix"] = base64.b64encode(prefix).decode()
    return json.dumps(meta, separators=(",", ":"))


def chunk_from_header(value: str) -> Chunk:
    """The Chunk a header describes."""
    raw = json.loads(value)
    prefix = raw.get("line_prefix")
    return Chunk(**{name: raw.get(name) for name in _CHUNK_FIELDS},
                 line_prefix=base64.b64decode(prefix) if prefix is not None else None)


def blob_to_json(info: BlobInfo) -> dict[str, Any]:
    """BlobInfo as JSON."""
    return dataclasses.asdict(info)


def blob_from_json(raw: dict[str, Any]) -> BlobInfo:
    """BlobInfo from JSON."""
    return BlobInfo(**raw)


def ack_to_json(ack: ReplicaAck) -> dict[str, Any]:
    """ReplicaAck as JSON."""
    return dataclasses.asdict(ack)


def ack_from_json(raw: dict[str, Any]) -> ReplicaAck:
    """ReplicaAck from JSON."""
    return ReplicaAck(**raw)


def link_to_json(link: Link) -> dict[str, Any]:
    """A link, so that the sending node can emulate it."""
    return {"src": [link.src.cloud, link.src.region], "dst": [link.dst.cloud, link.dst.region],
            "kind": link.kind, "latency_s": link.latency_s,
            "bandwidth_bps": link.bandwidth_bps, "egress_usd_per_gb": link.egress_usd_per_gb}


def link_from_json(raw: dict[str, Any]) -> Link:
    """The link a request describes."""
    return Link(src=Location(*raw["src"]), dst=Location(*raw["dst"]), kind=raw["kind"],
                latency_s=float(raw["latency_s"]), bandwidth_bps=float(raw["bandwidth_bps"]),
                egress_usd_per_gb=float(raw["egress_usd_per_gb"]))


# Error codes a server puts in {"error": code, "message": ..., "node_id": ...}, with the
# HTTP status each one goes out with.
STATUS = {
    "bad_request": 400,
    "invalid_id": 400,
    "unauthorized": 401,
    "not_found": 404,
    "too_large": 413,
    "integrity": 422,
    "validation": 422,
    "node_unavailable": 502,
    "not_ready": 503,
    "internal": 500,
}


def error_body(exc: BaseException, node_id: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for an exception raised while serving a request."""
    code = "internal"
    culprit = node_id
    if isinstance(exc, InvalidChunkId):
        code = "invalid_id"
    elif isinstance(exc, ChunkNotFound):
        code = "not_found"
    elif isinstance(exc, IntegrityError):
        code = "integrity"
    elif isinstance(exc, ValidationFailed):
        code = "validation"
    elif isinstance(exc, NodeUnavailable):
        code, culprit = "node_unavailable", exc.node_id
    elif isinstance(exc, StorageError):
        code = "internal"  # the node's own disk failed: the server's fault, not the request's
    elif isinstance(exc, MulticloudError):
        code = "bad_request"
    body = {"error": code, "message": str(exc), "node_id": culprit}
    if isinstance(exc, NodeUnavailable):
        body["reason"] = exc.reason  # so the client's NodeUnavailable does not say it twice
    return STATUS[code], body


def raise_for_error(status: int, body: dict[str, Any] | None, node_id: str) -> None:
    """Turn an error response from node_id back into the matching exception."""
    body = body or {}
    code = str(body.get("error", ""))
    message = str(body.get("message") or f"HTTP {status} from {node_id}")
    culprit = str(body.get("node_id") or node_id)
    if code == "invalid_id":
        raise InvalidChunkId(message.split("'")[1] if "'" in message else message)
    if code == "not_found" or status == 404:
        raise ChunkNotFound(message)
    if code == "integrity":
        raise IntegrityError(message)
    if code == "validation":
        raise ValidationFailed(message)
    if code in ("node_unavailable", "not_ready") or status in (502, 503):
        raise NodeUnavailable(culprit, str(body.get("reason") or message))
    if status == 401:
        raise ClusterError(f"{node_id} refused our token (401): check MULTICLOUD_TOKEN or "
                           f"the data dir's token file")
    if status == 413:
        raise StorageError(f"{node_id} refused a body as too large: {message}")
    raise StorageError(f"{node_id} answered HTTP {status}: {message}")
