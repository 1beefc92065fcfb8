"""One simulated world: the product's embedded cluster, driven through a scenario.

The world builds the cluster a scenario's shape describes (the real `NodeService`s and
chunk stores, on a temporary directory), writes each batch's files, and plays the steps
with the product's own commands: every command is a fresh `PipelineOrchestrator` on the
shared cluster, as separate `multicloud` processes would be against cluster-mode nodes.
Faults go through the cluster's fault switches (`Cluster.faults`), except those no node
could report on itself: a node restarted on a new disk, the local manifest deleted, and
an orchestrator killed (`abandon()` plus the cancellation of every task it made).

After every step the model checks the census of the disks; at the end the world heals
everything, finishes unfinished batches, repairs, verifies, collects garbage and
restores every committed batch (see `multicloud.sim.invariants`). The history (one line
per step and outcome, with virtual times) is what two runs of a seed must agree on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, cast

from multicloud.cluster.local import create_local_cluster
from multicloud.comm.cluster import Cluster
from multicloud.comm.local import LocalComm
from multicloud.core.config import (
    CloudPricing,
    ClusterConfig,
    PipelineConfig,
    load_config,
)
from multicloud.core.errors import MulticloudError, UnknownBatch
from multicloud.core.messages import NodeAddress, Reply, Request
from multicloud.core.network import Location
from multicloud.core.types import NodeStatus, PipelineResult
from multicloud.node.service import NodeService
from multicloud.node.store import ChunkStore
from multicloud.node.stores import open_node_store
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.storage import MANIFEST_FILE
from multicloud.run.orchestrator import PipelineOrchestrator
from multicloud.sim.invariants import InvariantViolated, Model
from multicloud.sim.loop import COMMAND, TaggingLoop
from multicloud.sim.scenario import BatchSpec, Scenario, Step
from multicloud.sim.truth import Census, take_census

__all__ = ["World"]

_CHUNK_MB = 0.0625  # 64 KiB, the smallest chunk: a few chunks per file
_MTIME_NS = 1_700_000_000 * 10**9
_NO_EFFECT = ("already down", "nothing is down", "nothing stored")
_ODD_NAMES = ("data.bin", "a b.txt", "ünï cödé.dat", "nested/deeper/x.bin", "-dash.bin",
              "semi;colon.log", "UPPER.BIN", "trailing.")
# A cloud beyond the three the defaults price, so a shape can span four.
_EXTRA_CLOUD = ("oci", CloudPricing(internet_usd_per_gb=0.0085, inter_region_usd_per_gb=0.0))


class _Recorder:
    """The orchestrators' channel to the nodes, noting which chunks each command sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: dict[str, list[str]] = {}  # command -> chunk ids sent to process

    async def call(self, target: NodeAddress, request: Request) -> Reply:
        if request.op == "process":
            chunk_id = str(request.meta.get("chunk", {}).get("chunk_id") or "")
            self.sent.setdefault(COMMAND.get(), []).append(chunk_id)
        reply: Reply = await self.inner.call(target, request)
        return reply

    async def close(self) -> None:
        await self.inner.close()


