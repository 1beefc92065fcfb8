"""Helpers of the cloud tests: unique bucket names, a test's bucket, a store through the
fault proxy. (Fixtures live in conftest.py; test modules import these from here.)"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fault_proxy import FaultProxy

from multicloud.cloud import ObjectStore, open_store
from multicloud.cloud.emulators import Emulator
from multicloud.core.config import StoreOptions

STORE_KINDS = ("memory", "s3", "gs", "az")


def unique_name(tag: str = "t") -> str:
    """A bucket name valid on S3, GCS and Azure alike (3-63 lowercase letters, digits)."""
    return f"{tag}-{uuid.uuid4().hex[:16]}"


@dataclass
class Bucket:
    """A fresh, empty bucket of one kind for one test."""

    kind: str
    name: str
    emulator: Emulator | None

    @property
    def root(self) -> str:
        return f"{self.kind}://{self.name}/"

    def url(self, prefix: str = "") -> str:
        return self.root + prefix

    def open(self, prefix: str = "", options: StoreOptions | None = None) -> ObjectStore:
        return open_store(self.url(prefix), options)


MakeBucket = Callable[[str], Bucket]


@contextlib.contextmanager
def proxied(bucket: Bucket, prefix: str = "", **options: object) -> Iterator[
        tuple[FaultProxy, ObjectStore]]:
    """A fault proxy in front of the bucket's emulator, and a store that goes through it."""
    assert bucket.emulator is not None
    endpoint = bucket.emulator.endpoint
    upstream = endpoint.rsplit("/", 1)[0] if bucket.kind == "az" else endpoint
    with FaultProxy(upstream, bucket.emulator.kind) as proxy:
        through = proxy.url + endpoint[len(upstream):]
        store = open_store(bucket.url(prefix),
                           StoreOptions(endpoint=through, allow_http=True, **options))
        try:
            yield proxy, store
        finally:
            store.close()
