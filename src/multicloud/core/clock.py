"""The clocks that decisions and stamps read, so a simulation can replace both.

Adaptive timeouts, the link emulation, commit flushes, the failure detector and the run's
metrics measure durations with `monotonic()`: the running event loop's time, which is
`time.monotonic()` for asyncio's own loops and virtual time under the simulator
(`multicloud.sim`), so a simulated run decides exactly as a real one would, only without
waiting. Outside a loop (a worker thread) it is `time.monotonic()`.

The stamps the manifest and the catalogue keep (when a batch began, a lease's heartbeat)
read `wall()`: `time.time()`, or under the simulator a fixed epoch plus virtual time, so
a simulated batch's manifest is the same bytes on every run of its seed. Ages compared
with the file system's own times (gc's grace, stale temp files) stay on `time.time()`.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["monotonic", "virtual_wall", "wall"]

# The simulator's epoch: wall() is this plus the loop's virtual time (None: real time).
_epoch: contextvars.ContextVar[float | None] = contextvars.ContextVar("multicloud_wall_epoch",
                                                                     default=None)


def monotonic() -> float:
    """Seconds on the running loop's clock (time.monotonic() where no loop runs)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def wall() -> float:
    """Seconds since 1970 for stamps: time.time(), or virtual time under the simulator."""
    epoch = _epoch.get()
    return time.time() if epoch is None else epoch + monotonic()


@contextmanager
def virtual_wall(epoch: float) -> Iterator[None]:
    """Within the block, wall() reads epoch plus the loop's time (the simulator's); loops
    started inside inherit it."""
    token = _epoch.set(epoch)
    try:
        yield
    finally:
        _epoch.reset(token)
