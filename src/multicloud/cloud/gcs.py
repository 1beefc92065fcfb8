"""Google Cloud Storage (placeholder until the JSON-API client lands)."""

from __future__ import annotations

from multicloud.cloud.objects import ObjectStore


class GcsStore(ObjectStore):  # pragma: no cover - replaced by the real client
    """Not implemented yet."""
