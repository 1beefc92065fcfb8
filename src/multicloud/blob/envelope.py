"""The blob: the self-describing envelope a chunk is stored in, and its checks.

Processing turns a chunk's raw bytes into a blob that nodes store under the chunk id
(SHA-256 of the raw bytes). All integers are big-endian:

    offset  size  field
    0       4     magic b"MCB1"
    4       1     flags: bit0 payload is a zstd frame, bit1 payload is AES-256-GCM
                  ciphertext + 16-byte tag; other bits must be 0
    5       8     raw size (uint64)
    13      32    SHA-256 of the raw bytes (the chunk id)
    45      16    xxh3-128 digest of every other byte of the blob: bytes 0-44, nonce, payload
    61      12    nonce, only when encrypted
    61|73   ...   payload: the raw bytes, or their zstd frame, either possibly encrypted

The digest covers the header as well as the payload so that `check_blob` can scrub a blob
(any flipped bit, including in the flags or sizes) without a key and without decoding.
The AES-GCM associated data is bytes 0-44: the digest cannot be part of it, since the
digest is computed over the ciphertext, and the nonce is bound by GCM itself.

On the wire a blob is checked with `blob_checksum` (xxh3-128 hex of the whole blob).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from multicloud.blob.codecs import KEY_HINT, KEY_SIZE, NONCE_SIZE, TAG_SIZE, decompressor
from multicloud.core.buffers import aligned
from multicloud.core.errors import ConfigError, IntegrityError

MAGIC = b"MCB1"
FLAG_ZSTD = 0x01
FLAG_AESGCM = 0x02
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_AESGCM

PREFIX = struct.Struct(">4sBQ32s")  # the fields the digest and the AES-GCM AAD start with
_HEADER = struct.Struct(">4sBQ32s16s")


def blob_checksum(blob: bytes | memoryview) -> str:
    """The wire checksum of a blob: xxh3-128 hex over all of it, checked by every receiver."""
    return xxhash.xxh3_128_hexdigest(blob)


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The parsed header of a blob."""

    compressed: bool
    encrypted: bool
    raw_size: int
    chunk_id: str  # SHA-256 hex of the raw bytes
    payload_digest: str  # xxh3-128 hex over every blob byte except the digest itself
    header_size: int  # where the payload starts: 61, or 73 with a nonce


def seal(prefix: bytes, nonce: bytes, payload: bytes | memoryview) -> memoryview:
    """The blob for a packed prefix (see PREFIX), a nonce (b"" unless encrypted) and payload.

    Built in a page-aligned buffer (the one copy of the payload), so that stores can write
    it to disk without copying it again (see multicloud.core.buffers).
    """
    digest = xxhash.xxh3_128(prefix)
    digest.update(nonce)
    digest.update(payload)
    blob = aligned(_HEADER.size + len(nonce) + len(payload))
    blob[:PREFIX.size] = prefix
    blob[PREFIX.size:_HEADER.size] = digest.digest()
    blob[_HEADER.size:_HEADER.size + len(nonce)] = nonce
    blob[_HEADER.size + len(nonce):] = payload
    return blob


