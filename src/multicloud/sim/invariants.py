"""The model of what the system owes the user, and the checks against it.

The simulator knows every file's bytes and every fault it injected; `Model` keeps what
follows from that (which batches committed, which replicas a fault destroyed) and checks
the census of the disks and the system's own reports against it:

1. a batch that reported success restores byte-exact (after heal and repair at the end,
   and whenever a restore says it restored everything);
2. no chunk of a committed batch is left with no good replica while at most RF - 1 of
   its holders were failed by a fault (and not every one of them: a chunk committed at
   quorum while a node was full has fewer than RF holders to lose); a chunk the manifest
   records as committed always has at least write_quorum copies that are good or were
   destroyed by a fault; and no needed replica disappears without a fault unless RF good
   copies remain;
3. after heal and repair, every committed chunk has RF good replicas across at least
   min_clouds clouds, and gc leaves no object that nothing references;
4. verify reports every corrupt and missing replica it could reach, and nothing else;
5. a resumed batch sends no chunk that was committed and still listed by a node;
6. no command ends in anything but one line of the error tree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from multicloud.core.types import VerifyReport
from multicloud.sim.truth import Census

__all__ = ["InvariantViolated", "Model"]


class InvariantViolated(Exception):
    """An invariant failed; `number` says which (1-6, 7 for liveness after heal)."""

    def __init__(self, number: int, message: str) -> None:
        super().__init__(f"invariant {number}: {message}")
        self.number = number


@dataclass
class Model:
    """What the simulator knows: committed batches, their chunks, destroyed replicas."""

    replication_factor: int
    write_quorum: int
    min_clouds: int
    cloud_of: dict[str, str]
    committed: dict[str, set[str]] = field(default_factory=dict)  # batch -> chunk ids
    catalogued: dict[str, str] = field(default_factory=dict)  # batch -> its manifest object
    harmed: dict[str, set[str]] = field(default_factory=dict)  # chunk -> nodes a fault hit
    good_before: dict[str, set[str]] = field(default_factory=dict)
    held: dict[str, set[str]] = field(default_factory=dict)  # every node seen holding it

    def needed(self) -> set[str]:
        """Every chunk (and manifest object) a committed batch references."""
        return set().union(*self.committed.values()) if self.committed else set()

    def lost(self, census: Census) -> set[str]:
        """Needed chunks with no good copy left: every copy was destroyed by faults (the
        checks of invariant 2 vouch for that), so nothing can bring them back."""
        return {c for c in self.needed() if not census.good(c)}

    def restorable(self, batch: str, census: Census) -> bool:
        """Whether every data chunk of a committed batch still has a good copy (its
        manifest object may be lost: the local manifest still knows the batch)."""
        data = self.committed[batch] - {self.catalogued.get(batch, "")}
        return not (data & self.lost(census))

    def harm(self, chunk_id: str, node_id: str) -> None:
        """A fault destroyed node_id's copy of chunk_id."""
        self.harmed.setdefault(chunk_id, set()).add(node_id)

    # -- checked after every step -----------------------------------------------------------

    def check_replicas(self, census: Census, recorded: Iterable[str]) -> None:
        """Invariant 2 over the census: nothing needed lost without a fault, every recorded
        chunk at quorum, no committed chunk without a copy while RF - 1 or fewer failed."""
        for chunk_id in sorted(self.harmed):  # a node holding a good copy again is whole
            self.harmed[chunk_id] -= census.good(chunk_id)
        rf, quorum = self.replication_factor, self.write_quorum
        for chunk_id in sorted(set(recorded)):
            good, harmed = census.good(chunk_id), self.harmed.get(chunk_id, set())
            if len(good | harmed) < quorum:
                raise InvariantViolated(2, f"chunk {chunk_id[:12]} is recorded as committed "
                                           f"but has {len(good)} good replica(s) "
                                           f"({_nodes(good)}) and {len(harmed)} destroyed by "
                                           f"faults: fewer than the write quorum {quorum}")
        needed = self.needed()
        for chunk_id in sorted(set(self.good_before) - needed):
            del self.good_before[chunk_id]  # no longer owed: gc may take it
            self.held.pop(chunk_id, None)
        for chunk_id in sorted(needed):
            good, harmed = census.good(chunk_id), self.harmed.get(chunk_id, set())
            holders = self.held.setdefault(chunk_id, set())
            holders |= good
            if not good and len(harmed) <= rf - 1 and holders - harmed:
                raise InvariantViolated(2, f"chunk {chunk_id[:12]} of a committed batch has no "
                                           f"good replica left, though faults destroyed only "
                                           f"{len(harmed)} of its {len(holders)} holders "
                                           f"({_nodes(harmed)})")
            vanished = self.good_before.get(chunk_id, set()) - good - harmed
            if vanished and len(good) < rf:
                raise InvariantViolated(2, f"the good replica(s) of chunk {chunk_id[:12]} on "
                                           f"{_nodes(vanished)} disappeared without a fault, "
                                           f"leaving {len(good)} of {rf}")
            self.good_before[chunk_id] = good

    def check_verify(self, report: VerifyReport, holders: dict[str, list[str]],
                     census: Census, down: set[str]) -> None:
        """Invariant 4: verify names each bad replica it could reach, and nothing else."""
        reported = {(p.chunk_id, p.node_id): p.problem for p in report.problems}
        for (chunk_id, node_id), problem in sorted(reported.items()):
            truth = census.state(chunk_id, node_id)
            if problem == "unavailable":
                if node_id not in down:
                    raise InvariantViolated(4, f"verify reported {node_id} unavailable for "
                                               f"chunk {chunk_id[:12]}, but it is up")
            elif problem != truth:
                raise InvariantViolated(4, f"verify reported chunk {chunk_id[:12]} {problem} "
                                           f"on {node_id}, but it is {truth}")
        for chunk_id, nodes in sorted(holders.items()):
            for node_id in nodes:
                truth = census.state(chunk_id, node_id)
                if truth != "ok" and node_id not in down and (chunk_id, node_id) not in reported:
                    raise InvariantViolated(4, f"verify missed that chunk {chunk_id[:12]} is "
                                               f"{truth} on {node_id}")

    # -- checked at the end, after heal and repair --------------------------------------------

    def check_replication(self, census: Census) -> None:
        """Invariant 3, first half: RF good replicas across min_clouds clouds, for every
        chunk faults did not destroy completely."""
        for chunk_id in sorted(self.needed() - self.lost(census)):
            good = census.good(chunk_id)
            clouds = {self.cloud_of[n] for n in good}
            if len(good) < self.replication_factor or len(clouds) < self.min_clouds:
                raise InvariantViolated(3, f"after heal and repair, chunk {chunk_id[:12]} has "
                                           f"{len(good)} good replica(s) in {len(clouds)} "
                                           f"cloud(s) ({_nodes(good)}); the policy is "
                                           f"{self.replication_factor} in {self.min_clouds}")

    def check_collected(self, census: Census) -> None:
        """Invariant 3, second half: after gc, nothing stored that nothing references."""
        stray = census.objects() - self.needed()
        if stray:
            first = sorted(stray)[0]
            raise InvariantViolated(3, f"after gc, {len(stray)} object(s) nothing references "
                                       f"are still stored (e.g. {first[:12]} on "
                                       f"{_nodes(set(census.replicas[first]))})")


def _nodes(nodes: set[str]) -> str:
    return ", ".join(sorted(nodes)) or "none"
