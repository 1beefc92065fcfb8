"""The one way in: the ObjectStore behind a bucket URL, chosen by its scheme."""

from __future__ import annotations

from multicloud.cloud.objects import ObjectStore
from multicloud.cloud.urls import StoreUrl, parse_store_url
from multicloud.core.config import StoreOptions


def open_store(url: str | StoreUrl, options: StoreOptions | None = None) -> ObjectStore:
    """The ObjectStore behind a bucket URL (parsed first when given as text)."""
    parsed = parse_store_url(url) if isinstance(url, str) else url
    options = options or StoreOptions()
    if parsed.scheme == "gs":
        from multicloud.cloud.gcs import GcsStore

        return GcsStore(parsed, options)
    from multicloud.cloud.obstore_backend import ObstoreStore

    return ObstoreStore(parsed, options)
