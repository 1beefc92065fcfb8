"""Google Cloud Storage (gs://) through Google's own client, `google-cloud-storage`.

Why not obstore, which carries S3 and Azure: obstore's GCS client speaks the XML API, and
no GCS emulator that runs here does; `google-cloud-storage` speaks the JSON API, which
gcp-storage-emulator does. Carrying gs:// with Google's client means the code path users
run against real GCS is the one the tests run against the emulator.

Credentials come from Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS (a
service account key file), gcloud's user credentials (`gcloud auth application-default
login`), or the metadata server on Google Cloud. An endpoint, from the store's options or
STORAGE_EMULATOR_HOST, means an emulator: it is used with anonymous credentials and the
project GOOGLE_CLOUD_PROJECT (default "multicloud").

Versions are generations. Every request is retried with exponential backoff on 5xx, 429
and connection failures, at most `max_retries` times and within a deadline; create-only
writes are safe to retry because GCS enforces their precondition (ifGenerationMatch=0).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import io
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import google.auth
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, exponential_sleep_generator, retry_target
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import storage  # type: ignore[import-untyped]
from google.cloud.storage.exceptions import (  # type: ignore[import-untyped]
    DataCorruption,
    InvalidResponse,
)

from multicloud.cloud.objects import Buffer, MapErrors, ObjectInfo, ObjectStore, redact
from multicloud.cloud.urls import StoreUrl
from multicloud.core.config import StoreOptions
from multicloud.core.errors import (
    CloudAuthError,
    CloudError,
    ConfigError,
    ObjectChanged,
    ObjectExists,
    ObjectMissing,
)

_P = ParamSpec("_P")
_R = TypeVar("_R")

DEFAULT_EMULATOR_PROJECT = "multicloud"
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
# put_parts sends the stream in resumable-upload chunks of this size (GCS wants a multiple
# of 256 KiB); one chunk is buffered at a time.
_PART_BYTES = 8 * 1024 * 1024
_PAGE_SIZE = 1000
_CONTENT_TYPE = "application/octet-stream"
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_RETRYABLE_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
    requests.exceptions.ChunkedEncodingError, http.client.BadStatusLine,
    http.client.IncompleteRead, http.client.ResponseNotReady, urllib3.exceptions.PoolError,
    urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError)


class GcsStore(ObjectStore):
    """An ObjectStore on a GCS bucket through the JSON API; one client per thread."""

    def __init__(self, url: StoreUrl, options: StoreOptions) -> None:
        super().__init__(url, options)
        self._prefix = url.prefix
        self._endpoint = _endpoint(options)
        # (connect, read) seconds of one request; the retries' deadline spans all attempts.
        self._timeout = (min(options.timeout_s, 10.0), options.timeout_s)
        self._deadline = max(options.timeout_s, 1.0) * (options.max_retries + 1)
        self._lock = threading.Lock()
        self._credentials: Credentials | None = None
        self._project: str | None = None
        # requests' Session (under google's Client) is not documented as thread-safe, so
        # each thread gets its own client; they share the credentials (refreshes are locked).
        self._local = threading.local()
        self._clients: list[Any] = []

    # -- ObjectStore ------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        where = f"{self.url}{prefix}" if prefix else f"{self.url} (listing)"
        # A prefix names a directory, as on the other stores (obstore lists path segments):
        # "logs" lists "logs/a" but not "logs-old/b".
        full = self._prefix + (prefix if not prefix or prefix.endswith("/") else prefix + "/")
        with self._errors(where):
            blobs = self._client().list_blobs(
                self.url.bucket, prefix=full or None, page_size=_PAGE_SIZE,
                timeout=self._timeout, retry=self._retry())
            pages = iter(blobs.pages)
        while True:
            # Requests happen inside next(); the yields stay outside the error mapping.
            with self._errors(where):
                page = next(pages, None)
                if page is None:
                    return
                infos = [self._info(blob) for blob in page]
            yield from infos

    def head(self, key: str) -> ObjectInfo:
        with self._errors(f"{self.url}{key}"):
            blob = self._blob(key)
            blob.reload(projection="noAcl", timeout=self._timeout, retry=self._retry())
            return self._info(blob)

    def get(self, key: str, start: int = 0, end: int | None = None, *,
            version: str | None = None) -> Buffer:
        where = f"{self.url}{key}"
        generation = None if version is None else _generation(version, where)
        if end is not None and end <= start:
            if version is not None:  # still prove the version: nothing to read otherwise
                current = self.head(key).version
                if current != version:
                    raise ObjectChanged(f"{where}: changed: generation {current} is not "
                                        f"{version}")
            return b""
        whole = start == 0 and end is None
        with self._errors(where):
            # Google's `end` is inclusive, ours is exclusive. Raw: the bytes as stored, so
            # ranges agree with the size head reports even for gzip-encoded objects.
            return bytes(self._blob(key).download_as_bytes(
                start=start or None, end=None if end is None else end - 1,
                raw_download=True, if_generation_match=generation,
                checksum="auto" if whole else None, timeout=self._timeout,
                retry=self._retry()))

    def put(self, key: str, data: Buffer, *, create_only: bool = False) -> ObjectInfo:
        where = f"{self.url}{key}"
        body = data if isinstance(data, bytes) else bytes(data)
        retried = False

        def note_retry(exc: Exception) -> None:
            nonlocal retried
            retried = True

        blob = self._blob(key)
        try:
            with self._errors(where):
                blob.upload_from_string(
                    body, content_type=_CONTENT_TYPE,
                    if_generation_match=0 if create_only else None, timeout=self._timeout,
                    retry=self._retry(on_error=note_retry))
        except ObjectChanged:
            if not create_only:
                raise
            # A create-only write that was retried may have found its own first attempt,
            # which landed although its answer was lost: the same bytes there are success.
            if retried:
                existing = self._same_body(key, body)
                if existing is not None:
                    return existing
            raise ObjectExists(f"{where}: already exists; it was left as it is") from None
        return self._info(blob, key=key, size=len(body))

    def put_parts(self, key: str, parts: Iterable[Buffer]) -> ObjectInfo:
        where = f"{self.url}{key}"
        reader = _PartsReader(parts)
        blob = self._blob(key, chunk_size=_PART_BYTES)
        # A resumable upload of unknown length: chunk by chunk as the parts arrive, and the
        # object appears only when the last (short) chunk finalizes it. An exception from
        # `parts` leaves the session unfinished, so nothing is at key (GCS drops the session
        # later); the exception reaches the caller as it was raised.
        try:
            with self._errors(where):
                blob.upload_from_file(reader, rewind=False, size=None,
                                      content_type=_CONTENT_TYPE, timeout=self._timeout,
                                      retry=self._retry())
        except _PartsFailed as failed:
            raise failed.cause from None
        return self._info(blob, key=key, size=reader.position)

    def delete(self, key: str) -> None:
        with self._errors(f"{self.url}{key}"):
            try:
                self._blob(key).delete(timeout=self._timeout, retry=self._retry())
            except api_exceptions.NotFound:
                return

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
            self._local = threading.local()
        for client in clients:
            client.close()

    # -- internals --------------------------------------------------------------------------

    def _client(self) -> Any:
        """This thread's client, made (and the credentials found) on first use."""
        client = getattr(self._local, "client", None)
        if client is not None:
            return client
        credentials, project = self._resolve_credentials()
        client = storage.Client(
            project=project, credentials=credentials,
            client_options={"api_endpoint": self._endpoint} if self._endpoint else None)
        # The client fetches bucket metadata in background threads to annotate traces; that
        # is an unasked-for request per bucket (needing bucket read permission): off.
        client._bucket_metadata_cache = None
        with self._lock:
            self._clients.append(client)
        self._local.client = client
        return client

    def _resolve_credentials(self) -> tuple[Credentials, str | None]:
        with self._lock:
            if self._credentials is not None:
                return self._credentials, self._project
            if self._endpoint:
                credentials: Credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
                project: str | None = os.environ.get("GOOGLE_CLOUD_PROJECT",
                                                     DEFAULT_EMULATOR_PROJECT)
            else:
                try:
                    credentials, project = google.auth.default(scopes=list(_SCOPES))
                except auth_exceptions.DefaultCredentialsError as exc:
                    raise CloudAuthError(
                        f"{self.url}: no usable Google credentials ({_detail(exc)}); set "
                        f"GOOGLE_APPLICATION_CREDENTIALS to a service account key file "
                        f"(or run `gcloud auth application-default login`)") from None
            self._credentials, self._project = credentials, project
            return credentials, project

    def _blob(self, key: str, chunk_size: int | None = None) -> Any:
        bucket = self._client().bucket(self.url.bucket)
        return bucket.blob(self._prefix + key, chunk_size=chunk_size)

    def _retry(self, on_error: Callable[[Exception], None] | None = None) -> Retry:
        return _BoundedRetry(predicate=_Transient(self.options.max_retries), initial=0.1,
                             maximum=5.0, multiplier=2.0, timeout=self._deadline,
                             on_error=on_error)

    def _same_body(self, key: str, body: bytes) -> ObjectInfo | None:
        """The object at key when it holds exactly body (by size and MD5), else None."""
        blob = self._blob(key)
        with self._errors(f"{self.url}{key}"):
            blob.reload(projection="noAcl", timeout=self._timeout, retry=self._retry())
        digest = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        if blob.size is not None and int(blob.size) == len(body) and blob.md5_hash == digest:
            return self._info(blob, key=key)
        return None

    def _info(self, blob: Any, *, key: str | None = None, size: int | None = None) -> ObjectInfo:
        updated = blob.updated
        return ObjectInfo(
            key=key if key is not None else self.url.relative(str(blob.name)),
            size=int(blob.size) if blob.size is not None else (size or 0),
            version=None if blob.generation is None else str(blob.generation),
            mtime=updated.timestamp() if updated is not None else 0.0)

    def _errors(self, where: str) -> MapErrors:
        # _PartsFailed carries the caller's own error out of an upload: put_parts unwraps it.
        return MapErrors(where, map_gcs_error, passing=(_PartsFailed,))