class _Tracebacks(logging.Handler):
    """Collects log records that carry a traceback: a bug, never an expected failure."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            self.seen.append(f"{record.getMessage()}: {type(error).__name__}: {error}")


class World:
    """A cluster, its batches, and the model that checks them; one per seed."""

    def __init__(self, scenario: Scenario, root: Path, *, quorum_override: int | None = None
                 ) -> None:
        self.scenario = scenario
        self.root = root
        self.data = root / "data"  # the cluster's data dir: node stores, manifest.db
        self.manifest_file = self.data / MANIFEST_FILE
        self.history: list[str] = []
        self.counts: dict[str, int] = {}
        shape = scenario.shape
        self.config = _config(scenario, quorum_override)
        self.cloud_of = {node_id: node_id.split("-node-")[0] for node_id in shape.node_ids}
        self.model = Model(shape.replication_factor, shape.write_quorum, shape.min_clouds,
                           self.cloud_of)
        self.files: dict[str, dict[str, bytes]] = {}
        self.state: dict[str, str] = {}  # batch -> new, partial, committed, deleted
        self.partitions: set[tuple[str, str]] = set()
        self.slowed: set[tuple[str, str]] = set()
        self.step_index: int | None = None  # the step being played (-1: the end checks)
        self.last_error = ""
        self._commands = 0
        self._killed: set[str] = set()
        self._restores = 0
        self._cluster: Cluster | None = None
        self._recorder: _Recorder | None = None
        self._tracebacks = _Tracebacks()

    # -- the whole run -----------------------------------------------------------------------

    async def play(self) -> None:
        """Build, play every step with checks, then heal and check the end state."""
        logger = logging.getLogger("multicloud")
        logger.addHandler(self._tracebacks)
        try:
            asyncio.get_running_loop().set_exception_handler(self._unobserved)
            self._write_sources()
            self._cluster = await self.open_cluster()
            self._recorder = _Recorder(self._cluster.client.channel)
            self._cluster.client.channel = self._recorder
            for index, step in self.scenario.active:
                self.step_index = index
                await self._play_step(index, step)
                self._check_tracebacks()
                self.check()
            self.step_index = -1
            await self._finish()
            self._check_tracebacks()
        finally:
            logger.removeHandler(self._tracebacks)
            if self._cluster is not None:
                await self.close_cluster()

    def note(self, text: str) -> None:
        """One line of history, stamped with the virtual time."""
        self.history.append(f"{asyncio.get_running_loop().time():10.4f} {text}")

    def count(self, what: str, n: int = 1) -> None:
        """Add to the fault and outcome counts the report sums up."""
        self.counts[what] = self.counts.get(what, 0) + n

    @property
    def cluster(self) -> Cluster:
        """The simulated cluster (built by play())."""
        assert self._cluster is not None
        return self._cluster

    # -- what a kind of cluster does its own way (the soak runs node processes) ----------------

    async def open_cluster(self) -> Cluster:
        """The cluster of the scenario's shape: embedded, every node in this process."""
        return create_local_cluster(self.data, config=self.config.cluster,
                                    storage=self.config.storage)

    async def close_cluster(self) -> None:
        """Stop what open_cluster started."""
        await self.cluster.close()

    @property
    def crashed(self) -> set[str]:
        """The nodes that are down (crashed by a fault, or in a write that crashed them)."""
        return {n for n, service in self.services.items() if service.faults.crashed}

    @property
    def services(self) -> dict[str, NodeService]:
        """The embedded node services, reached past every fault."""
        comm = cast(LocalComm, self.cluster.faults.channel)
        return cast(dict[str, NodeService], comm.services)

    def store_dirs(self) -> dict[str, Path]:
        """Each node's chunk store directory."""
        return {n: self.data / "nodes" / n for n in self.scenario.shape.node_ids}

    async def crash(self, node_id: str) -> None:
        """The node stops (its disk stays)."""
        await self.cluster.faults.crash(node_id)

    async def restart(self, node_id: str, new_disk: bool) -> None:
        """A crashed node comes back, with its disk or on an empty one."""
        if new_disk:
            await self._new_disk(node_id)
        await self.cluster.faults.restart(node_id)

    async def heal_nodes(self) -> None:
        """Every node up, no crash pending in a write, no disk full."""
        for node_id in sorted(self.crashed):
            await self.cluster.faults.restart(node_id)
        for node_id in sorted(self.scenario.shape.node_ids):
            await self.cluster.faults.disarm(node_id)
            await self.cluster.faults.disk_full(node_id, False)

    def kill_tasks(self, tag: str) -> list[asyncio.Task[Any]]:
        """The unfinished tasks of a command being killed."""
        return cast(TaggingLoop, asyncio.get_running_loop()).tasks_of(tag)

    # -- checks --------------------------------------------------------------------------------

    def census(self) -> Census:
        """What the disks hold right now."""
        return take_census(self.store_dirs())

    def check(self) -> None:
        """The invariants that hold after every step."""
        census = self.census()
        self.model.check_replicas(census, self._recorded())

    def _recorded(self) -> set[str]:
        """Chunk ids the manifest records as committed (none when it was lost)."""
        path = self.manifest_file
        if not path.exists():
            return set()
        with Manifest(path) as manifest:
            ids: set[str] = set()
            for record in manifest.batches():
                ids.update(manifest.chunk_ids(record.batch_id))
            return ids

    def _unobserved(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's last word on an error nobody awaited: a bug, unless it comes from a
        killed orchestrator (a dead process's tasks end how they end)."""
        future = context.get("future")
        command = TaggingLoop.command_of(future) if future is not None else ""
        if command in self._killed:
            return
        error = context.get("exception")
        what = f"{type(error).__name__}: {error}" if error is not None else ""
        message = context.get("message", "an asyncio error")
        self._tracebacks.seen.append(f"{message} in {command or 'the simulator'}: {what}")

    def _check_tracebacks(self) -> None:
        if self._tracebacks.seen:
            first = self._tracebacks.seen[0]
            raise InvariantViolated(6, f"a traceback was logged: {first}")

    # -- steps ----------------------------------------------------------------------------------

    async def _play_step(self, index: int, step: Step) -> None:
        if step.kind in ("run", "restore", "verify", "repair", "gc", "delete"):
            self._reset_health()
            outcome = await self._command(step, checked=True)
            self.note(f"step {index}: {step.describe()} -> {outcome}")
        elif step.kind == "together":
            self._reset_health()
            outcomes = await asyncio.gather(*(self._command(s, checked=False)
                                              for s in step.together))
            self._linearize(step.together, outcomes)
            self.count("together")
            self.note(f"step {index}: {step.describe()} -> {' | '.join(outcomes)}")
        else:
            done = await self._fault(step)
            self.note(f"step {index}: {step.describe()} -> {done}")

    def _linearize(self, steps: tuple[Step, ...], outcomes: list[str]) -> None:
        """A run that found its batch already done and a delete of it, side by side: the
        run only read, so it comes first and the batch is deleted, whatever order the
        model heard them in."""
        done = {s.batch for s, o in zip(steps, outcomes, strict=True)
                if s.kind == "run" and o.endswith("(already done)")}
        for s, outcome in zip(steps, outcomes, strict=True):
            if s.kind == "delete" and outcome == "deleted" and s.batch in done:
                self.model.committed.pop(s.batch, None)
                self.state[s.batch] = "deleted"

    def _reset_health(self) -> None:
        """A command starts with the failure detector's view: up nodes healthy."""
        for node_id, node in self.cluster.nodes.items():
            wanted = NodeStatus.UNHEALTHY if node_id in self.crashed else NodeStatus.HEALTHY
            if node.status != wanted:
                node.set_status(wanted, "failure detector")
            node.full = False

    async def _command(self, step: Step, *, checked: bool) -> str:
        """Run one command in its own orchestrator; its outcome as one line."""
        self._commands += 1
        tag = f"cmd{self._commands}"
        token = COMMAND.set(tag)
        try:
            orchestrator = PipelineOrchestrator(self.cluster, config=self.config)
            killed = False
            try:
                if step.kind == "run":
                    outcome, killed = await self._run(orchestrator, step, tag, checked)
                else:
                    outcome = await self._maintenance(orchestrator, step, checked)
            except MulticloudError as exc:
                outcome = self._error(exc)
            finally:
                if not killed:
                    await orchestrator.close()
            return outcome
        except InvariantViolated:
            raise
        except Exception as exc:
            raise InvariantViolated(6, f"{step.describe()} ended in {type(exc).__name__}: "
                                       f"{exc}") from exc
        finally:
            COMMAND.reset(token)

    def _error(self, exc: MulticloudError) -> str:
        text = str(exc)
        if "\n" in text.strip():
            raise InvariantViolated(6, f"an error took more than one line: {text!r}")
        self.count("errors")
        self.last_error = text  # not in the history: messages name pids and hosts
        return f"error: {type(exc).__name__}"

    async def _run(self, orchestrator: PipelineOrchestrator, step: Step, tag: str,
                   checked: bool) -> tuple[str, bool]:
        batch = step.batch
        was = self.state.get(batch, "new")
        resumable = self._resumable(batch) if was == "partial" else set()
        source = self.root / "sources" / batch
        work = asyncio.ensure_future(orchestrator.run_pipeline({"batch_id": batch,
                                                                "data_source": str(source)}))
        struck = await self._strike(orchestrator, step, work, tag)
        try:
            result: PipelineResult | None = await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not struck or (current is not None and current.cancelling()):
                raise
            result = None
        except MulticloudError:
            if struck != "killed":
                raise
            result = None
        if struck or result is None:
            self._mark(batch, "partial")
            self.count(struck)
            return struck, struck == "killed"
        if was == "partial":
            self.count("resumed")
            sent = set(self.recorder.sent.get(tag, [])) & resumable
            if checked and sent:
                raise InvariantViolated(5, f"resuming {batch} sent {len(sent)} chunk(s) it had "
                                           f"committed and a node still lists (e.g. "
                                           f"{sorted(sent)[0][:12]})")
        if result.status == "success":
            if self._committed(orchestrator, batch):
                self.count("committed")
            already = " (already done)" if result.metrics.get("already_done") else ""
            return f"success {result.chunks_processed} chunks{already}", False
        self._mark(batch, "partial")
        self.count("failed runs")
        error = self.last_error = result.error or ""
        if "\n" in error.strip():
            raise InvariantViolated(6, f"a failed run's error took more than one line: "
                                       f"{error!r}")
        return "failed", False

    @property
    def recorder(self) -> _Recorder:
        """The channel wrapper that notes what each command sends."""
        assert self._recorder is not None
        return self._recorder

    def _mark(self, batch: str, state: str) -> None:
        if self.state.get(batch) != "committed":
            self.state[batch] = state

    def _committed(self, orchestrator: PipelineOrchestrator, batch: str) -> bool:
        """A run said success: the model now owes its chunks and its manifest object.

        Read and taken over in one go, on the loop's thread: a delete of the batch running
        at the same time then lands wholly before (the batch is gone: False) or after."""
        manifest = orchestrator.storage_manager.manifest
        try:
            record = manifest.batch(batch)
            ids = set(manifest.chunk_ids(batch))
        except UnknownBatch:
            return False  # deleted by a command running beside this one
        if record.manifest_object:
            ids.add(record.manifest_object)
            self.model.catalogued[batch] = record.manifest_object
        self.model.committed[batch] = ids
        self.state[batch] = "committed"
        return True

    def _resumable(self, batch: str) -> set[str]:
        """The chunks a resume must not send: recorded for the batch, and held by a node
        that is up (an orchestrator skips exactly what a node still lists)."""
        path = self.manifest_file
        if not path.exists():
            return set()
        with Manifest(path) as manifest:
            try:
                ids = manifest.chunk_ids(batch)
            except MulticloudError:
                return set()
            holders = manifest.replicas(ids)
        census = self.census()
        return {c for c in ids
                if any(n not in self.crashed and census.state(c, n) != "missing"
                       for n in holders.get(c, []))}

    async def _strike(self, orchestrator: PipelineOrchestrator, step: Step,
                      work: asyncio.Future[PipelineResult], tag: str) -> str:
        """The run's own faults, each at its point of progress, then its kill or Ctrl-C:
        "killed", "interrupted", or "" when the run was left to finish."""
        kill_at = step.at if step.kill else 101.0
        for fault in sorted(step.faults, key=lambda f: f.at):
            if fault.at >= kill_at or not await self._reach(orchestrator, work, fault.at):
                break
            done = await self._fault(fault)
            self.note(f"  during run {step.batch}: {fault.describe()} -> {done}")
        if not step.kill or not await self._reach(orchestrator, work, step.at):
            return ""
        if step.kill == "interrupt":
            work.cancel()
            return "interrupted"
        orchestrator.abandon()
        self._killed.add(tag)
        for _ in range(1000):
            alive = self.kill_tasks(tag)
            if not alive and work.done():
                break
            for task in alive:
                task.cancel()
            work.cancel()
            await asyncio.sleep(0)
        else:
            raise InvariantViolated(6, f"killed run of {step.batch} would not stop")
        return "killed"

    @staticmethod
    async def _reach(orchestrator: PipelineOrchestrator,
                     work: asyncio.Future[PipelineResult], percent: float) -> bool:
        """Wait until the run is percent done; False if it ended first."""
        waiting: asyncio.Future[None] = asyncio.ensure_future(
            orchestrator.wait_for_progress(percent))
        either: list[asyncio.Future[Any]] = [waiting, work]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        return not work.done()

    async def _maintenance(self, orchestrator: PipelineOrchestrator, step: Step,
                           checked: bool) -> str:
        kind, batch = step.kind, step.batch
        if kind in ("repair", "gc"):
            await orchestrator.knows(None)
            if kind == "repair":
                report = await orchestrator.repair(None)
                self.count("repairs")
                self.count("replicas repaired", report.replicas_created)
                return f"repaired, {report.replicas_created} replica(s) created"
            report = await orchestrator.collect_garbage()
            self.count("gcs")
            return (f"collected {report.objects_freed} object(s), trimmed "
                    f"{report.replicas_trimmed}")
        await orchestrator.knows(batch, unreadable_ok=kind == "delete")
        if kind == "delete":
            await orchestrator.delete_batch(batch)
            self.model.committed.pop(batch, None)
            self.state[batch] = "deleted"
            self.count("deletes")
            return "deleted"
        if kind == "verify":
            return await self._verify(orchestrator, batch, checked)
        return await self._restore(orchestrator, batch)

    async def _verify(self, orchestrator: PipelineOrchestrator, batch: str,
                      checked: bool) -> str:
        manifest = orchestrator.storage_manager.manifest
        ids = await asyncio.to_thread(manifest.chunk_ids, batch)
        holders = await asyncio.to_thread(manifest.replicas, ids)
        report = await orchestrator.verify_batch(batch)
        self.count("verifies")
        if checked:
            down = self.crashed | (self._partitioned() if self.partitions else set())
            self.model.check_verify(report, holders, self.census(), down)
        kinds = sorted({p.problem for p in report.problems})
        return f"verified: {'ok' if report.ok else 'not ok'} {','.join(kinds)}".rstrip()

    def _partitioned(self) -> set[str]:
        """Nodes some partition cuts off from some cloud (verify may not reach them)."""
        clouds = {c for pair in self.partitions for c in pair}
        return {n for n, cloud in self.cloud_of.items() if cloud in clouds}

    async def _restore(self, orchestrator: PipelineOrchestrator, batch: str) -> str:
        self._restores += 1
        dest = self.root / "restores" / str(self._restores)
        try:
            report = await orchestrator.restore_batch(batch, dest)
            self.count("restores")
            if report.failed_files:
                return f"restored {report.files_restored}, {len(report.failed_files)} failed"
            if self.state.get(batch) == "committed":
                self._compare(batch, dest, "a restore that reported success")
            return f"restored {report.files_restored} file(s)"
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _compare(self, batch: str, dest: Path, what: str) -> None:
        """Invariant 1: every file of batch under dest, byte for byte."""
        for name, data in sorted(self.files[batch].items()):
            path = dest / name
            got = path.read_bytes() if path.is_file() else None
            if got != data:
                state = "missing" if got is None else f"{len(got)} bytes, not {len(data)}"
                if got is not None and len(got) == len(data):
                    state = "different bytes"
                raise InvariantViolated(1, f"{what} of {batch}: {name} is {state}")

    # -- faults -----------------------------------------------------------------------------------

    async def _fault(self, step: Step) -> str:
        """Inject one fault; what it did. Only faults that struck are counted (a node that
        cannot be told, being down or cut off, takes none)."""
        try:
            done = await self._strike_fault(step)
        except MulticloudError as exc:
            return f"not struck: {type(exc).__name__}"
        if done not in _NO_EFFECT:
            self.count(step.kind)
        return done

    async def _strike_fault(self, step: Step) -> str:
        faults = self.cluster.faults
        kind, node = step.kind, step.node
        if kind == "crash":
            if node in self.crashed:
                return "already down"
            await self.crash(node)
            return "crashed"
        if kind == "restart":
            if not self.crashed:
                return "nothing is down"
            node = sorted(self.crashed)[step.pick % len(self.crashed)]
            await self.restart(node, step.wipe)
            return f"{node} up" + (" on a new disk" if step.wipe else "")
        if kind == "partition":
            a, b = step.clouds
            await faults.partition(a, b)
            self.partitions.add((a, b))
            return "cut"
        if kind == "heal":
            await self._heal()
            return "healed"
        if kind == "slow":
            a, b = step.clouds
            faults.slow_link(a, b, step.factor)
            self.slowed.add((a, b))
            return "slowed"
        if kind in ("corrupt", "lose"):
            return await self._damage(step)
        if kind == "crash_during_write":
            if node in self.crashed:
                return "already down"
            await faults.crash_during_write(node, step.pick)
            return "armed"
        if kind in ("disk_full", "disk_freed"):
            if node in self.crashed:
                return "already down"
            await faults.disk_full(node, kind == "disk_full")
            return "full" if kind == "disk_full" else "freed"
        if kind == "lose_manifest":
            for suffix in ("", "-wal", "-shm"):
                (self.data / f"{MANIFEST_FILE}{suffix}").unlink(missing_ok=True)
            return "deleted"
        raise ValueError(f"unknown fault {kind!r}")

    async def _damage(self, step: Step) -> str:
        """Bit rot in (or the loss of) the pick-th object a node stores: told to the node
        when it is up, done to its disk behind its back when it is down."""
        root = self.store_dirs()[step.node]
        objects = sorted(ChunkStore.objects_in(root))
        if not objects:
            return "nothing stored"
        chunk_id = objects[step.pick % len(objects)]
        path = ChunkStore.object_path(root, chunk_id)
        if step.node not in self.crashed:
            if step.kind == "corrupt":
                await self.cluster.faults.corrupt(step.node, chunk_id)
            else:
                await self.cluster.faults.lose(step.node, chunk_id)
        elif step.kind == "corrupt":
            data = bytearray(path.read_bytes())
            data[random.Random(f"{step.pick}/{chunk_id}").randrange(len(data))] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            path.unlink()
        self.model.harm(chunk_id, step.node)
        return f"{chunk_id[:12]}"

    async def _new_disk(self, node_id: str) -> None:
        """The node comes back on an empty disk: a new service on a new store."""
        old = self.services[node_id]
        for chunk_id in sorted(old.store.inventory()):
            self.model.harm(chunk_id, node_id)
        old.close()
        shutil.rmtree(self.data / "nodes" / node_id, ignore_errors=True)
        spec = next(s for s in self.config.cluster.node_specs() if s.id == node_id)
        store = open_node_store(spec, self.config.cluster, self.data, fsync=False)
        service = NodeService(node_id, Location(spec.cloud, spec.region), store,
                              cast(LocalComm, self.cluster.faults.channel),
                              seed=self.config.cluster.seed,
                              time_scale=self.config.cluster.time_scale)
        service.faults.partitions = set(old.faults.partitions)  # the network is the same
        service.faults.crashed = True
        self.services[node_id] = service
        self.count("new disks")

    async def _heal(self) -> None:
        await self.cluster.faults.heal()
        for a, b in sorted(self.slowed):
            self.cluster.faults.slow_link(a, b, 1.0)
        self.partitions.clear()
        self.slowed.clear()

    # -- the end -----------------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Heal everything, finish every batch, repair, then check the end state."""
        try:
            await self._heal()
            await self.heal_nodes()
        except MulticloudError as exc:
            raise InvariantViolated(7, f"the cluster could not be healed: {exc}") from exc
        self.note("end: healed, every node up")
        for batch in sorted(b for b, s in self.state.items() if s == "partial"):
            self._reset_health()
            outcome = await self._command(Step("run", batch=batch), checked=True)
            self.note(f"end: run {batch} -> {outcome}")
            if self.state[batch] != "committed" and f"multicloud delete {batch}" in \
                    self.last_error:
                # Its records were lost to faults: the way back the error names.
                await self._end_command(Step("delete", batch=batch))
                outcome = await self._command(Step("run", batch=batch), checked=True)
                self.note(f"end: run {batch} again -> {outcome}")
            if self.state[batch] != "committed":
                raise InvariantViolated(7, f"batch {batch} does not finish with every fault "
                                           f"healed: {outcome} {self.last_error}")
        self.check()
        for batch in self._forget_unrecorded():
            await self._end_command(Step("delete", batch=batch))  # the way back it names
        if not self.model.committed and not (self.manifest_file).exists():
            self.note("end: no batch was recorded; nothing to repair")
            return
        await self._end_command(Step("repair"))
        self._refresh_catalogued()
        census = self.census()
        self.model.check_replicas(census, self._recorded())
        self.model.check_replication(census)
        whole = [b for b in sorted(self.model.committed) if self.model.restorable(b, census)]
        for batch in sorted(set(self.model.committed) - set(whole)):
            self.note(f"end: {batch} lost data to faults on all its holders")
            self.count("batches lost to faults")
        for batch in whole:
            outcome = await self._end_command(Step("verify", batch=batch))
            if not outcome.startswith("verified: ok"):
                raise InvariantViolated(4, f"after heal and repair, verify of {batch} says "
                                           f"{outcome}")
        await self._end_command(Step("gc"))
        self._refresh_catalogued()  # gc publishes a manifest no node had intact again
        census = self.census()
        self.model.check_replicas(census, self._recorded())
        self.model.check_replication(census)
        self.model.check_collected(census)
        for batch in whole:
            await self._end_restore(batch)

    def _forget_unrecorded(self) -> list[str]:
        """A batch whose manifest object faults destroyed on every holder, and that the
        local manifest no longer knows (lost too), has no record left anywhere: lost to
        faults, as its data would be. Those batches, for the user's way back (delete)."""
        lost = self.model.lost(self.census())
        path = self.manifest_file
        known: set[str] = set()
        if path.exists():
            with Manifest(path) as manifest:
                known = {record.batch_id for record in manifest.batches()}
        gone = [batch for batch in sorted(self.model.committed)
                if self.model.catalogued.get(batch) in lost and batch not in known]
        for batch in gone:
            del self.model.committed[batch]
            self.note(f"end: {batch} lost its records to faults (every copy of its "
                      f"manifest, and the local cache)")
            self.count("batches lost to faults")
        return gone

    def _refresh_catalogued(self) -> None:
        """A manifest object no node could read is published again as a new object: the
        model follows the manifest to it."""
        with Manifest(self.manifest_file) as manifest:
            known = {record.batch_id: record for record in manifest.batches()}
            for batch in sorted(set(self.model.committed) & set(known)):
                new = known[batch].manifest_object
                old = self.model.catalogued.get(batch)
                if new and new != old:
                    self.model.committed[batch] = (self.model.committed[batch] - {old or ""}) \
                        | {new}
                    self.model.catalogued[batch] = new
                    self.count("manifests published again")

    async def _end_command(self, step: Step) -> str:
        self._reset_health()
        outcome = await self._command(step, checked=True)
        self.note(f"end: {step.describe()} -> {outcome}")
        if outcome.startswith("error"):
            raise InvariantViolated(7, f"{step.describe()} fails with every fault healed: "
                                       f"{self.last_error}")
        return outcome

    async def _end_restore(self, batch: str) -> None:
        """Invariant 1 at the end: the restore command (which compares every file with
        the model's bytes) restores the whole batch."""
        self._reset_health()
        outcome = await self._command(Step("restore", batch=batch), checked=True)
        self.note(f"end: restore {batch} -> {outcome}")
        if outcome.startswith("error"):
            raise InvariantViolated(1, f"after heal and repair, {batch} does not restore: "
                                       f"{self.last_error}")
        if "failed" in outcome:
            raise InvariantViolated(1, f"after heal and repair, {batch} {outcome}")

    # -- set-up ------------------------------------------------------------------------------------

    def _write_sources(self) -> None:
        for spec in self.scenario.batches:
            self.files[spec.batch_id] = files = _batch_files(spec)
            for name, data in files.items():
                path = self.root / "sources" / spec.batch_id / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                os.utime(path, ns=(_MTIME_NS, _MTIME_NS))  # manifests record it


def _batch_files(spec: BatchSpec) -> dict[str, bytes]:
    """A batch's files: odd names, sizes from empty to a few chunks, some duplicates."""
    rng = random.Random(spec.seed)
    files: dict[str, bytes] = {}
    for i in range(spec.files):
        name = f"{i}-{rng.choice(_ODD_NAMES)}"
        if files and rng.random() < 0.15:
            data = rng.choice(list(files.values()))  # the same bytes twice: dedup
        else:
            data = rng.randbytes(rng.choice((0, rng.randrange(spec.max_bytes + 1))))
        files[name] = data
    return files


def _config(scenario: Scenario, quorum_override: int | None) -> PipelineConfig:
    shape = scenario.shape
    defaults = ClusterConfig()
    clouds = {**defaults.clouds, _EXTRA_CLOUD[0]: _EXTRA_CLOUD[1]}
    regions = {**defaults.regions, "oci": ["us-ashburn-1", "us-phoenix-1"]}
    cluster = ClusterConfig(nodes_per_cloud=dict(shape.nodes_per_cloud), time_scale=1.0,
                            seed=scenario.seed, clouds=clouds, regions=regions)
    quorum = quorum_override or shape.write_quorum
    return load_config(None).replace(
        ingestion={"chunk_size_mb": _CHUNK_MB},
        distribution={"replication_factor": shape.replication_factor, "write_quorum": quorum,
                      "min_clouds": shape.min_clouds},
        storage={"fsync": False},
        cluster=cluster.model_dump())
