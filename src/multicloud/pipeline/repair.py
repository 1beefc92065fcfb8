"""Repair: bring chunks back to `replication_factor` replicas on healthy nodes.

For each chunk with too few replicas on healthy nodes, new targets come from its placement
(minus the nodes that hold or failed it), and a healthy holder pushes the blob to each
through the `ReplicaWriter`, the same writer distribution uses. A holder whose copy turns
out corrupt or gone is forgotten in the manifest (and made up for), and the next holder
is tried. Writes still in flight to a chunk count as holders (`in_flight`), so a repair
that runs beside distribution does not leave a replica too many. A chunk whose replicas
span fewer than `min_clouds` clouds (written while a cloud was down) gets one in each
cloud it lacks once that cloud is back: a replica above the factor, which gc trims
keeping the spread.

Hinted handoff: a chunk that a pass leaves short gets a hint in the manifest (the
unhealthy nodes that hold it, or "*"), beside those storage keeps for replicas a write
could not place. `replay_hints` repairs every hinted chunk when a node comes back or
joins, and forgets the hints of chunks that reached the factor; `HintReplays` runs those
replays one at a time in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from multicloud.control.registry import NodeRegistry
from multicloud.core.config import DistributionConfig
from multicloud.core.errors import (
    ChunkNotFound,
    InsufficientNodes,
    IntegrityError,
    MulticloudError,
    ReplicaRefused,
)
from multicloud.core.types import BlobInfo
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import (
    NetworkAwarePlacement,
    has_room,
    rank_nodes,
    spread_short,
)
from multicloud.pipeline.replicas import ReplicaWriter
from multicloud.pipeline.storage import ANY_NODE, StorageManager

log = logging.getLogger(__name__)

RecordReplica = Callable[[str, str], None]
InFlight = Callable[[str], Iterable[str]]  # chunk id -> nodes a write to is under way


def _nothing_in_flight(chunk_id: str) -> list[str]:
    """The InFlight of a repairer used on its own: no other writer runs beside it."""
    return []


@dataclass
class RepairReport:
    """What one repair pass did."""

    checked: int = 0
    replicas_created: int = 0
    dropped_corrupt: int = 0  # holders whose copy was corrupt or gone: forgotten
    under_replicated: int = 0  # chunks still below replication_factor
    lost: int = 0  # chunks with no healthy replica left at all
    hints_replayed: int = 0  # hints forgotten because their chunk reached the factor
    hints_left: int = 0  # chunks still hinted after the pass (replay_hints only)


@dataclass
class _Outcome:
    """Where one chunk stands after a repair pass."""

    healthy: int  # healthy holders, writes in flight included
    down: list[str] = field(default_factory=list)  # holders that are not healthy
    in_flight: int = 0  # of healthy: writes not finished yet
    known: bool = True  # False: no batch ever stored the chunk (a stray hint)
    # Fewer clouds than min_clouds while a cloud the cluster knows is down or full: the
    # chunk was written while it was away, and gets a replica there once it is back.
    spread_short: bool = False

    def whole(self, rf: int) -> bool:
        """At the replication factor and the cloud spread (a stray hint counts as whole)."""
        return not self.known or (self.healthy >= rf and not self.spread_short)

    def settled(self, rf: int) -> bool:
        """Whole without counting writes in flight: its hints may go (a write in flight
        may still fail)."""
        return self.whole(rf) and (not self.known or self.healthy - self.in_flight >= rf)


class Repairer:
    """Re-replicates under-replicated chunks from a healthy holder to new nodes."""

    def __init__(self, registry: NodeRegistry, manifest: Callable[[], Manifest],
                 config: DistributionConfig, writer: ReplicaWriter,
                 record_replica: RecordReplica,
                 placement: NetworkAwarePlacement | None = None, *,
                 in_flight: InFlight = _nothing_in_flight) -> None:
        self.registry = registry
        self._manifest = manifest  # opened on first use, by whoever owns it
        self.config = config
        self.writer = writer
        self.record_replica = record_replica
        self.placement = placement or NetworkAwarePlacement(registry, None, config)
        self.in_flight = in_flight
        self._writing: dict[str, set[str]] = {}  # chunk id -> nodes this repairer writes to
        self._unrecorded: dict[str, set[str]] = {}  # copied by a replay, not recorded yet
        self._replaying = asyncio.Lock()

    async def repair(self, chunk_ids: Iterable[str]) -> RepairReport:
        """Re-replicate those of chunk_ids with fewer than replication_factor healthy
        replicas; hint the ones it cannot bring there."""
        report, outcomes = await self._pass(sorted(set(chunk_ids)), self.record_replica)
        await self._hint_short(outcomes)
        return report

    async def replay_hints(self) -> RepairReport:
        """Repair every hinted chunk; forget the hints of chunks that reached the factor.

        For when a node comes back or joins (and for a periodic anti-entropy pass): the
        chunks come from `Manifest.hints()`, their new targets from placement among the
        healthy nodes, so no rerun is needed. Replays run one at a time; the replicas
        they create are in the manifest before the hints that asked for them are gone.
        """
        async with self._replaying:
            manifest = self._manifest()
            hinted = await asyncio.to_thread(manifest.hints)
            if not hinted:
                return RepairReport()
            created: list[tuple[str, str]] = []

            def hold(chunk_id: str, node_id: str) -> None:
                # Recorded after the pass; until then a concurrent repair counts it.
                created.append((chunk_id, node_id))
                _hold(self._unrecorded, chunk_id, node_id)

            try:
                report, outcomes = await self._pass(sorted(hinted), hold)
            finally:
                # What was copied is recorded even when the pass failed part-way.
                try:
                    await asyncio.to_thread(manifest.add_replicas, created)
                finally:
                    for chunk_id, node_id in created:
                        _let_go(self._unrecorded, chunk_id, node_id)
            rf = self.config.replication_factor
            done = [(chunk_id, node_id) for chunk_id, nodes in sorted(hinted.items())
                    if outcomes[chunk_id].settled(rf) for node_id in nodes]
            await asyncio.to_thread(manifest.remove_hints, done)
            await self._hint_short(outcomes)
            report.hints_replayed = len(done)
            report.hints_left = sum(1 for o in outcomes.values() if not o.settled(rf))
            log.info("replayed hints of %d chunk(s): %d replica(s) created, %d hint(s) "
                     "forgotten, %d chunk(s) still short", len(hinted),
                     report.replicas_created, len(done), report.hints_left)
            return report

    async def _pass(self, ids: list[str], record: RecordReplica,
                    ) -> tuple[RepairReport, dict[str, _Outcome]]:
        """Repair ids, recording each new replica with record; the report and each chunk's
        outcome."""
        manifest = self._manifest()
        holders = await asyncio.to_thread(manifest.replicas, ids)
        report = RepairReport(checked=len(ids))
        outcomes: dict[str, _Outcome] = {}
        limit = asyncio.Semaphore(self.config.max_concurrent_distributions)

        async def one(chunk_id: str) -> None:
            async with limit:
                outcomes[chunk_id] = await self._repair_chunk(
                    chunk_id, holders.get(chunk_id, []), report, record)

        try:
            async with asyncio.TaskGroup() as group:
                for chunk_id in ids:
                    group.create_task(one(chunk_id))
        except* MulticloudError as failed:  # e.g. the manifest's disk: one error, not a group
            raise failed.exceptions[0] from None
        return report, outcomes

    async def _repair_chunk(self, chunk_id: str, holders: list[str], report: RepairReport,
                            record: RecordReplica) -> _Outcome:
        rf = self.config.replication_factor
        nodes = self.registry.nodes
        healthy = [h for h in holders if h in nodes and nodes[h].healthy]
        down = [h for h in holders if h not in healthy]
        # A write under way (distribution's past quorum, or another repair's) is a holder
        # for counting: repairing as if it were not there is how a 4th replica appeared.
        busy = {n for n in (*self.in_flight(chunk_id), *self._writing.get(chunk_id, ()),
                            *self._unrecorded.get(chunk_id, ()))
                if n in nodes and nodes[n].healthy and n not in healthy}
        outcome = self._outcome(healthy, busy, down)
        if outcome.whole(rf):
            return outcome
        manifest = self._manifest()
        if not healthy:
            if not holders and await asyncio.to_thread(manifest.blob, chunk_id) is None:
                return _Outcome(0, known=False)
            report.lost += 1
            report.under_replicated += 1
            log.error("chunk %s has no healthy replica left", chunk_id)
            return outcome
        blob = await asyncio.to_thread(manifest.blob, chunk_id)
        if blob is None:
            report.under_replicated += 1
            return _Outcome(len(healthy) + len(busy), down, len(busy), known=False)
        sources = list(healthy)
        for target in self._targets(chunk_id, healthy, holders, busy, blob.blob_size):
            if len(healthy) + len(busy) >= rf or not sources:
                break
            await self._copy(chunk_id, blob, sources, healthy, target, report, record)
        # At the factor but in fewer clouds than min_clouds (written while a cloud was
        # down): one more replica in each missing cloud. That is a replica above the
        # factor, which gc trims, keeping the spread, as HDFS does for a block whose
        # racks are wrong.
        for target in self._spread_targets(chunk_id, healthy, busy, blob.blob_size):
            if not self._outcome(healthy, busy, down).spread_short or not sources:
                break
            if nodes[target].cloud not in self._clouds(healthy, busy):
                await self._copy(chunk_id, blob, sources, healthy, target, report, record)
        outcome = self._outcome(healthy, busy, down)
        if outcome.healthy < rf:
            report.under_replicated += 1
        return outcome

    async def _copy(self, chunk_id: str, blob: BlobInfo, sources: list[str],
                    healthy: list[str], target: str, report: RepairReport,
                    record: RecordReplica) -> bool:
        """Copy the chunk to target from the first of sources that can; True when it did.

        A source whose copy is corrupt or gone is forgotten and dropped from sources and
        healthy; one that failed otherwise is only dropped from sources.
        """
        nodes = self.registry.nodes
        while sources:
            src, dst = nodes[sources[0]], nodes[target]
            _hold(self._writing, chunk_id, target)
            try:
                await self.writer.write(src, dst, blob)
            except ReplicaRefused as exc:
                log.warning("repair: copy of %s to %s failed: %s", chunk_id[:12], dst.id,
                            exc.cause)
                return False  # the caller tries the next target
            except MulticloudError as exc:  # the holder failed, or its copy is gone or bad
                log.warning("repair: holder %s of %s failed: %s", src.id, chunk_id[:12], exc)
                if isinstance(exc, IntegrityError | ChunkNotFound):
                    # Not a replica any more: forget it, and make up for it too.
                    await asyncio.to_thread(self._manifest().remove_replicas,
                                            [(chunk_id, src.id)])
                    healthy.remove(src.id)
                    report.dropped_corrupt += 1
                sources.pop(0)
                continue
            finally:
                _let_go(self._writing, chunk_id, target)
            record(chunk_id, target)
            report.replicas_created += 1
            healthy.append(target)
            return True
        return False

    def _clouds(self, healthy: list[str], busy: set[str]) -> set[str]:
        nodes = self.registry.nodes
        return {nodes[n].cloud for n in (*healthy, *busy)}

    def _outcome(self, healthy: list[str], busy: set[str], down: list[str]) -> _Outcome:
        """Where a chunk with these holders stands."""
        short = spread_short(self._clouds(healthy, busy),
                             set(self.registry.clouds(healthy_only=False)), self.config)
        return _Outcome(len(healthy) + len(busy), list(down), len(busy), spread_short=short)

    def _spread_targets(self, chunk_id: str, healthy: list[str], busy: set[str],
                        size: int) -> list[str]:
        """Healthy nodes with room in clouds the chunk has no replica in, nearest cloud
        first (by the placement's preference), rendezvous order within a cloud."""
        if not healthy:
            return []
        held = self._clouds(healthy, busy)
        src_cloud = self.registry.nodes[healthy[0]].cloud
        ranked = rank_nodes(chunk_id, [n for n in self.registry.healthy_nodes()
                                       if n.cloud not in held and has_room(n, size)])
        order = self.placement.topology.cloud_preference(src_cloud,
                                                         sorted({n.cloud for n in ranked}))
        return [n.id for cloud in order for n in ranked if n.cloud == cloud]

    def _targets(self, chunk_id: str, healthy: list[str], holders: list[str],
                 busy: set[str], size: int) -> list[str]:
        """Candidates for a chunk's missing replicas, best first: nodes in the clouds its
        holders lack while min_clouds is not met, then its placement, then any healthy
        node with room; never a current holder nor a node being written to (the caller
        takes what it needs)."""
        try:
            ideal = self.placement.select_target_nodes(
                chunk_id, healthy[0], self.config.replication_factor, at_least=1,
                exclude=set(holders) - set(healthy), size_bytes=size)
        except InsufficientNodes:
            ideal = []
        # The placement ranks nodes without room out, holders included, so its choice
        # need not complete the spread of the replicas that exist: the missing clouds
        # come first while the holders span too few.
        spread = (self._spread_targets(chunk_id, healthy, busy, size)
                  if len(self._clouds(healthy, busy)) < self.config.min_clouds else [])
        extra = [n.id for n in self.registry.healthy_nodes() if has_room(n, size)]
        targets = []
        for node_id in spread + ideal + extra:
            if node_id not in holders and node_id not in busy and node_id not in targets:
                targets.append(node_id)
        return targets

    async def _hint_short(self, outcomes: dict[str, _Outcome]) -> None:
        """Hint every known chunk the pass left short of the factor or the spread: its
        holders that are down (they have it back when they return), else "*" (any node
        that comes back or joins will do)."""
        rf = self.config.replication_factor
        pairs = [(chunk_id, node_id) for chunk_id, outcome in sorted(outcomes.items())
                 if not outcome.whole(rf) for node_id in (outcome.down or [ANY_NODE])]
        if pairs:
            await asyncio.to_thread(self._manifest().add_hints, pairs)


def _hold(table: dict[str, set[str]], chunk_id: str, node_id: str) -> None:
    """Count node_id as a holder of chunk_id in table (writes or copies not recorded)."""
    table.setdefault(chunk_id, set()).add(node_id)


def _let_go(table: dict[str, set[str]], chunk_id: str, node_id: str) -> None:
    """Undo `_hold`; a chunk with no node left leaves the table."""
    nodes = table.get(chunk_id)
    if nodes is not None:
        nodes.discard(node_id)
        if not nodes:
            del table[chunk_id]


class HintReplays:
    """Hint replays started when a node comes back or joins, one at a time.

    `start()` from a node-status listener: a replay starts at once, or, while one runs,
    one more runs after it (however many nodes came back meanwhile), so that a node that
    returned mid-replay is not missed. `settle()` awaits them; `last` is the latest report.
    """

    def __init__(self, repairer: Repairer) -> None:
        self.repairer = repairer
        self.last: RepairReport | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def start(self) -> None:
        """Replay the hints in the background (coalesced with a replay already running)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # told from outside the event loop: the next replay covers it
        self._task = loop.create_task(self._run())

    async def settle(self) -> None:
        """Wait for the replays started so far (a failed one is logged: hints stay)."""
        while self._task is not None and not self._task.done():
            (outcome,) = await asyncio.gather(self._task, return_exceptions=True)
            if isinstance(outcome, Exception):
                log.error("hint replay crashed (the hints stay for the next one)",
                          exc_info=outcome)

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                self.last = await self.repairer.replay_hints()
            except MulticloudError as exc:
                log.warning("hint replay failed: %s (the hints stay for the next one)", exc)
            if not self._again:
                return


class RepairsOnFailure:
    """Repairs started the moment a node fails, for the chunks committed so far.

    Each runs as a task held here until `settle()` awaits it: the run settles them before
    its final repair pass (and again after it, for a node that failed during it);
    `created` counts the replicas they re-created in this run.
    """

    def __init__(self, repairer: Repairer, storage: StorageManager,
                 metrics: PipelineMetrics) -> None:
        self.repairer = repairer
        self.storage = storage
        self.metrics = metrics
        self.created = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, node_id: str) -> None:
        """Re-replicate the committed chunks node_id held, in the background."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # marked from outside the event loop: the final repair covers it
        task = loop.create_task(self._repair(node_id))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        # A repair that failed before anyone settled it is still heard of, once.
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        if isinstance(error, MulticloudError):
            log.warning("repair after a node failure failed: %s (the final repair pass "
                        "covers its chunks)", error)
        else:  # a bug: with its traceback
            log.error("repair after a node failure crashed", exc_info=error)

    async def settle(self) -> None:
        """Wait for every repair started so far (a failed one is logged: the final pass
        covers its chunks)."""
        while self._tasks:
            # Failures are logged by _done, as each task ends.
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _repair(self, node_id: str) -> None:
        await self.storage.flush()
        ids = sorted(self.storage.chunk_ids)
        holders = await asyncio.to_thread(self.storage.manifest.replicas, ids)
        affected = [chunk_id for chunk_id, nodes in holders.items() if node_id in nodes]
        if affected:
            with self.metrics.busy("storage"):
                report = await self.repairer.repair(affected)
            self.created += report.replicas_created
