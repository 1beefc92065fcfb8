"""S3, Azure Blob and in-memory stores through obstore (Rust's `object_store`).

Connection details come from the cloud's standard places, with `StoreOptions` (the
`stores:` entries of cluster_config.yml) on top:

- S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else the profile
  named by AWS_PROFILE (default "default") in ~/.aws/credentials, else the instance's
  role; the region from AWS_REGION / AWS_DEFAULT_REGION; the endpoint from the options,
  else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (what the AWS SDKs honour), so MinIO or an
  emulator needs no config file. Path-style requests whenever an endpoint is given.
- Azure: AZURE_STORAGE_CONNECTION_STRING (AccountName, AccountKey or SharedAccessSignature,
  BlobEndpoint; UseDevelopmentStorage=true means azurite's defaults), else the account from
  the URL or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_SAS_TOKEN,
  else obstore's own chain (service principal variables, managed identity, the Azure CLI).
- memory://name/: one store per name for the life of the process (tests, the simulator).

An endpoint that says http:// is taken at its word (as the SDKs do); otherwise plain http
needs `allow_http`.
"""

from __future__ import annotations

import configparser
import datetime as dt
import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
from obstore import exceptions as obx
from obstore.store import AzureStore, MemoryStore, S3Store

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

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")
_PUT_PART = 8 * 1024 * 1024  # multipart part size for put_parts (S3's minimum is 5 MiB)

_memory_stores: dict[str, MemoryStore] = {}
_memory_lock = threading.Lock()

ObstoreClient = S3Store | AzureStore | MemoryStore


class ObstoreStore(ObjectStore):
    """An ObjectStore on an obstore client (S3, Azure Blob or memory)."""

    def __init__(self, url: StoreUrl, options: StoreOptions) -> None:
        super().__init__(url, options)
        self._client = _client(url, options)
        self._prefix = url.prefix

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        stream = obstore.list(self._client, self._prefix + prefix or None, chunk_size=1000)
        with self._errors(prefix):
            for page in stream:
                for meta in page:
                    yield self._info(meta)

    def head(self, key: str) -> ObjectInfo:
        with self._errors(key):
            return self._info(obstore.head(self._client, self._prefix + key))

    def get(self, key: str, start: int = 0, end: int | None = None, *,
            version: str | None = None) -> Buffer:
        options: dict[str, Any] = {}
        if version is not None:
            options["if_match"] = version
        if end is not None and end <= start:
            if version is not None:  # still prove the version: nothing to read otherwise
                self._check_version(key, version)
            return b""
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        with self._errors(key):
            result = obstore.get(self._client, self._prefix + key,
                                 options=options or None)  # type: ignore[arg-type]
            return memoryview(result.bytes())

    def put(self, key: str, data: Buffer, *, create_only: bool = False) -> ObjectInfo:
        with self._errors(key):
            result = obstore.put(self._client, self._prefix + key, data,
                                 mode="create" if create_only else "overwrite",
                                 use_multipart=False)
        return ObjectInfo(key, len(data), _quoted(result.get("e_tag")), _now())

    def put_parts(self, key: str, parts: Iterable[Buffer]) -> ObjectInfo:
        size = 0
        raised: list[BaseException] = []

        def counted() -> Iterator[Buffer]:
            nonlocal size
            try:
                for part in parts:
                    size += len(part)
                    yield part
            except BaseException as exc:  # the caller's own failure: kept to raise as is
                raised.append(exc)
                raise

        try:
            with self._errors(key):
                result = obstore.put(self._client, self._prefix + key, counted(),
                                     chunk_size=_PUT_PART, max_concurrency=4)
        except CloudError:
            if raised:  # obstore aborted the upload and wrapped the caller's error
                raise raised[0] from None
            raise
        return ObjectInfo(key, size, _quoted(result.get("e_tag")), _now())

    def delete(self, key: str) -> None:
        with self._errors(key):
            try:
                obstore.delete(self._client, self._prefix + key)
            except (obx.NotFoundError, FileNotFoundError):
                return

    # -- internals ------------------------------------------------------------------------

    def _check_version(self, key: str, version: str) -> None:
        current = self.head(key).version
        if current != version:
            raise ObjectChanged(f"{self.url}{key} changed: version {current} is not "
                                f"{version}")

    def _info(self, meta: Any) -> ObjectInfo:
        modified = meta.get("last_modified")
        return ObjectInfo(key=self.url.relative(str(meta["path"])), size=int(meta["size"]),
                          version=_quoted(meta.get("e_tag")),
                          mtime=modified.timestamp() if modified else 0.0)

    def _errors(self, key: str) -> MapErrors:
        return MapErrors(f"{self.url}{key}", map_obstore_error)