def map_gcs_error(exc: BaseException, where: str) -> CloudError | ConfigError:
    """The tree's error for a failure of google's client at `where` (a store URL and key)."""
    if isinstance(exc, InvalidResponse):  # the upload/download layer's raw HTTP failure
        exc = api_exceptions.from_http_status(  # type: ignore[no-untyped-call]
            int(exc.response.status_code), str(exc))
    if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
        return CloudError(f"{where}: the store failed the request after retries until "
                          f"the deadline: {_detail(exc.cause)}")
    detail = _detail(exc)
    if isinstance(exc, api_exceptions.NotFound):
        return ObjectMissing(f"{where}: not found (no such bucket or object)")
    if isinstance(exc, api_exceptions.PreconditionFailed):
        return ObjectChanged(f"{where}: changed since it was listed (its generation moved "
                             f"on)")
    if isinstance(exc, api_exceptions.Unauthorized | api_exceptions.Forbidden):
        return CloudAuthError(f"{where}: the store refused the credentials ({detail}); check "
                              f"GOOGLE_APPLICATION_CREDENTIALS and the account's roles")
    if isinstance(exc, auth_exceptions.DefaultCredentialsError):
        return CloudAuthError(f"{where}: no Google credentials found; set "
                              f"GOOGLE_APPLICATION_CREDENTIALS to a service account key file")
    if isinstance(exc, auth_exceptions.RefreshError):
        return CloudAuthError(f"{where}: the Google credentials could not be refreshed "
                              f"({detail}); check GOOGLE_APPLICATION_CREDENTIALS")
    if isinstance(exc, api_exceptions.RequestRangeNotSatisfiable):
        return CloudError(f"{where}: the range asked for starts past the object's end")
    if isinstance(exc, DataCorruption):
        return CloudError(f"{where}: the bytes received do not match the store's checksum")
    return CloudError(f"{where}: the store failed the request after retries: {detail}")


