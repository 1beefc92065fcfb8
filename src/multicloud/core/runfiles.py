"""Small pieces shared by the long-running cluster processes (registry, nodes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": name, "url": url, "pid": os.getpid()}))
    os.replace(tmp, path)
    return path