def inspect_blob(blob: bytes | memoryview) -> EnvelopeHeader:
    """Parse a blob's header without checking its digest; IntegrityError if malformed."""
    view = byte_view(blob)
    if len(view) < _HEADER.size:
        raise IntegrityError(
            f"blob of {len(view)} bytes is shorter than the {_HEADER.size}-byte envelope "
            "header: truncated or not a multicloud blob"
        )
    magic, flags, raw_size, raw_hash, digest = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise IntegrityError(f"not a multicloud blob: magic {magic!r}, expected {MAGIC!r}")
    if flags & ~_KNOWN_FLAGS:
        raise IntegrityError(
            f"unknown envelope flags 0x{flags:02x} (known: 0x01 zstd, 0x02 aes256gcm)"
        )
    compressed, encrypted = bool(flags & FLAG_ZSTD), bool(flags & FLAG_AESGCM)
    header_size = _HEADER.size + (NONCE_SIZE if encrypted else 0)
    payload_size = len(view) - header_size
    # Without compression the payload size follows from the raw size.
    expected = None if compressed else raw_size + (TAG_SIZE if encrypted else 0)
    minimum = TAG_SIZE if encrypted else 0
    if payload_size < minimum or (expected is not None and payload_size != expected):
        raise IntegrityError(
            f"blob {raw_hash.hex()}: payload is {payload_size} bytes, which does not fit the "
            f"header ({codec_name(compressed, encrypted)}, {raw_size} raw bytes): truncated?"
        )
    return EnvelopeHeader(
        compressed=compressed,
        encrypted=encrypted,
        raw_size=raw_size,
        chunk_id=raw_hash.hex(),
        payload_digest=digest.hex(),
        header_size=header_size,
    )


def check_blob(blob: bytes | memoryview, expected_chunk_id: str | None = None) -> EnvelopeHeader:
    """Scrub a blob without a key or decoding: header, digest and chunk id must all match."""
    header = inspect_blob(blob)
    if expected_chunk_id is not None and header.chunk_id != expected_chunk_id:
        raise IntegrityError(
            f"blob holds chunk {header.chunk_id}, expected chunk {expected_chunk_id}"
        )
    view = byte_view(blob)
    digest = xxhash.xxh3_128(view[: PREFIX.size])
    digest.update(view[_HEADER.size :])
    if digest.hexdigest() != header.payload_digest:
        raise IntegrityError(
            f"blob {header.chunk_id}: xxh3-128 digest {digest.hexdigest()} does not match the "
            f"header's {header.payload_digest}: the blob is corrupt"
        )
    return header


def decode_blob(
    blob: bytes | memoryview, key: bytes | None = None, expected_chunk_id: str | None = None
) -> bytes:
    """The raw bytes a blob holds, after checking every digest; IntegrityError on a mismatch."""
    header = check_blob(blob, expected_chunk_id)
    view = byte_view(blob)
    payload: bytes | memoryview = view[header.header_size :]
    name = header.chunk_id
    if header.encrypted:
        if key is None:
            raise ConfigError(f"blob {name} is encrypted; provide the key via {KEY_HINT}")
        if len(key) != KEY_SIZE:
            raise ConfigError(f"the encryption key must be {KEY_SIZE} bytes, got {len(key)}")
        try:
            payload = AESGCM(key).decrypt(
                view[_HEADER.size : header.header_size], payload, view[: PREFIX.size]
            )
        except InvalidTag:
            raise IntegrityError(
                f"blob {name}: AES-GCM authentication failed: wrong key, or the blob was altered"
            ) from None
    if header.compressed:
        try:
            frame_size = zstandard.frame_content_size(payload)
            if frame_size != header.raw_size:
                raise IntegrityError(
                    f"blob {name}: zstd frame holds {frame_size} bytes, header says "
                    f"{header.raw_size}"
                )
            raw = decompressor().decompress(payload, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"blob {name}: zstd payload does not decompress: {exc}") from exc
    else:
        raw = payload if isinstance(payload, bytes) else payload.tobytes()
    if len(raw) != header.raw_size:
        raise IntegrityError(
            f"blob {name}: decoded {len(raw)} bytes, header says {header.raw_size}"
        )
    actual = hashlib.sha256(raw).hexdigest()
    if actual != header.chunk_id:
        raise IntegrityError(f"blob {name}: decoded bytes have SHA-256 {actual}")
    return raw


def codec_name(compressed: bool, encrypted: bool) -> str:
    return ("zstd" if compressed else "raw") + ("+aes256gcm" if encrypted else "")


def byte_view(data: bytes | memoryview) -> memoryview:
    """data as a flat memoryview of bytes (no copy)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
