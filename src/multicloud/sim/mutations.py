"""Deliberately broken builds, to show the simulator catches what it claims to.

- `quorum-1`: chunks commit after one durable replica while the model still expects
  the configured write quorum (the world passes the weakened quorum to the product).
- `no-repair`: repair does nothing: no re-replication after failures, at the end of a
  run, in `multicloud repair`, or for hinted copies.

A mutation is switched on for one seed's run and off again afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from multicloud.core.errors import UsageError
from multicloud.pipeline.repair import Repairer, RepairReport

__all__ = ["MUTATIONS", "mutated"]

MUTATIONS = ("quorum-1", "no-repair")


@contextmanager
def mutated(mutation: str) -> Iterator[None]:
    """Switch one mutation on for the duration ('' for the real build)."""
    if mutation and mutation not in MUTATIONS:
        raise UsageError(f"unknown mutation {mutation!r}: choose {' or '.join(MUTATIONS)}")
    if mutation != "no-repair":
        yield
        return

    async def no_repair(self: Repairer, chunk_ids: Iterable[str]) -> RepairReport:
        return RepairReport()

    async def no_hints(self: Repairer) -> RepairReport:
        return RepairReport()

    saved = Repairer.repair, Repairer.replay_hints
    Repairer.repair, Repairer.replay_hints = no_repair, no_hints  # type: ignore[method-assign]
    try:
        yield
    finally:
        Repairer.repair, Repairer.replay_hints = saved  # type: ignore[method-assign]
