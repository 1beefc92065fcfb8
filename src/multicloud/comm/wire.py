"""How a request and its reply look on the wire, shared by every carrier.

Metadata travels as compact ASCII JSON (in a header over HTTP, so the body stays the raw
bytes); errors as the tree's wire form (`multicloud.core.errors.to_wire`), each code with
the HTTP status it goes out with. The in-process carrier encodes and decodes the same way,
so a value that would not survive HTTP fails in-process too.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from multicloud.core.errors import MulticloudError, from_wire, to_wire
from multicloud.core.network import Location

log = logging.getLogger(__name__)

API = "/v1"
META_HEADER = "X-Multicloud-Meta"
BODY_HEADER = "X-Multicloud-Body"  # "1": the message has a body, if only an empty one
SENDER_HEADER = "X-Multicloud-Sender"

# The HTTP status each wire code goes out with (clients decode the body, not the status).
STATUS = {
    "invalid_id": 400, "cluster": 400, "config": 400, "error": 400, "source": 400,
    "validation": 422, "integrity": 422, "not_found": 404, "unknown_batch": 404,
    "unauthorized": 401, "too_large": 413, "disk_full": 507, "storage": 500,
    "node_unavailable": 503, "source_lost": 503, "transfer_timeout": 504,
    "insufficient_nodes": 503, "quorum": 503, "restore": 500,
    "batch_exists": 409, "batch_leased": 409, "batch_conflict": 409,
    "source_changed": 409, "cloud": 502, "cloud_auth": 502, "object_missing": 404,
    "object_exists": 409, "object_changed": 412,
}


def encode_meta(meta: dict[str, Any]) -> str:
    """Metadata as one line of ASCII JSON (any file name survives, as \\u escapes)."""
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=True)


def decode_meta(text: str) -> dict[str, Any]:
    """The metadata `encode_meta` wrote; ValueError unless it is a JSON object."""
    meta = json.loads(text)
    if not isinstance(meta, dict):
        raise ValueError("metadata must be a JSON object")
    return meta


def copy_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """meta as it arrives after a trip over the wire."""
    return decode_meta(encode_meta(meta))


def encode_sender(sender: Location | None) -> str | None:
    """A sender location as "cloud/region"."""
    return None if sender is None else f"{sender.cloud}/{sender.region}"


def decode_sender(text: str | None) -> Location | None:
    """The location `encode_sender` wrote (None for none, or a malformed one)."""
    if not text or "/" not in text:
        return None
    cloud, _, region = text.partition("/")
    return Location(cloud, region)


def status_of(body: dict[str, Any]) -> int:
    """The HTTP status an error body goes out with."""
    return STATUS.get(str(body.get("error", "")), 500)


def internal_error(node_id: str, exc: BaseException) -> dict[str, Any]:
    """The wire body of an error that is not in the tree (a bug): logged, sent as storage."""
    log.error("node %s failed on a request", node_id, exc_info=exc)
    return {"error": "storage",
            "message": f"node {node_id} failed: {type(exc).__name__}: {exc}"}


def round_trip(exc: MulticloudError) -> MulticloudError:
    """exc as the caller gets it after a trip over the wire."""
    return from_wire(json.loads(json.dumps(to_wire(exc))))
