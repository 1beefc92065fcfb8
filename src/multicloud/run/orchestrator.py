"""The orchestrator: runs a batch through the four stages, overlapped, and reports on it.

Chunks stream: ingestion reads a chunk only while the chunks between read and commit add
up to less than `max_inflight_chunks` full chunks (a byte budget, so many small files
overlap more), and each chunk then flows through processing, distribution and storage on
its own task, so memory depends on chunk size and queue depth, not on the dataset.
After the last chunk commits, background replica writes are drained and repair brings
every chunk back to the replication factor (a node that fails mid-run starts a repair of
what it held at once).

The stages are built once, here, and wired explicitly; what a run looks like while it
goes is in `self.live` (a `LiveView`), which is what the dashboard and `/metrics` read.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multicloud.blob import load_key
from multicloud.cloud import is_store_url, open_store, parse_store_url
from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core import clock
from multicloud.core.config import PipelineConfig, load_config
from multicloud.core.errors import (
    BatchLeased,
    ClusterError,
    MulticloudError,
    UnknownBatch,
    UsageError,
    ValidationFailed,
)
from multicloud.core.network import TrafficLedger
from multicloud.core.types import (
    BlobInfo,
    Chunk,
    DistributedChunk,
    NodeStatus,
    PipelineResult,
    PipelineStatus,
    RestoreReport,
    Stage,
    VerifyReport,
)
from multicloud.core.units import display_path
from multicloud.pipeline.catalogue import Catalogue, RecoverReport
from multicloud.pipeline.distribution import DistributionCoordinator
from multicloud.pipeline.events import EventSink
from multicloud.pipeline.ingestion import ByteBudget, DataIngestionEngine
from multicloud.pipeline.lease import LEASE_RENEW_S, describe_owner, owner_gone, this_owner
from multicloud.pipeline.maintenance import (
    GC_GRACE_S,
    MaintenanceReport,
    collect_garbage,
    repair_chunks,
)
from multicloud.pipeline.manifest_schema import BatchRecord, ChunkRecord
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import NetworkAwarePlacement, check_policy
from multicloud.pipeline.processing import ProcessingWorkerPool
from multicloud.pipeline.repair import HintReplays, Repairer, RepairReport, RepairsOnFailure
from multicloud.pipeline.replicas import ReplicaWriter
from multicloud.pipeline.restore import BatchRestorer
from multicloud.pipeline.sources import SourceFile, canonical_source, survey_source
from multicloud.pipeline.storage import StorageManager, manifest_path
from multicloud.pipeline.timeouts import AdaptiveTimeouts
from multicloud.run.live import LiveView, ProgressListener
from multicloud.run.summary import RunFacts, run_summary

log = logging.getLogger(__name__)

# File entries held before they are written to the manifest during a run.
FILE_ENTRIES_HELD = 10_000


@dataclass
class _StoredAlready:
    """What a run found stored already, and the node listings it asked for (once each)."""

    chunks: int = 0
    bytes: int = 0
    reused: set[str] = field(default_factory=set)  # ids an earlier batch stored
    _listings: dict[str, set[str]] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def listing(self, node_id: str,
                      fetch: Callable[[str], Awaitable[set[str]]]) -> set[str]:
        """The objects node_id held when first asked during this run."""
        async with self._locks.setdefault(node_id, asyncio.Lock()):
            if node_id not in self._listings:
                self._listings[node_id] = await fetch(node_id)
        return self._listings[node_id]


class PipelineOrchestrator:
    """Coordinates complete end-to-end pipeline execution."""

    def __init__(self, node_registry: Cluster, config_dir: str | Path | None = "config/",
                 config: PipelineConfig | None = None) -> None:
        self.node_registry = node_registry
        self.config = config = config or load_config(config_dir)
        self.metrics = PipelineMetrics()
        timeouts = AdaptiveTimeouts(config.distribution.timeouts)
        self.live = LiveView(node_registry, self.metrics, node_registry.client.ledger, timeouts)
        emit = self.live.emit
        self.storage_manager = StorageManager(node_registry, config.storage,
                                              distribution=config.distribution,
                                              metrics=self.metrics)
        self.ingestion_engine = DataIngestionEngine(node_registry, config.ingestion,
                                                    metrics=self.metrics)
        self.processing_pool = ProcessingWorkerPool(node_registry, config.processing,
                                                    self.metrics, on_event=emit)
        self.writer = ReplicaWriter(node_registry, config.distribution, self.metrics, timeouts)
        placement = NetworkAwarePlacement(node_registry, None, config.distribution)
        self.distribution_coordinator = DistributionCoordinator(
            node_registry, config.distribution, self.metrics, placement=placement,
            writer=self.writer, on_late_ack=self.storage_manager.record_late_ack,
            on_event=emit)
        self.repairer = Repairer(node_registry, lambda: self.storage_manager.manifest,
                                 config.distribution, self.writer,
                                 self.storage_manager.record_replica, placement,
                                 in_flight=self._in_flight)
        self.repairs_on_failure = RepairsOnFailure(self.repairer, self.storage_manager,
                                                   self.metrics)
        # Copies a quorum write could not place are hinted; a node that comes back gets them.
        self.hint_replays = HintReplays(self.repairer)
        self._unsubscribe = node_registry.subscribe(self._on_node_status)
        # Background work this orchestrator starts runs in its own context, not in that of
        # whoever's call happened to change a node's health (another orchestrator's).
        self._context = contextvars.copy_context()
        self._owner = this_owner(secrets.token_hex(4))  # each orchestrator its own lease
        self._skipped: list[dict[str, str]] = []
        self._stored = _StoredAlready()

    # -- the run's state, as the user's dashboard code reads it ----------------------------

    @property
    def pipeline_status(self) -> PipelineStatus:
        """idle, running, completed or failed."""
        return self.live.status

    @property
    def current_batch(self) -> str | None:
        """The batch being (or last) run."""
        return self.live.batch_id

    @property
    def current_stage(self) -> str | None:
        """The stage the run is in, None when not running."""
        return self.live.stage

    @property
    def progress_percent(self) -> float:
        """Share of the batch's bytes committed, 0-100."""
        return self.live.progress_percent

    @property
    def healthy_nodes(self) -> int:
        """Nodes in service."""
        return len(self.node_registry.healthy_nodes())

    @property
    def unhealthy_nodes(self) -> int:
        """Nodes out of service."""
        return len(self.node_registry.nodes) - self.healthy_nodes

    @property
    def current_throughput(self) -> float:
        """Committed MB per second so far."""
        return self.live.throughput_mb_s

    @property
    def estimated_completion(self) -> dt.datetime | None:
        """When the run should finish (local wall-clock time), None if unknown."""
        return self.live.estimated_completion

    def add_progress_listener(self, listener: ProgressListener) -> Callable[[], None]:
        """Call listener(live view) after every committed chunk; returns a remover."""
        return self.live.add_progress_listener(listener)

    def add_event_sink(self, sink: EventSink) -> Callable[[], None]:
        """Call sink(event) for every pipeline event; returns a remover."""
        return self.live.add_event_sink(sink)

    async def wait_for_progress(self, percent: float) -> None:
        """Return once progress reaches percent (or the run ends)."""
        await self.live.wait_for_progress(percent)

    # -- running -------------------------------------------------------------------------

    async def run_pipeline(self, batch_config: dict[str, Any]) -> PipelineResult:
        """Execute the complete pipeline: Ingestion -> Processing -> Distribution -> Storage.

        A batch id names one content forever: the same source again is a no-op, other
        content is refused (``replace`` in batch_config overrides), and a run that did not
        complete (crash, Ctrl-C, SIGTERM) resumes, skipping the chunks it committed. A
        cancelled run drains its writes, records what it committed, and marks the batch
        ``interrupted``.
        """
        if self.live.running:
            raise MulticloudError("this orchestrator is already running a batch; "
                                  "start another orchestrator for a parallel batch")
        batch_id = str(batch_config.get("batch_id") or f"batch-{int(time.time())}")
        self.metrics.reset()
        self.ingestion_engine.reset()
        self.processing_pool.reset()
        self.repairs_on_failure.created = 0
        self.live.begin(batch_id, Stage.INGESTION.value)
        started = clock.monotonic()
        ledger_before = self.node_registry.client.ledger.snapshot()
        begun = False
        renewal: asyncio.Task[None] | None = None
        try:
            source, cloud = self.ingestion_engine.resolve(batch_config)
            source = canonical_source(source)
            force = bool(batch_config.get("force_cross_cloud", False))
            listing = await asyncio.to_thread(
                survey_source, source, self.config.cluster.store_options(source),
                follow_symlinks=bool(batch_config.get("follow_symlinks")))
            check_policy(self.node_registry, self.config.distribution, force)
            self.live.total_bytes = listing.total_bytes
            manifest = self.storage_manager.manifest
            await self._learn_batch(batch_id)

            def begin() -> str:
                return manifest.begin_batch(
                    batch_id, str(source), cloud,
                    fingerprint=f"{listing.fingerprint}:"
                                f"{self.config.ingestion.chunk_size_bytes}",
                    owner=self._owner, replace=bool(batch_config.get("replace", False)))

            mode = await asyncio.to_thread(begin)
            # A delete racing a recovery can leave a stale record here: the catalogue's
            # tombstone, if any, wins, and the batch runs anew.
            if mode == "done" and await self.catalogue().drop_if_deleted(batch_id):
                mode = await asyncio.to_thread(begin)
            if mode == "done":
                return await self._already_done(batch_id)
            begun = True
            renewal = asyncio.create_task(self._renew_lease(batch_id))
            committed, packs = await self._committed(batch_id) if mode == "resume" \
                else ({}, set())
            self.storage_manager.begin(batch_id)
            await self.storage_manager.remember_committed(
                {ref[2] for ref in committed.values()} | packs)
            await self.storage_manager.load_node_usage()
            await self.processing_pool.configure_nodes()
            self._skipped = [{"file": e.path, "kind": e.kind, "reason": e.reason}
                             for e in listing.skipped]
            self._stored = _StoredAlready()
            self.live.emit("pipeline_started",
                           f"batch {batch_id}: {listing.count} files, {self.live.total_bytes} "
                           f"bytes from {source} ({cloud})"
                           + (f", resuming {len(committed)} committed chunks"
                              if committed else ""), source=str(source),
                           source_cloud=cloud, files=listing.count,
                           total_bytes=self.live.total_bytes, resumed_chunks=len(committed))
            if self._skipped:
                self.live.emit("files_skipped", f"{len(self._skipped)} entries are not "
                               f"regular files or links and were skipped: "
                               f"{', '.join(display_path(e['file']) for e in self._skipped[:5])}",
                               level="warning", skipped=self._skipped)
            self.live.committed_bytes += sum(ref[1] for ref in committed.values())
            await self._stream(batch_id, listing.files, cloud, force, committed)
            result = await self._finish(batch_id, started, ledger_before)
        except* MulticloudError as group:
            error = group.exceptions[0]
            while isinstance(error, ExceptionGroup):
                error = error.exceptions[0]
            result = await self._fail(batch_id, started, error, begun)
        finally:
            if renewal is not None:
                renewal.cancel()
                await asyncio.gather(renewal, return_exceptions=True)
            if self.live.running:
                # Cancelled (Ctrl-C, SIGTERM), or a bug: record what committed, so the
                # same command resumes, and leave the orchestrator usable.
                self.live.end(PipelineStatus.FAILED)
                if begun:
                    await asyncio.shield(self._interrupted(batch_id))
        return result

    async def _renew_lease(self, batch_id: str) -> None:
        manifest = self.storage_manager.manifest
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                held = await asyncio.to_thread(manifest.renew_lease, batch_id, self._owner)
            except MulticloudError as exc:  # a busy manifest: the next renewal may pass
                log.warning("could not renew the lease of batch %s: %s", batch_id, exc)
                continue
            if not held:
                log.error("batch %s was taken over by another run; this one will not "
                          "mark it done", batch_id)
                return

    async def _learn_batch(self, batch_id: str) -> None:
        """Ask the cluster about a batch id this cache does not know: it may name a batch
        run from another machine (or before this cache was lost), and ids are immutable
        cluster-wide."""
        manifest = self.storage_manager.manifest
        try:
            await asyncio.to_thread(manifest.batch, batch_id)
            return
        except UnknownBatch:
            pass
        report = await self.catalogue().recover(only=batch_id)
        if batch_id in report.failed:
            raise _unreadable(batch_id, report, "run again, or choose another --batch-id")

    async def _check_lease(self, batch_id: str) -> None:
        """BatchLeased when another run took the batch over (this one stalled past the
        lease's time to live): only the holder may mark it done."""
        record = await asyncio.to_thread(self.storage_manager.manifest.batch, batch_id)
        if record.owner != self._owner or record.status != "running":
            raise BatchLeased(f"batch {batch_id!r} was taken over by "
                              f"{describe_owner(record.owner)} while this run stalled; "
                              f"its run decides the batch")

    async def _committed(self, batch_id: str,
                         ) -> tuple[dict[tuple[str, int], tuple[int, int, str]], set[str]]:
        """The chunks an earlier run of the batch committed, as ingestion skips them, and
        the packs of small files it committed (made again, then found committed)."""
        manifest = self.storage_manager.manifest

        def read() -> tuple[list[ChunkRecord], dict[str, list[str]]]:
            records = manifest.chunks(batch_id)
            return records, manifest.replicas(sorted({r.chunk_id for r in records}))

        records, held = await asyncio.to_thread(read)
        if not records:
            return {}, set()
        # Skipped only where a node still lists it: a chunk whose copies went meanwhile
        # (a gc elsewhere, a lost disk) is read and sent again, not taken on trust.
        nodes = sorted({n for holders in held.values() for n in holders})
        listed = dict(zip(nodes, await asyncio.gather(*(self._listing(n) for n in nodes)),
                          strict=True))
        kept = [r for r in records if any(r.chunk_id in listed[n] for n in held[r.chunk_id])]
        # A file packed with others is not resumed on its own: its pack is made again
        # (whatever the pack settings are now), and is committed already if it comes out
        # the same.
        return ({(r.path, r.index): (r.offset, r.size, r.chunk_id) for r in kept if r.whole},
                {r.chunk_id for r in kept if not r.whole})

    async def _listing(self, node_id: str) -> set[str]:
        """The objects a node holds (none when it is down or does not answer)."""
        node = self.node_registry.nodes.get(node_id)
        if node is None or not node.healthy:
            return set()
        try:
            return set(await self.node_registry.client.inventory(node))
        except MulticloudError as exc:
            log.warning("%s did not list its objects (its chunks are sent again): %s",
                        node_id, exc)
            return set()

    async def _already_done(self, batch_id: str) -> PipelineResult:
        record = await asyncio.to_thread(self.storage_manager.manifest.batch, batch_id)
        done = record.result or {}
        self.live.end(PipelineStatus.COMPLETED)
        self.live.emit("pipeline_finished", f"batch {batch_id} is already complete with this "
                       f"content: nothing to do", status="success", already_done=True)
        return PipelineResult(status="success", batch_id=batch_id, duration_seconds=0.0,
                              chunks_processed=int(done.get("chunks_processed", 0)),
                              bytes_processed=int(done.get("bytes_processed", 0)),
                              files=int(done.get("files", 0)),
                              metrics={**done.get("metrics", {}), "already_done": True})

    async def _interrupted(self, batch_id: str) -> None:
        """Drain the writes past quorum, record every committed chunk, mark the batch."""
        try:
            await self.distribution_coordinator.drain()
            await self.storage_manager.flush()
            await asyncio.to_thread(self.storage_manager.manifest.finish_batch, batch_id,
                                    "interrupted", {"status": "interrupted",
                                                    "committed_chunks": self.live.committed_chunks},
                                    self._owner)
        except MulticloudError as exc:
            log.error("could not record the interruption of batch %s: %s", batch_id, exc)
        self.live.emit("pipeline_interrupted", f"batch {batch_id} interrupted after "
                       f"{self.live.committed_chunks} chunks; run the same command to resume",
                       level="warning", status="interrupted")

    async def restore_batch(self, batch_id: str, dest_dir: str | Path) -> RestoreReport:
        """Rebuild every file of a batch, byte-exact, under dest_dir: a folder, or a bucket
        URL (s3://, gs://, az://...) the files become objects under."""
        dest = str(dest_dir)
        if is_store_url(dest):
            dest = str(parse_store_url(dest))  # one form, no query, for the options' lookup
            store = await asyncio.to_thread(open_store, dest,
                                            self.config.cluster.store_options(dest))
            try:
                return await self._restorer().restore_to_store(batch_id, store)
            finally:
                store.close()
        return await self._restorer().restore(batch_id, dest_dir)

    async def verify_batch(self, batch_id: str) -> VerifyReport:
        """Check every replica of a batch."""
        return await self._restorer().verify(batch_id)

    async def knows(self, batch_id: str | None = None, *,
                    unreadable_ok: bool = False) -> RecoverReport | None:
        """Make the local manifest (a cache) know batch_id, or any batch with None: when
        it is missing (a fresh machine, a lost disk), empty, or does not know the batch,
        rebuild it from the catalogue on the nodes; the rebuild's report, None when none
        was needed.

        UsageError when there was no cache and the nodes know no batch; ClusterError when
        the nodes know batch_id but none could read its manifest (unless unreadable_ok:
        `delete` gives such a batch up)."""
        cached = manifest_path(self.node_registry).exists()
        manifest = self.storage_manager.manifest

        def known() -> bool:
            if batch_id is None:
                return bool(manifest.batches())
            try:
                manifest.batch(batch_id)
            except UnknownBatch:
                return False
            return True

        if cached and await asyncio.to_thread(known):
            return None
        report = await self.catalogue().recover(only=batch_id)
        if batch_id is not None and batch_id in report.failed and not unreadable_ok:
            raise _unreadable(batch_id, report, "try again")
        if not cached and not report.batches and not report.failed:
            data_dir = self.node_registry.data_dir
            what = "no batch is" if batch_id is None else f"batch {batch_id!r} is not"
            raise UsageError(f"{what} recorded here or on the cluster's nodes (data dir "
                             f"{data_dir}): run `multicloud run --source DIR --data-dir "
                             f"{data_dir}` first")
        return report

    async def repair(self, batch_id: str | None) -> MaintenanceReport:
        """Bring every chunk of one batch (None: every completed batch the cluster knows,
        also those this manifest cache does not) back to its replication factor, hand
        hinted copies to nodes that came back, and publish again a batch manifest whose
        every copy was found corrupt or gone."""
        if batch_id is None:
            catalogue = self.catalogue()
            await catalogue.republish_unreadable(await catalogue.recover(missing_only=True))
        ids = await self.chunk_ids_of(batch_id)
        report = await repair_chunks(self.node_registry, self.storage_manager, self.repairer,
                                     ids)
        replayed = await self.repairer.replay_hints()
        report.replicas_created += replayed.replicas_created
        await self._republish_lost_manifests(batch_id)
        return report

    async def _republish_lost_manifests(self, batch_id: str | None) -> None:
        """Completed batches whose manifest object has no recorded replica left (repair
        forgets only copies it found corrupt or missing, never those it could not ask):
        published again from this cache, so `recover` elsewhere still finds them."""
        manifest = self.storage_manager.manifest

        def orphaned() -> list[BatchRecord]:
            records = [manifest.batch(batch_id)] if batch_id else manifest.batches()
            done = [r for r in records if r.status == "success" and r.manifest_object]
            held = manifest.replicas([r.manifest_object or "" for r in done])
            return [r for r in done if not held.get(r.manifest_object or "")]

        await self.catalogue().publish_again(await asyncio.to_thread(orphaned))

    async def collect_garbage(self, *, dry_run: bool = False, grace_s: float = GC_GRACE_S,
                              assume_live_run: bool = False) -> MaintenanceReport:
        """Delete the objects no batch the cluster knows references (also batches run
        from other machines: the catalogue is read first)."""
        await self.catalogue().recover_everything()
        return await collect_garbage(self.node_registry, self.storage_manager.manifest,
                                     self.config.distribution, dry_run=dry_run,
                                     grace_s=grace_s, assume_live_run=assume_live_run)

    async def delete_batch(self, batch_id: str) -> tuple[BatchRecord, int]:
        """Forget a batch here and on the nodes (gc frees its bytes); its record and the
        number of nodes told. A batch only the nodes' catalogue names (its manifest
        unreadable everywhere) is given up too: its tombstone lets gc go on."""
        try:
            record = await asyncio.to_thread(self.storage_manager.manifest.delete_batch,
                                             batch_id)
        except UnknownBatch:
            entry = (await self.catalogue().entries()).get(batch_id)
            if entry is None or entry.get("status") == "deleted":
                raise
            record = BatchRecord(batch_id, str(entry.get("status", "success")),
                                 str(entry.get("source", "?")), "", 0.0, None, None)
        return record, await self.catalogue().forget(batch_id)

    async def chunk_ids_of(self, batch_id: str | None) -> list[str]:
        """The chunk ids of one batch, or of every completed batch, with their manifests."""
        manifest = self.storage_manager.manifest

        def collect() -> list[str]:
            records = [manifest.batch(batch_id)] if batch_id else [
                b for b in manifest.batches() if b.status == "success"]
            ids: set[str] = set()
            for record in records:
                ids.update(manifest.chunk_ids(record.batch_id))
                if record.manifest_object:
                    ids.add(record.manifest_object)
            return sorted(ids)

        return await asyncio.to_thread(collect)

    async def close(self) -> None:
        """Finish background writes and repairs, record them, release the manifest."""
        # First: a node failing while this closes must not start a repair (or a hint
        # replay) that outlives the manifest it records into.
        self._unsubscribe()
        await self.distribution_coordinator.drain()
        await self.repairs_on_failure.settle()
        await self.hint_replays.settle()
        try:
            await self.storage_manager.flush()
        except MulticloudError as exc:
            log.error("could not record the last replicas: %s", exc)
        self.writer.close()
        self.storage_manager.close()
        owner_gone(self._owner)

    def abandon(self) -> None:
        """Drop everything without finishing or recording anything: what a process killed
        with SIGKILL leaves behind. The simulator kills an orchestrator with this (and
        cancels its tasks); nothing it does afterwards reaches the manifest, the nodes'
        health or its lease."""
        self._unsubscribe()
        self.writer.close()
        self.storage_manager.manifest.close()  # opened if it was not: later use raises
        owner_gone(self._owner)

    # -- one run ----------------------------------------------------------------------------

    async def _stream(self, batch_id: str, files: Iterable[SourceFile], cloud: str,
                      force: bool,
                      committed: dict[tuple[str, int], tuple[int, int, str]]) -> None:
        ingestion = self.config.ingestion
        inflight = ByteBudget(ingestion.max_inflight_chunks * ingestion.chunk_size_bytes)
        chunks = self.ingestion_engine.iter_chunks(files, cloud, inflight, committed)
        async with asyncio.TaskGroup() as group, aclosing(chunks):
            async for chunk in chunks:
                group.create_task(self._chunk_flow(batch_id, chunk, force, inflight))
            self.metrics.record_stage(Stage.INGESTION, self.ingestion_engine.stats.chunks)
            self._stage_complete(Stage.INGESTION)
            self.live.stage = Stage.PROCESSING.value
        self._stage_complete(Stage.PROCESSING)

    async def _chunk_flow(self, batch_id: str, chunk: Chunk, force: bool,
                          inflight: ByteBudget) -> None:
        """One chunk through processing, distribution and storage, moving on when a node fails."""
        try:
            known = await self._stored_already(chunk, force)
            if known is not None:
                chunk.data = None
                self.storage_manager.commit_copy(chunk, known)
            else:
                distributed = await self.processing_pool.on_nodes(
                    chunk, lambda node: self._process_and_distribute(node, chunk, force))
                self.storage_manager.commit(distributed)
                context = self._records_context(chunk)
                if context is not None and not self.processing_pool.found_invalid(chunk):
                    self.storage_manager.note_clean(chunk.chunk_id, context)
            await self.storage_manager.flush(force=False)
            self.live.committed(chunk.size_bytes)
        finally:
            await inflight.release(chunk.size_bytes)
        if len(self.ingestion_engine.stats.file_entries) >= FILE_ENTRIES_HELD:
            await self._record_files(batch_id)

    def _records_context(self, chunk: Chunk) -> str | None:
        """What checking the chunk's records depends on, None when the run checks none."""
        processing = self.config.processing
        if "validate" not in processing.transforms or not processing.parse_records:
            return None
        return chunk.records_context

    async def _stored_already(self, chunk: Chunk, force: bool) -> BlobInfo | None:
        """The blob of a chunk the cluster holds already, for this chunk to be recorded
        against without a byte moving; None when it must go through processing.

        Held already: committed by this batch (the same bytes in another file, or by the
        run this one resumes), or by an earlier batch with a verified replica on at least
        `replication_factor` healthy nodes that still list it. A chunk whose records are
        checked counts only where the same check found them clean before (the check
        depends on where the chunk stands in its file, not only on its bytes). Encrypted
        blobs are never reused across batches: this run's key may not be the one they
        were sealed with, nor by a batch forced across clouds (where they are is not
        checked against that).
        """
        if not chunk.chunk_id:
            return None  # in a bucket: its node has yet to read it
        context = self._records_context(chunk)
        if context is None:
            known = self.storage_manager.committed_blob(chunk.chunk_id)
            if known is not None:
                return known
        if force or "encrypt" in self.config.processing.transforms:
            return None  # the key may have changed since: a stored blob may not open with it
        found = await asyncio.to_thread(self.storage_manager.manifest.stored, chunk.chunk_id,
                                        context)
        if found is None or "aes" in found[0].codec:
            return None
        blob, holders = found
        listed = 0
        for node_id in holders:
            node = self.node_registry.nodes.get(node_id)
            if node is not None and node.healthy and \
                    chunk.chunk_id in await self._stored.listing(node_id, self._listing):
                listed += 1
        if listed < self.config.distribution.replication_factor:
            return None
        self._stored.chunks += 1
        self._stored.bytes += chunk.size_bytes
        self._stored.reused.add(chunk.chunk_id)
        return blob

    async def _check_reused(self) -> None:
        """ClusterError if a chunk this run found stored by an earlier batch is on no healthy
        node now: a `gc` after a `delete` of the batch that held it can remove it before
        this batch's rows name it. The same command then resumes and sends it."""
        reused = self._stored.reused
        if not reused:
            return
        nodes = [n.id for n in self.node_registry.healthy_nodes()]
        listed: set[str] = set()
        for found in await asyncio.gather(*(self._listing(n) for n in nodes)):
            listed |= found & reused
        gone = len(reused - listed)
        if gone:
            raise ClusterError(f"{gone} chunk(s) this batch found stored already are on no "
                               f"healthy node now (a gc after a delete of the batch that held "
                               f"them, or their nodes went down); run the same command again "
                               f"to send them")

    async def _record_files(self, batch_id: str) -> None:
        """Write the files ingestion has finished to the manifest, and forget them here:
        a listing of a million objects is never held whole (rows of an unfinished batch
        are harmless, and a rerun writes them again)."""
        entries = self.ingestion_engine.stats.file_entries
        done, entries[:] = list(entries), []
        if done:
            await asyncio.to_thread(self.storage_manager.manifest.add_files, batch_id, done)

    async def _process_and_distribute(self, node: WorkerNode, chunk: Chunk,
                                      force: bool) -> DistributedChunk:
        identified = bool(chunk.chunk_id)
        processed = await self.processing_pool.process_on(node, chunk)
        if processed.result is None:
            raise ValidationFailed(processed.error or "processing failed")
        if not identified:  # a chunk of a bucket: the node read it and found its id
            self.ingestion_engine.identified(chunk)
        if chunk.path is not None:
            chunk.data = None  # the blob is staged; a retry re-reads the source
        # SourceLost (this node failed before quorum) makes on_nodes try the next node.
        return await self.distribution_coordinator.distribute(processed, force)

    async def _finish(self, batch_id: str, started: float,
                      ledger_before: dict[str, Any]) -> PipelineResult:
        self.live.stage = Stage.DISTRIBUTION.value
        with self.metrics.busy("distribution"):  # replicas past quorum are distribution too
            await self.distribution_coordinator.drain()
        self._stage_complete(Stage.DISTRIBUTION)
        self.live.stage = Stage.STORAGE.value
        storage = self.storage_manager
        await storage.flush()
        stats = self.ingestion_engine.stats
        await self._record_files(batch_id)
        await asyncio.to_thread(storage.manifest.set_quarantine, batch_id,
                                self.processing_pool.quarantined)
        await self.node_registry.probe()  # a node that died quietly must not count as a holder
        await self.repairs_on_failure.settle()
        early = self.repairs_on_failure.created
        await self._check_reused()
        repair = await self._final_repair(early) if self.config.storage.repair else None
        await self.repairs_on_failure.settle()  # a node that failed during the final pass
        await storage.flush()
        # The batch counts as done only once its manifest is on the nodes too: losing
        # this machine's disk must not lose the way back to the files. (Published before
        # the summary, so the run's traffic includes it.)
        await self._check_lease(batch_id)
        await self.catalogue().publish(batch_id, {
            "status": "success", "batch_id": batch_id, "files": stats.files,
            "chunks_processed": stats.chunks + stats.resumed_chunks,
            "bytes_processed": stats.bytes + stats.resumed_bytes})
        by_cloud, by_node = await storage.usage_by_place()
        facts = RunFacts(
            duration_s=clock.monotonic() - started, ingestion=stats,
            traffic=TrafficLedger.difference(self.node_registry.client.ledger.snapshot(),
                                             ledger_before),
            timeouts=self.writer.timeouts.snapshot(), by_cloud=by_cloud, by_node=by_node,
            under_replicated=await storage.under_replicated(), repair=repair,
            replicas_repaired_early=early,
            node_failures_handled=self.live.node_failures_handled,
            events=self.live.events, timeline=self.live.timeline)
        summary = run_summary(self.metrics, facts)
        summary["ingestion"]["skipped_entries"] = self._skipped
        summary["resumed_chunks"] = stats.resumed_chunks
        # Held at the replication factor by an earlier batch already: not processed, sent
        # or charged again. (The same bytes twice in this batch are not counted here.)
        summary["already_stored"] = {"chunks": self._stored.chunks,
                                     "bytes": self._stored.bytes}
        result = PipelineResult(status="success", batch_id=batch_id,
                                duration_seconds=facts.duration_s,
                                chunks_processed=stats.chunks + stats.resumed_chunks,
                                bytes_processed=stats.bytes + stats.resumed_bytes,
                                files=stats.files, metrics=summary)
        self._stage_complete(Stage.STORAGE, summary["storage"])
        await asyncio.to_thread(storage.manifest.finish_batch, batch_id, "success",
                                result.to_dict(), self._owner)
        self.live.end(PipelineStatus.COMPLETED)
        self.live.emit("pipeline_finished", f"batch {batch_id}: success, {stats.chunks} "
                       f"chunks in {facts.duration_s:.2f}s", status="success",
                       duration_seconds=facts.duration_s, chunks=stats.chunks,
                       bytes=stats.bytes, error=None)
        return result

    async def _final_repair(self, repaired_early: int) -> RepairReport:
        storage = self.storage_manager
        await storage.flush()
        with self.metrics.busy("storage"):
            repair = await self.repairer.repair(storage.chunk_ids)
        await storage.flush()
        created = repair.replicas_created + repaired_early
        self.live.emit("repair_done", f"{created} replica(s) re-created, "
                       f"{repair.under_replicated} chunk(s) still under-replicated",
                       level="warning" if repair.under_replicated else "info",
                       replicas_created=created, under_replicated=repair.under_replicated,
                       lost=repair.lost)
        return repair

    async def _fail(self, batch_id: str, started: float, error: BaseException,
                    begun: bool) -> PipelineResult:
        self.live.status = PipelineStatus.FAILED
        await self.distribution_coordinator.drain()
        await self.repairs_on_failure.settle()
        summary = self.metrics.get_summary()
        summary["node_failures_handled"] = self.live.node_failures_handled
        duration = clock.monotonic() - started
        result = PipelineResult(status="failed", batch_id=batch_id, duration_seconds=duration,
                                chunks_processed=self.live.committed_chunks,
                                bytes_processed=self.live.committed_bytes, metrics=summary,
                                error=str(error))
        if begun:
            # Writes in flight held disk space until they were drained above: what could
            # not be recorded then (it stays buffered) may fit now. The run's own error is
            # the one to report.
            try:
                await self.storage_manager.flush()
            except MulticloudError as exc:
                log.error("could not record the last replicas of batch %s: %s", batch_id, exc)
            try:
                await asyncio.to_thread(self.storage_manager.manifest.finish_batch, batch_id,
                                        "failed", result.to_dict(), self._owner)
            except MulticloudError as exc:
                log.error("could not record the failure of batch %s: %s", batch_id, exc)
        self.live.end(PipelineStatus.FAILED)
        self.live.emit("pipeline_finished", f"batch {batch_id}: failed: {error}", level="error",
                       status="failed", duration_seconds=duration,
                       chunks=self.live.committed_chunks, bytes=self.live.committed_bytes,
                       error=str(error))
        return result

    def _stage_complete(self, stage: Stage, metrics: dict[str, Any] | None = None) -> None:
        stage_metrics = metrics or self.metrics.get_summary()[stage.value]
        self.live.emit("stage_complete", f"{stage.value} complete", stage=stage.value,
                       metrics=stage_metrics)

    # -- node failures ----------------------------------------------------------------------

    def _on_node_status(self, node: WorkerNode, old: NodeStatus, reason: str) -> None:
        if not self.live.running:
            return
        if node.status is NodeStatus.UNHEALTHY:
            # Distribution re-places the node's in-flight writes at once; repair re-creates
            # the replicas it held before the run returns.
            self.live.node_failures_handled += 1
            self.live.emit("node_unhealthy", f"{node.id} ({node.cloud}/{node.region}): "
                           f"{reason}", level="warning", node_id=node.id, cloud=node.cloud,
                           region=node.region, reason=reason)
            if self.config.storage.repair:
                self._context.run(self.repairs_on_failure.start, node.id)
        else:
            self.live.emit("node_recovered", f"{node.id}: {reason}", node_id=node.id,
                           reason=reason)
            if node.status is NodeStatus.HEALTHY and old is not NodeStatus.HEALTHY:
                self._context.run(self.hint_replays.start)

    def _in_flight(self, chunk_id: str) -> list[str]:
        """Nodes a copy of the chunk is being written to or was written to, not recorded."""
        return [*self.distribution_coordinator.writing(chunk_id),
                *self.storage_manager.unrecorded(chunk_id)]

    def catalogue(self) -> Catalogue:
        """The batch catalogue kept on the nodes (publish, recover, forget)."""
        processing = self.config.processing
        key = load_key(processing.encryption) if "encrypt" in processing.transforms else None
        return Catalogue(self.node_registry, self.storage_manager.manifest,
                         self.config.distribution, processing, key)

    def _restorer(self) -> BatchRestorer:
        return BatchRestorer(self.node_registry, self.storage_manager.manifest,
                             key=load_key(self.config.processing.encryption),
                             replication_factor=self.config.distribution.replication_factor)


def _unreadable(batch_id: str, report: RecoverReport, then: str) -> ClusterError:
    """The error for a batch the cluster knows but whose manifest no node could read: give
    it up only when it is lost (every holder answered); else its nodes may come back."""
    way_back = (f"give it up with `multicloud delete {batch_id}`" if batch_id in report.lost
                else "bring its nodes back")
    return ClusterError(f"the cluster knows batch {batch_id!r} but its manifest could not be "
                        f"read ({report.failed[batch_id]}); {way_back}, then {then}")
