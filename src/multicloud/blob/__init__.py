"""Blobs: the envelope chunks are stored in, its codecs, and the validation of raw chunks."""

from __future__ import annotations

from multicloud.blob.chain import TransformChain
from multicloud.blob.codecs import load_key
from multicloud.blob.envelope import (
    MAGIC,
    EnvelopeHeader,
    blob_checksum,
    check_blob,
    decode_blob,
    inspect_blob,
)

__all__ = [
    "MAGIC",
    "EnvelopeHeader",
    "TransformChain",
    "blob_checksum",
    "check_blob",
    "decode_blob",
    "inspect_blob",
    "load_key",
]
