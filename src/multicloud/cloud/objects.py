"""One blocking interface over every object store the product reads from or writes to.

Sources, node back-ends and restore targets all speak `ObjectStore`: list (paginated and
streamed), head, ranged get pinned to a version, put (optionally create-only), streamed
put, delete. Implementations map every failure of their client into the exception tree
(`CloudError` and its children) with the store's URL in the message and no secrets in it;
they retry 5xx and throttling answers with backoff before giving up.

The methods block: callers run them on worker threads (a node's I/O pool, `to_thread`),
the way the local chunk store is used. `multicloud.cloud.open_store` picks the
implementation by scheme.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from multicloud.cloud.urls import StoreUrl
from multicloud.core.config import StoreOptions
from multicloud.core.errors import MulticloudError

Buffer = bytes | memoryview


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object: its key relative to the store's prefix, size, version and time."""

    key: str
    size: int
    # What pins this exact content: the ETag (S3, Azure; quoted as HTTP sends it) or the
    # generation (GCS). A get with `version` fails with ObjectChanged once it moved on.
    version: str | None
    mtime: float  # epoch seconds of the last write


class ObjectStore(abc.ABC):
    """A bucket (or container) under a key prefix; blocking, safe to share between threads."""

    def __init__(self, url: StoreUrl, options: StoreOptions) -> None:
        self.url = url
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.url)!r})"

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under prefix (relative to the store's), page by page as the store
        hands them out: a million keys are never held at once. Order: the store's (keys
        ascending on S3, GCS and Azure)."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """The object's size and version; ObjectMissing when there is none."""

    @abc.abstractmethod
    def get(self, key: str, start: int = 0, end: int | None = None, *,
            version: str | None = None) -> Buffer:
        """Bytes [start, end) of the object (to its end when end is None).

        With `version`, the bytes are those of that version or ObjectChanged is raised:
        a source that changes while a run reads it is never mixed.
        """

    @abc.abstractmethod
    def put(self, key: str, data: Buffer, *, create_only: bool = False) -> ObjectInfo:
        """Store data at key, atomically; the store has it durably when this returns.

        With `create_only`, an object already at key is left as it is and ObjectExists is
        raised (a replica is never overwritten by a different body).
        """

    @abc.abstractmethod
    def put_parts(self, key: str, parts: Iterable[Buffer]) -> ObjectInfo:
        """Store the concatenation of parts (a multipart upload for big objects); nothing
        appears at key unless every part arrived. An exception raised while iterating
        parts aborts the upload."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error when it is not there."""

    def close(self) -> None:  # noqa: B027 - most clients hold nothing to close
        """Release the client's connections."""


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY",
               "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET",
               "AZURE_STORAGE_CONNECTION_STRING")
_SECRET_PATTERNS = [
    re.compile(r"(?i)(AccountKey=)[^;\s]+"),
    re.compile(r"(?i)(SharedAccessSignature=)[^;\s]+"),
    re.compile(r"(?i)([?&]sig=)[^&\s]+"),
    re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s]+"),
    re.compile(r"(?i)(authorization:\s*)\S+(?:\s+\S+)?"),
    re.compile(r"(?i)(\"private_key\":\s*\")[^\"]+"),
    re.compile(r"(?i)(secret[_ ]?(?:access[_ ]?)?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"),
]


def redact(text: str) -> str:
    """text with every credential it might carry replaced by '***': the values of the
    standard secret environment variables, and keys, signatures and tokens by their shape.
    Every cloud error message passes through here before it is raised."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


ErrorMapper = Callable[[BaseException, str], MulticloudError]


class MapErrors:
    """A with block whose client failures are raised again as the tree's errors.

    `mapper(exc, where)` makes the error (`where` names the store URL and key). The tree's
    own errors pass as they are, as do the `passing` types and BaseExceptions that are
    not Exceptions (Ctrl-C, a generator closing), except obstore's PanicException, which
    is a BaseException and still a failure of the client.
    """

    def __init__(self, where: str, mapper: ErrorMapper,
                 passing: tuple[type[BaseException], ...] = ()) -> None:
        self.where = where
        self.mapper = mapper
        self.passing = passing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None or isinstance(exc, (MulticloudError, *self.passing)):
            return
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            return
        raise self.mapper(exc, self.where) from None
