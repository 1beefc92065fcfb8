"""A loopback HTTP proxy in front of an emulator that answers chosen requests with faults.

The cloud failure tests point a store at the proxy (`StoreOptions(endpoint=proxy.url)`)
and tell it what to break: the first N requests answered 503 (S3's SlowDown, GCS's
backendError, Azure's ServerBusy, each in its store's error format), or any request that
matches a predicate answered with a given status, optionally after passing it on (a write
that landed but whose answer was lost). Every request is recorded, so a test can also
prove what the client sent (a precondition, a page token).
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, urlsplit

Flavor = Literal["s3", "gs", "az"]

# Headers that describe one hop of a connection; never passed on.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailers", "transfer-encoding", "upgrade", "content-length"}
_S3_CODES = {403: "AccessDenied", 404: "NoSuchKey", 412: "PreconditionFailed",
             429: "SlowDown", 500: "InternalError", 503: "SlowDown"}
_GS_REASONS = {403: "forbidden", 404: "notFound", 412: "conditionNotMet",
               429: "rateLimitExceeded", 500: "backendError", 503: "backendError"}
_AZ_CODES = {403: "AuthorizationFailure", 404: "BlobNotFound", 412: "ConditionNotMet",
             429: "ServerBusy", 500: "InternalError", 503: "ServerBusy"}


@dataclass(frozen=True)
class Seen:
    """One request the proxy received."""

    method: str
    path: str  # without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Fault:
    """Answer `status` to the requests that match, `times` of them (None: every one)."""

    status: int = 503
    times: int | None = None
    when: Callable[[Seen], bool] = field(default=lambda seen: True)
    forward: bool = False  # pass the request on first, then answer the fault anyway
    message: str | None = None  # the error document's message (default: the status)
    hits: int = 0

    def takes(self, seen: Seen) -> bool:
        return (self.times is None or self.hits < self.times) and self.when(seen)


class FaultProxy:
    """The proxy: `url` to point a store at, `faults` to arm, `seen` to inspect."""

    def __init__(self, upstream: str, flavor: Flavor) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.flavor = flavor
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def fail_first(self, count: int, status: int = 503) -> Fault:
        """Answer the next `count` requests with status."""
        return self.add(Fault(status, times=count))

    def fail_when(self, when: Callable[[Seen], bool], status: int, *,
                  times: int | None = None, forward: bool = False,
                  message: str | None = None) -> Fault:
        """Answer the requests for which when(request) is true with status."""
        return self.add(Fault(status, times=times, when=when, forward=forward,
                              message=message))

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if method is None or s.method == method]

    def fault_for(self, seen: Seen) -> Fault | None:
        with self.lock:
            self.seen.append(seen)
            for fault in self.faults:
                if fault.takes(seen):
                    fault.hits += 1
                    return fault
        return None

    def error_body(self, status: int,
                   message: str | None = None) -> tuple[bytes, dict[str, str]]:
        """The error document the real store sends for status, and its headers."""
        reason = http.client.responses.get(status, "")
        message = message or f"fault proxy: {status} {reason}".strip()
        if self.flavor == "gs":
            reason = _GS_REASONS.get(status, "backendError")
            body = {"error": {"code": status, "message": message,
                              "errors": [{"message": message, "domain": "global",
                                          "reason": reason}]}}
            return json.dumps(body).encode(), {"Content-Type": "application/json"}
        code = (_S3_CODES if self.flavor == "s3" else _AZ_CODES).get(status, "InternalError")
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
               f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>")
        headers = {"Content-Type": "application/xml"}
        if self.flavor == "az":
            headers["x-ms-error-code"] = code
        return xml.encode(), headers

    def forward(self, method: str, target: str, headers: list[tuple[str, str]],
                body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            passed = {name: value for name, value in headers if name.lower() not in _HOP}
            conn.request(method, target, body=body if body or method in (
                "PUT", "POST", "PATCH") else None, headers=passed)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            conn.close()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return  # quiet: the tests read `proxy.seen`

        def do_any(self) -> None:
            body = self._body()
            parts = urlsplit(self.path)
            seen = Seen(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                        {k.lower(): v for k, v in self.headers.items()})
            fault = proxy.fault_for(seen)
            if fault is not None:
                if fault.forward:
                    self._relay_or_502(body, send=False)
                payload, headers = proxy.error_body(fault.status, fault.message)
                self._answer(fault.status, "", list(headers.items()), payload)
                return
            self._relay_or_502(body, send=True)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_any  # noqa: N815

        def _relay_or_502(self, body: bytes, *, send: bool) -> None:
            try:
                status, reason, headers, data = proxy.forward(
                    self.command, self.path, list(self.headers.items()), body)
            except OSError as exc:
                if send:
                    payload, extra = proxy.error_body(502)
                    self._answer(502, str(exc), list(extra.items()), payload)
                return
            if send:
                self._answer(status, reason, headers, data, upstream=True)

        def _answer(self, status: int, reason: str, headers: list[tuple[str, str]],
                    data: bytes, *, upstream: bool = False) -> None:
            self.send_response_only(status, reason or None)
            length = None
            for name, value in headers:
                if name.lower() == "content-length":
                    length = value
                if name.lower() not in _HOP:
                    self.send_header(name, value)
            if self.command == "HEAD":
                # A HEAD answer carries the length of what a GET would, and no body.
                self.send_header("Content-Length", length if upstream and length else "0")
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data and status not in (204, 304):
                self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

    return Handler
