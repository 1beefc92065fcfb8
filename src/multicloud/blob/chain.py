"""The processing stage's transform chain: validate, compress, encrypt, and seal the blob."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from multicloud.blob.codecs import (
    KEY_SIZE,
    MAX_ENCRYPT_SIZE,
    NONCE_SIZE,
    compressor,
    load_key,
    worth_compressing,
)
from multicloud.blob.envelope import (
    FLAG_AESGCM,
    FLAG_ZSTD,
    MAGIC,
    PREFIX,
    blob_checksum,
    byte_view,
    codec_name,
    seal,
)
from multicloud.blob.validate import HEX64, check_chunk, check_records
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import ConfigError, InvalidChunkId
from multicloud.core.types import BlobInfo, Chunk


class TransformChain:
    """The configured transforms: validate, compress, encrypt."""

    def __init__(self, cfg: ProcessingConfig, key: bytes | None = None) -> None:
        self._cfg = cfg
        self._validate = "validate" in cfg.transforms
        self._compress = "compress" in cfg.transforms
        self._aead: AESGCM | None = None
        if "encrypt" in cfg.transforms:
            if key is None:
                raise ConfigError(
                    f"encryption is on but no key: set the {cfg.encryption.key_env} "
                    "environment variable to 64 hex characters, or processing.encryption."
                    "key_file to a file holding 32 raw bytes or 64 hex characters"
                )
            if len(key) != KEY_SIZE:
                raise ConfigError(
                    f"the encryption key must be {KEY_SIZE} bytes for AES-256, got {len(key)}"
                )
            # Only the cipher object keeps the key, so no attribute or repr can show it.
            self._aead = AESGCM(key)

    @classmethod
    def from_config(cls, cfg: ProcessingConfig) -> TransformChain:
        """The chain for a processing config, loading the key only when encryption is on."""
        key = load_key(cfg.encryption) if "encrypt" in cfg.transforms else None
        return cls(cfg, key)

    @property
    def codec(self) -> str:
        """The configured codec, e.g. "zstd+aes256gcm"; a blob may end up "raw" instead."""
        return codec_name(self._compress, self._aead is not None)

    def __repr__(self) -> str:
        return f"TransformChain(transforms={list(self._cfg.transforms)!r}, codec={self.codec!r})"

    def apply(self, chunk: Chunk, data: bytes | memoryview) -> tuple[memoryview, BlobInfo]:
        """Turn a chunk's raw bytes into its blob, raising ValidationFailed for bad data."""
        view = byte_view(data)
        raw_size = len(view)
        if self._validate:
            raw_hash = check_chunk(chunk, view)
            if self._cfg.parse_records and chunk.record_format in ("jsonl", "csv"):
                # Splitting lines needs bytes; a memoryview costs one copy, dropped right after.
                check_records(chunk, data if isinstance(data, bytes) else view.tobytes())
        else:
            # Trust the id ingestion computed from these bytes; decode_blob re-checks it.
            if not HEX64.fullmatch(chunk.chunk_id):
                raise InvalidChunkId(chunk.chunk_id)
            raw_hash = bytes.fromhex(chunk.chunk_id)

        payload: bytes | memoryview = view
        flags = 0
        if self._compress and worth_compressing(view, self._cfg.compression.level,
                                                 self._cfg.compression.min_saving):
            packed = compressor(self._cfg.compression.level).compress(view)
            if len(packed) <= raw_size * (1.0 - self._cfg.compression.min_saving):
                payload, flags = packed, FLAG_ZSTD

        if self._aead is not None:
            if len(payload) > MAX_ENCRYPT_SIZE:
                raise ConfigError(
                    f"chunk {chunk.index} of {chunk.file} is {len(payload)} bytes, too large to "
                    "encrypt in one piece (max 2 GiB): lower ingestion.chunk_size_mb"
                )
            flags |= FLAG_AESGCM
        prefix = PREFIX.pack(MAGIC, flags, raw_size, raw_hash)
        nonce = b""
        if self._aead is not None:
            nonce = os.urandom(NONCE_SIZE)
            payload = self._aead.encrypt(nonce, payload, prefix)  # AAD: header before digest

        blob = seal(prefix, nonce, payload)
        info = BlobInfo(
            chunk_id=chunk.chunk_id,
            raw_size=raw_size,
            blob_size=len(blob),
            blob_checksum=blob_checksum(blob),
            codec=codec_name(bool(flags & FLAG_ZSTD), bool(flags & FLAG_AESGCM)),
        )
        return blob, info
