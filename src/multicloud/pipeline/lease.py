"""Who runs a batch: the lease a run holds in the manifest, and whether its holder lives.

A run writes its owner (`host:pid:boot:run`, the run part telling two orchestrators of one
process apart) and renews a heartbeat while it works. Another
process may take the batch over only when the holder is gone: on the same host (and boot)
that is a dead pid, which is exact; from another host it is a heartbeat older than
`LEASE_TTL_S`, since a pid there cannot be checked. Within this process an owner lives
from `this_owner` until `owner_gone`: an orchestrator that was closed (or, in the
simulator, killed) holds nothing.
"""

from __future__ import annotations

import os
import socket

from multicloud.core import clock
from multicloud.core.host import boot_marker, process_alive

__all__ = ["LEASE_RENEW_S", "LEASE_TTL_S", "describe_owner", "owner_alive", "owner_gone",
           "this_owner"]

LEASE_RENEW_S = 5.0  # how often a run renews its heartbeat
LEASE_TTL_S = 60.0  # a heartbeat this old means the holder on another host is gone

_live_runs: set[str] = set()  # the run parts of this process's owners that still live


def this_owner(run: str = "") -> str:
    """The owner string of this process ("host:pid:boot"), with ":run" when given: two
    orchestrators in one process are two owners."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{boot_marker()}"
    if not run:
        return owner
    _live_runs.add(run)
    return f"{owner}:{run}"


def owner_gone(owner: str) -> None:
    """The run that owner names (one of this process's) has ended: its leases are free."""
    _live_runs.discard(owner.split(":", 3)[3] if owner.count(":") >= 3 else "")


def describe_owner(owner: str) -> str:
    """"pid 123 on host h" for an owner string."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return f"pid {pid} on host {host}"


def owner_alive(owner: str, heartbeat_at: float | None, now: float | None = None) -> bool:
    """Whether the process that wrote owner (and renewed at heartbeat_at) still runs."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, rest = rest.partition(":")
    boot, _, run = rest.partition(":")
    if host == socket.gethostname() and boot == boot_marker():
        try:
            pid = int(pid_text)
        except ValueError:
            return False
        if pid == os.getpid():
            return not run or run in _live_runs
        return process_alive(pid)
    now = clock.wall() if now is None else now
    return heartbeat_at is not None and now - heartbeat_at < LEASE_TTL_S