def map_obstore_error(exc: BaseException, where: str) -> CloudError | ConfigError:
    """The tree's error for an obstore failure at `where` (a store URL and key)."""
    text = redact(str(exc))  # before any cut: a cut secret would no longer be recognised
    detail = _first_line(text)
    status = _status(text)
    # obstore raises a plain FileNotFoundError for a missing object or bucket.
    if isinstance(exc, obx.NotFoundError | FileNotFoundError) or status == 404:
        return ObjectMissing(f"{where}: not found (no such bucket, container or object)")
    if isinstance(exc, obx.AlreadyExistsError):
        return ObjectExists(f"{where}: already exists; it was left as it is")
    if isinstance(exc, obx.PreconditionError):
        return ObjectChanged(f"{where}: changed since it was listed (its ETag moved on)")
    if isinstance(exc, obx.UnknownConfigurationKeyError):
        return ConfigError(f"{where}: {detail}")
    if "169.254.169.254" in text or "credential" in detail.lower():
        # Nothing in the environment, so the client asked the instance metadata service,
        # which is not there (or refused): say what would have worked.
        return CloudAuthError(f"{where}: {_NO_CREDENTIALS.get(where.split(':', 1)[0], detail)}")
    if isinstance(exc, obx.PermissionDeniedError | obx.UnauthenticatedError) \
            or status in (401, 403):
        answer = f"HTTP {status}" if status else detail
        return CloudAuthError(f"{where}: the store refused the credentials ({answer}); check "
                              f"the cloud's credentials in the environment")
    return CloudError(f"{where}: the store failed the request after retries: {detail}")


_STATUS = re.compile(r"status code: (\d{3})\b")


def _status(text: str) -> int | None:
    """The HTTP status obstore quotes ("Server returned non-2xx status code: 404 ..."),
    never digits from elsewhere in the message (a timing, a port)."""
    match = _STATUS.search(text)
    return int(match[1]) if match else None


_NO_CREDENTIALS = {
    "s3": "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
          "AWS_PROFILE (a profile in ~/.aws/credentials), or run on an instance with a role",
    "az": "no Azure credentials found: set AZURE_STORAGE_CONNECTION_STRING, or "
          "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN",
}


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line if len(line) <= 300 else line[:297] + "..."


def _quoted(etag: object) -> str | None:
    """ETags as HTTP sends them, quoted (listings hand some out bare)."""
    if etag is None:
        return None
    text = str(etag)
    return text if text.startswith(('"', 'W/"')) else f'"{text}"'


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


# -- clients --------------------------------------------------------------------------------

