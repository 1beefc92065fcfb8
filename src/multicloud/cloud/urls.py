"""Bucket URLs as users paste them, in one canonical form.

    s3://bucket/prefix/                                     Amazon S3 (and S3-compatible)
    gs://bucket/prefix/          gcs://...                  Google Cloud Storage
    az://container/prefix/       azure://...                Azure Blob (account from the env)
    abfs[s]://container@account.dfs.core.windows.net/prefix/
    https://account.blob.core.windows.net/container/prefix/
    memory://name/prefix/                                   an in-process store (tests)

A `StoreUrl` is the store (scheme, bucket, account) plus a key prefix; `str()` gives the
canonical form, which is what messages, the manifest and the dashboard show.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from multicloud.core.errors import ConfigError

Scheme = Literal["s3", "gs", "az", "memory"]

_SCHEMES: dict[str, Scheme] = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs",
                               "az": "az", "azure": "az", "memory": "memory"}
_AZURE_HOST = re.compile(r"^(?P<account>[a-z0-9]{3,24})\.(?:blob|dfs)\.core\.windows\.net$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# Which cloud each kind of store lives in (pricing, and the node that reads a source).
CLOUD_OF: dict[Scheme, str] = {"s3": "aws", "gs": "gcp", "az": "azure", "memory": "aws"}


def is_store_url(text: str) -> bool:
    """Whether text looks like a URL (scheme://...) rather than a local path."""
    return _URL.match(text) is not None


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A bucket (or container) and a key prefix inside it."""

    scheme: Scheme
    bucket: str
    prefix: str = ""  # "" or a key prefix ending in "/" ("logs/2026/")
    account: str | None = None  # Azure storage account, when the URL names it

    def __str__(self) -> str:
        return f"{self.store_root}{self.prefix}"

    @property
    def store_root(self) -> str:
        """The bucket's URL without the prefix ("s3://logs-bucket/")."""
        return f"{self.scheme}://{self.bucket}/"

    @property
    def cloud(self) -> str:
        """The cloud the bucket lives in: aws, gcp or azure."""
        return CLOUD_OF[self.scheme]

    def key(self, relative: str) -> str:
        """The full key of an object named relative to the prefix."""
        return self.prefix + relative

    def relative(self, key: str) -> str:
        """An object's key relative to the prefix."""
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def child(self, relative: str) -> StoreUrl:
        """The URL of a sub-prefix ("nov/" under "s3://b/restores/")."""
        return StoreUrl(self.scheme, self.bucket, _prefix(self.prefix + relative), self.account)


def parse_store_url(text: str) -> StoreUrl:
    """The StoreUrl of a bucket URL; ConfigError naming the accepted forms otherwise."""
    parts = urlsplit(text.strip())
    if parts.query or parts.fragment:
        # A presigned URL or an Azure SAS: the query is a credential. Never echoed.
        shown = parts._replace(query="", fragment="").geturl()
        raise ConfigError(f"bucket URL {shown!r} carries a query (?...): a presigned URL or "
                          f"a SAS token is a credential, not a location; give the bucket URL "
                          f"alone and the token as AZURE_STORAGE_SAS_TOKEN (Azure) or the "
                          f"cloud's usual credentials")
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    path = unquote(parts.path)
    if scheme in ("abfs", "abfss"):
        # container@account.dfs.core.windows.net/path
        container, _, rest = parts.netloc.partition("@")
        match = _AZURE_HOST.match(rest.lower())
        if not container or match is None:
            raise _bad(text, "abfs URLs look like abfs://container@account.dfs.core.windows.net/path")
        return StoreUrl("az", container, _prefix(path), match["account"])
    if scheme == "https" and _AZURE_HOST.match(host):
        match = _AZURE_HOST.match(host)
        assert match is not None
        container, _, rest = path.lstrip("/").partition("/")
        if not container:
            raise _bad(text, "an Azure URL names its container: https://account.blob.core."
                             "windows.net/container/prefix")
        return StoreUrl("az", container, _prefix(rest), match["account"])
    kind = _SCHEMES.get(scheme)
    if kind is None:
        raise _bad(text, "use s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, "
                         "or a local path")
    bucket = parts.netloc
    if not bucket or "@" in bucket or ":" in bucket:
        raise _bad(text, f"{scheme}:// URLs name a bucket: {scheme}://bucket/prefix")
    return StoreUrl(kind, bucket, _prefix(path))


def _prefix(path: str) -> str:
    """A key prefix: no leading slash, one trailing slash, no empty or dot segments."""
    segments = [s for s in path.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise ConfigError(f"a bucket prefix cannot contain '..': {path!r}")
    return "/".join(segments) + "/" if segments else ""


def _bad(text: str, hint: str) -> ConfigError:
    return ConfigError(f"not a bucket URL: {text!r}; {hint}")
