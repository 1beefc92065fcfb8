"""A node reading a chunk of a bucket source itself, instead of being sent its bytes.

With a bucket source the orchestrator sends a node of the bucket's cloud a `SourceRef`
(bucket, key, version) and a range; the node reads the range pinned to the version the
listing saw, hashes it (SHA-256, the chunk id; xxh3-128 for the transit checks after it)
and processes it like bytes it was sent. Credentials are the node's own, from its
environment; only where the store is (endpoint, region, retries) travels with the ref.

Failures are mapped for the run: an object that changed or vanished is `SourceChanged`,
refused credentials are a `SourceError` (neither is this node's fault, so the run stops
with one line instead of trying another node); a store that keeps failing stays a
`CloudError`, a StorageError, and the chunk moves to another node.
"""

from __future__ import annotations

import hashlib
import threading

import xxhash

from multicloud.cloud import ObjectStore, open_store
from multicloud.core.config import StoreOptions
from multicloud.core.errors import (
    CloudAuthError,
    ConfigError,
    ObjectChanged,
    ObjectMissing,
    SourceChanged,
    SourceError,
)
from multicloud.core.types import Chunk, SourceRef

__all__ = ["SourceReader"]


class SourceReader:
    """Opens each source store once per node; reads chunks of it (blocking)."""

    def __init__(self) -> None:
        self._stores: dict[tuple[str, str], ObjectStore] = {}
        self._lock = threading.Lock()

    def read(self, chunk: Chunk) -> memoryview:
        """The chunk's raw bytes, with `chunk.chunk_id` and `chunk.raw_xxh3` filled in."""
        ref = chunk.source_ref
        if ref is None:
            raise SourceError(f"chunk {chunk.index} of {chunk.file} has no source reference")
        where = f"{ref.store}{ref.key}"
        try:
            data = self._store(ref).get(ref.key, chunk.offset, chunk.offset + chunk.size_bytes,
                                        version=ref.version)
        except ObjectChanged:
            raise SourceChanged(f"{where} changed during the run (listed as version "
                                f"{ref.version}); run again to store its new content") from None
        except ObjectMissing:
            raise SourceChanged(f"{where} was deleted during the run; run again to store "
                                f"the bucket as it is now") from None
        except CloudAuthError as exc:
            raise SourceError(f"cannot read the source: {exc}") from None
        view = memoryview(data).cast("B")
        if len(view) != chunk.size_bytes:
            raise SourceChanged(f"{where} is shorter than when it was listed (read "
                                f"{len(view)} of {chunk.size_bytes} bytes at offset "
                                f"{chunk.offset}); run again")
        chunk.chunk_id = hashlib.sha256(view).hexdigest()
        chunk.raw_xxh3 = xxhash.xxh3_128_hexdigest(view)
        return view

    def close(self) -> None:
        """Let go of every store's client."""
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()

    def _store(self, ref: SourceRef) -> ObjectStore:
        key = (ref.store, repr(sorted(ref.options.items())))
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                try:
                    options = StoreOptions.model_validate(ref.options)
                except ValueError as exc:
                    raise ConfigError(f"bad store options for {ref.store}: {exc}") from None
                store = self._stores[key] = open_store(ref.store, options)
            return store
