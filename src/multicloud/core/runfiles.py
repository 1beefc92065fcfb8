"""Small pieces shared by the long-running cluster processes (registry, nodes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

from multicloud.core.errors import storage_error


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM (the caller then shuts down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def ready_file(data_dir: str | Path, name: str) -> Path:
    """Where a process announces that it is serving: `<data_dir>/run/<name>.json`."""
    return Path(data_dir) / "run" / f"{name}.json"


def write_ready_file(data_dir: str | Path, name: str, url: str) -> Path:
    """Announce {"url", "pid"} atomically, so a launcher or a test can find the process."""
    path = ready_file(data_dir, name)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"name": name, "url": url, "pid": os.getpid()}))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise storage_error(exc, f"cannot write the ready file {path}") from exc
    return path


_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def service_url(host: str, port: int) -> str:
    """The URL clients use for a server bound to host:port: a wildcard bind is reached on
    loopback, an IPv6 address goes in brackets."""
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
