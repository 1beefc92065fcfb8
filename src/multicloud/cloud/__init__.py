"""Object stores: S3, Google Cloud Storage, Azure Blob (and an in-memory one), one interface."""

from multicloud.cloud.objects import ObjectInfo, ObjectStore, redact
from multicloud.cloud.opening import open_store
from multicloud.cloud.urls import StoreUrl, is_store_url, parse_store_url

__all__ = ["ObjectInfo", "ObjectStore", "StoreUrl", "is_store_url", "open_store",
           "parse_store_url", "redact"]
