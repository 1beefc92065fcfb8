"""Bearer tokens for cluster mode: every registry and node call carries one.

`cluster up` generates a token into `<data_dir>/token` (mode 0600); a process finds it in,
first, an explicit token file, then the `MULTICLOUD_TOKEN` environment variable, then the
data dir's token file. Servers compare in constant time and answer 401 before reading a
request body, so an unauthenticated write stores nothing.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # aiohttp loads only where a server runs: the CLI starts faster
    from aiohttp import web
    from aiohttp.typedefs import Middleware

from multicloud.core.errors import ConfigError

TOKEN_ENV = "MULTICLOUD_TOKEN"
TOKEN_FILE = "token"

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


def generate_token(data_dir: str | Path) -> str:
    """Create (or keep) the data dir's token file and return the token."""
    path = Path(data_dir) / TOKEN_FILE
    if path.exists():
        return read_token_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def read_token_file(path: str | Path) -> str:
    """The token stored in a file."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def resolve_token(token_file: str | Path | None = None, data_dir: str | Path | None = None,
                  *, create: bool = False) -> str:
    """The token to use: explicit file, else $MULTICLOUD_TOKEN, else the data dir's file."""
    if token_file is not None:
        return read_token_file(token_file)
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if data_dir is not None:
        path = Path(data_dir) / TOKEN_FILE
        if path.exists():
            return read_token_file(path)
        if create:
            return generate_token(data_dir)
    where = f" or {Path(data_dir) / TOKEN_FILE}" if data_dir is not None else ""
    raise ConfigError(f"no cluster token: set {TOKEN_ENV}, pass --token-file{where}; "
                      f"`multicloud cluster up` or `multicloud registry` creates one")


def auth_middleware(token: str) -> Middleware:
    """aiohttp middleware answering 401 unless the request carries `Bearer <token>`."""
    from aiohttp import web

    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"error": "unauthorized", "message": "missing or wrong bearer token"},
                status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


def auth_header(token: str) -> dict[str, str]:
    """The header a client sends."""
    return {"Authorization": f"Bearer {token}"}
