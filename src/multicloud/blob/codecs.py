"""The codecs a blob's payload goes through: zstd compression and AES-256-GCM encryption.

zstd contexts are not safe to share between threads, and making one per call costs more
than the compression of a small chunk, so each worker thread keeps its own. hashlib,
zstandard and most numpy calls release the GIL; AES-GCM (over 1 GB/s anyway) holds it.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import zstandard

from multicloud.core.config import EncryptionConfig
from multicloud.core.errors import ConfigError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
# AES-GCM in cryptography takes at most 2**31 - 1 bytes per call.
MAX_ENCRYPT_SIZE = 2**31 - 1 - TAG_SIZE
KEY_HINT = (
    "the MULTICLOUD_ENCRYPTION_KEY environment variable (64 hex characters) "
    "or processing.encryption.key_file"
)
_HEX_KEY = re.compile(rb"[0-9a-fA-F]{64}")

_local = threading.local()


def load_key(cfg: EncryptionConfig) -> bytes | None:
    """The 32-byte encryption key from `key_file`, else from the `key_env` variable, else None."""
    if cfg.key_file is not None:
        path = Path(cfg.key_file).expanduser()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"encryption key_file {path} does not exist: create it with 32 random bytes "
                f"(e.g. head -c 32 /dev/urandom > {path}) or fix processing.encryption.key_file"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read encryption key_file {path}: {exc.strerror}") from None
        if len(raw) == KEY_SIZE:
            return raw
        text = raw.removesuffix(b"\n").removesuffix(b"\r")
        if _HEX_KEY.fullmatch(text):
            return bytes.fromhex(text.decode("ascii"))
        raise ConfigError(
            f"encryption key_file {path} must hold 32 raw bytes or 64 hex characters "
            f"(holds {len(raw)} bytes that are neither)"
        )
    value = os.environ.get(cfg.key_env, "").strip()
    if not value:
        return None
    if _HEX_KEY.fullmatch(value.encode("utf-8", "replace")):
        return bytes.fromhex(value)
    raise ConfigError(
        f"environment variable {cfg.key_env} must hold 64 hex characters, a 32-byte key "
        f"(holds {len(value)} characters that are not)"
    )


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor for level."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor."""
    found: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


_SAMPLE = 32 * 1024
_SAMPLED_ABOVE = 8 * _SAMPLE


def worth_compressing(view: memoryview, level: int, min_saving: float) -> bool:
    """Whether three 32 KiB samples (start, middle, end) compress by min_saving.

    Incompressible chunks (media, archives, encrypted data) are common, and compressing
    them whole only to store them raw costs a full zstd pass; the samples cost 1/1000 of it.
    """
    if len(view) <= _SAMPLED_ABOVE:
        return True
    middle = len(view) // 2
    samples = (view[:_SAMPLE], view[middle:middle + _SAMPLE], view[-_SAMPLE:])
    zstd = compressor(level)
    packed = sum(len(zstd.compress(s)) for s in samples)
    return packed <= 3 * _SAMPLE * (1.0 - min_saving)