def _client(url: StoreUrl, options: StoreOptions) -> ObstoreClient:
    retry: RetryConfig = {"max_retries": options.max_retries,
                          "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                                      "max_backoff": dt.timedelta(seconds=5), "base": 2},
                          "retry_timeout": dt.timedelta(seconds=max(options.timeout_s, 1.0)
                                                        * (options.max_retries + 1))}
    client: ClientConfig = {"timeout": dt.timedelta(seconds=options.timeout_s),
                            "connect_timeout": dt.timedelta(seconds=min(options.timeout_s, 10))}
    try:
        if url.scheme == "memory":
            with _memory_lock:
                return _memory_stores.setdefault(url.bucket, MemoryStore())
        if url.scheme == "s3":
            return _s3(url, options, client, retry)
        if url.scheme == "az":
            return _azure(url, options, client, retry)
    except (ValueError, obx.BaseError) as exc:
        raise ConfigError(f"{url}: cannot set up its client: "
                          f"{redact(_first_line(str(exc)))}") from None
    raise ConfigError(f"{url}: obstore does not carry {url.scheme}:// here")


def _s3(url: StoreUrl, options: StoreOptions, client: ClientConfig,
        retry: RetryConfig) -> S3Store:
    endpoint = (options.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    config: dict[str, Any] = {
        "region": options.region or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        config.update(endpoint=endpoint, virtual_hosted_style_request=False)
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        config.update(_aws_profile())
    client["allow_http"] = options.allow_http or bool(endpoint and endpoint.startswith("http:"))
    return S3Store(url.bucket, config=config,  # type: ignore[arg-type]
                   client_options=client, retry_config=retry)


def _aws_profile() -> dict[str, str]:
    """Keys of the AWS profile (AWS_PROFILE, else "default") in the shared credentials file;
    none when there is no such file or profile (obstore then tries the instance's role)."""
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
                or Path.home() / ".aws" / "credentials")
    profile = os.environ.get("AWS_PROFILE", "default")
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except (OSError, configparser.Error):
        return {}
    if not parser.has_section(profile):
        return {}
    section = parser[profile]
    found = {"access_key_id": section.get("aws_access_key_id"),
             "secret_access_key": section.get("aws_secret_access_key"),
             "session_token": section.get("aws_session_token")}
    return {name: value for name, value in found.items() if value}


def _azure(url: StoreUrl, options: StoreOptions, client: ClientConfig,
           retry: RetryConfig) -> AzureStore:
    config: dict[str, Any] = {}
    parts = _connection_string(os.environ.get("AZURE_STORAGE_CONNECTION_STRING", ""))
    endpoint = options.endpoint or parts.get("blobendpoint")
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        config.update(account_name=AZURITE_ACCOUNT, account_key=AZURITE_KEY)
        endpoint = endpoint or os.environ.get("AZURITE_BLOB_STORAGE_URL",
                                              "http://127.0.0.1:10000") + f"/{AZURITE_ACCOUNT}"
    account = (url.account or parts.get("accountname")
               or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
               or os.environ.get("AZURE_STORAGE_ACCOUNT"))
    if account:
        config["account_name"] = account
    key = (parts.get("accountkey") or os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
           or os.environ.get("AZURE_STORAGE_KEY"))
    sas = parts.get("sharedaccesssignature") or os.environ.get("AZURE_STORAGE_SAS_TOKEN")
    if key:
        config["account_key"] = key
    elif sas:
        config["sas_key"] = sas.lstrip("?")
    if endpoint:
        config["endpoint"] = endpoint
    if "account_name" not in config:
        # obstore's repr of an AzureStore without an account panics; refuse it here.
        raise ConfigError(f"{url}: no Azure storage account: use https://ACCOUNT.blob.core."
                          f"windows.net/..., or set AZURE_STORAGE_ACCOUNT_NAME or "
                          f"AZURE_STORAGE_CONNECTION_STRING")
    client["allow_http"] = options.allow_http or bool(endpoint and endpoint.startswith("http:"))
    return AzureStore(url.bucket, config=config,  # type: ignore[arg-type]
                      client_options=client, retry_config=retry)


def _connection_string(text: str) -> dict[str, str]:
    """An Azure connection string's fields, names lower-cased ("accountname": ...)."""
    fields: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            fields[name.strip().lower()] = value.strip()
    return fields
