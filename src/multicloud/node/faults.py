"""Faults a node can be told to suffer, so that failure tests run on any transport.

The faults live in the node, where a real one would strike: a crashed node refuses every
request (and a reply it was about to send never leaves), a partition refuses bytes from
across it at the receiver and stops the sender before it sends, a full disk fails the
write inside the chunk store, a crash in the middle of a write leaves a partial temp file.
The orchestrator switches them with `fault` requests (`multicloud.comm.faults.Faults`),
which travel like any other request: an in-process node and an HTTP node behave alike.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass
class HeldWrites:
    """Holds every write to the node until released, so a test can act at an exact moment."""

    held: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)


class NodeFaults:
    """The faults switched on for one node (none by default)."""

    def __init__(self, seed: int | str = 0) -> None:
        self.crashed = False
        self.partitions: set[frozenset[str]] = set()
        self.gate: HeldWrites | None = None
        self.rng = random.Random(seed)
        self._crash_on_write: int | None = None

    def partitioned(self, cloud_a: str, cloud_b: str) -> bool:
        """Whether the network between two clouds is cut."""
        return cloud_a != cloud_b and frozenset((cloud_a, cloud_b)) in self.partitions

    def crash_on_write(self, nth: int) -> None:
        """Crash in the middle of the nth write from now."""
        self._crash_on_write = max(nth, 1)

    def disarm(self) -> None:
        """Cancel a crash in the middle of a write that has not come yet."""
        self._crash_on_write = None

    def write_crashes_now(self) -> bool:
        """Count one write; True when it is the one to crash in."""
        if self._crash_on_write is None:
            return False
        if self._crash_on_write > 1:
            self._crash_on_write -= 1
            return False
        self._crash_on_write = None
        return True

    async def hold_if_gated(self) -> None:
        """Wait here while a write gate is closed."""
        gate = self.gate
        if gate is None or gate.opened.is_set():
            return
        gate.held += 1
        gate.arrived.set()
        await gate.opened.wait()
