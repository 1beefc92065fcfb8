"""Cluster mode's bearer tokens and the files and signals its long-running processes share."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from multicloud.core.auth import (
    TOKEN_ENV,
    auth_header,
    auth_middleware,
    generate_token,
    read_token_file,
    resolve_token,
)
from multicloud.core.errors import ConfigError, StorageError
from multicloud.core.runfiles import ready_file, wait_for_signal, write_ready_file

TOKEN = "unit-token"


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


# -- tokens ----------------------------------------------------------------------------------

def test_generate_token_creates_a_private_file_once(tmp_path: Path) -> None:
    token = generate_token(tmp_path / "data")
    path = tmp_path / "data" / "token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(token) >= 32
    assert path.read_text() == token + "\n"
    assert generate_token(tmp_path / "data") == token  # kept, not regenerated
    assert generate_token(tmp_path / "other") != token


def test_read_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read token file"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(tmp_path / "empty")
    (tmp_path / "ok").write_text("  secret \n")
    assert read_token_file(tmp_path / "ok") == "secret"


def test_resolve_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "token").write_text("from-data-dir\n")
    explicit = tmp_path / "explicit"
    explicit.write_text("from-file\n")
    monkeypatch.setenv(TOKEN_ENV, " from-env ")
    assert resolve_token(explicit, data) == "from-file"
    assert resolve_token(None, data) == "from-env"
    monkeypatch.setenv(TOKEN_ENV, "   ")  # blank counts as unset
    assert resolve_token(None, data) == "from-data-dir"
    monkeypatch.delenv(TOKEN_ENV)
    assert resolve_token(None, data) == "from-data-dir"


def test_resolve_token_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=TOKEN_ENV) as info:
        resolve_token(None, tmp_path)
    assert str(tmp_path / "token") in str(info.value)
    assert not (tmp_path / "token").exists()  # only create=True makes one
    with pytest.raises(ConfigError, match="--token-file"):
        resolve_token()
    made = resolve_token(None, tmp_path / "new", create=True)
    assert (tmp_path / "new" / "token").read_text().strip() == made
    assert resolve_token(None, tmp_path / "new", create=True) == made


async def test_auth_middleware_answers_401_before_the_handler() -> None:
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(await request.text())
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[auth_middleware(TOKEN)])
    app.router.add_post("/x", handler)
    async with TestClient(TestServer(app)) as client:
        for headers in ({}, {"Authorization": TOKEN}, {"Authorization": "Bearer " + TOKEN[:-1]},
                        {"Authorization": "Bearer"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            resp = await client.post("/x", data=b"payload", headers=headers)
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"] == "unauthorized"
        assert calls == []  # the handler never ran, so no body was read
        resp = await client.post("/x", data=b"payload", headers=auth_header(TOKEN))
        assert resp.status == 200
        assert calls == ["payload"]


# -- ready files and signals -----------------------------------------------------------------

def test_write_ready_file_is_atomic_and_complete(tmp_path: Path) -> None:
    path = write_ready_file(tmp_path, "aws-node-1", "http://127.0.0.1:1234")
    assert path == ready_file(tmp_path, "aws-node-1") == tmp_path / "run" / "aws-node-1.json"
    assert json.loads(path.read_text()) == {"name": "aws-node-1", "url": "http://127.0.0.1:1234",
                                            "pid": os.getpid()}
    write_ready_file(tmp_path, "aws-node-1", "http://127.0.0.1:5678")
    assert json.loads(path.read_text())["url"] == "http://127.0.0.1:5678"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["aws-node-1.json"]


def test_a_ready_file_that_cannot_be_written_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file where the run dir should be")
    with pytest.raises(StorageError, match="cannot write the ready file") as info:
        write_ready_file(tmp_path, "registry", "http://127.0.0.1:7400")
    assert str(ready_file(tmp_path, "registry")) in str(info.value)


async def test_wait_for_signal_returns_on_sigterm_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    task = asyncio.create_task(wait_for_signal())
    await asyncio.sleep(0)  # one step of the task: it installs its handlers, then waits
    assert signal.getsignal(signal.SIGTERM) != before
    assert not task.done()
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        await task
    assert signal.getsignal(signal.SIGTERM) == before