def _detail(exc: BaseException) -> str:
    """The first line of exc's message, credentials removed, at most 300 characters.
    Redacted before it is cut: a cut through a secret would hide it from redact."""
    text = redact(str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _endpoint(options: StoreOptions) -> str | None:
    """The emulator's (or a test proxy's) base URL, when there is one."""
    endpoint = options.endpoint or os.environ.get("STORAGE_EMULATOR_HOST")
    if not endpoint:
        return None
    endpoint = endpoint.rstrip("/")
    # STORAGE_EMULATOR_HOST is often written host:port, as gcloud's docs show it.
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def _generation(version: str, where: str) -> int:
    try:
        return int(version)
    except ValueError:
        raise ObjectChanged(f"{where}: version {version!r} is not a GCS generation; the "
                            f"object cannot be that version") from None


def _is_transient(exc: Exception) -> bool:
    """5xx, 429, 408 and connection failures: worth another try."""
    if isinstance(exc, _RETRYABLE_TYPES):
        return True
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in _RETRYABLE_STATUS
    if isinstance(exc, InvalidResponse):
        return int(exc.response.status_code) in _RETRYABLE_STATUS
    if isinstance(exc, auth_exceptions.TransportError) and exc.args:
        cause = exc.args[0]
        return isinstance(cause, Exception) and _is_transient(cause)
    return False


class _Transient:
    """The retry predicate, carrying how many retries one request may have."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def __call__(self, exc: Exception) -> bool:
        return _is_transient(exc)


class _BoundedRetry(Retry):
    """google's Retry (exponential backoff within a deadline) that also stops after
    `max_retries` retries of each wrapped request: api_core's own counts only time."""

    def __call__(self, func: Callable[_P, _R],
                 on_error: Callable[[Exception], Any] | None = None) -> Callable[_P, _R]:
        transient = self._predicate
        limit = getattr(transient, "max_retries", None)
        on_error = self._on_error or on_error

        @functools.wraps(func)
        def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            retries = 0

            def predicate(exc: Exception) -> bool:
                nonlocal retries
                if not transient(exc) or (limit is not None and retries >= limit):
                    return False
                retries += 1
                return True

            sleeps = exponential_sleep_generator(self._initial, self._maximum,
                                                 multiplier=self._multiplier)
            result: _R = retry_target(functools.partial(func, *args, **kwargs), predicate,
                                      sleeps, timeout=self._timeout, on_error=on_error)
            return result

        return wrapped


class _PartsFailed(Exception):
    """Carries an exception raised by the caller's parts iterator through google's upload
    code, so that it reaches the caller unchanged rather than mapped as a store failure."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _PartsReader(io.RawIOBase):
    """A read-only stream over an iterable of buffers, for a resumable upload of unknown
    length; holds at most one part beyond what has been read."""

    def __init__(self, parts: Iterable[Buffer]) -> None:
        super().__init__()
        self._parts = iter(parts)
        self._pending = memoryview(b"")
        self.position = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def read(self, size: int | None = -1) -> bytes:
        wanted = None if size is None or size < 0 else size
        out = bytearray()
        while wanted is None or len(out) < wanted:
            if not self._pending:
                try:
                    part = next(self._parts, None)
                except Exception as exc:
                    raise _PartsFailed(exc) from exc
                if part is None:
                    break
                self._pending = memoryview(part).cast("B")
                continue
            take = len(self._pending) if wanted is None else wanted - len(out)
            out += self._pending[:take]
            self._pending = self._pending[take:]
        self.position += len(out)
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
