"""What a worker node does, whichever way its requests arrive.

A `NodeService` is the whole node: processing on its worker slots (the transform chain,
`max_workers_per_node` threads), a staging area for processed blobs until distribution
has pushed them, a durable chunk store, the push of a blob to a peer, its faults and its
metrics. Requests reach it through `handle`, from an in-process carrier or from the HTTP
server, and it reaches peers through the `Channel` it is given: the data plane exists
once, here.

Writes are verified against the sender's checksum before they are made durable, and a
write whose request is cancelled (the caller timed out, or gave up on the node) removes
the object it had created once the disk write it could not stop has finished.

A chunk's blobs are not all the same bytes: encryption draws a fresh nonce, so two
processings of one chunk, or its replicas from two batches, differ while holding the same
raw bytes (the chunk id is the identity; restore checks it). So a node pushes its blob
with the checksum of the bytes it holds, and a chunk processed twice while staged keeps
its first blob and the info that goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, ParamSpec, TypeVar

from multicloud.blob import TransformChain, blob_checksum, check_blob
from multicloud.blob.validate import InvalidRecord, find_invalid_record
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import (
    ChunkNotFound,
    ClusterError,
    IntegrityError,
    MulticloudError,
    NodeUnavailable,
    StorageError,
    ValidationFailed,
    error_code,
    to_wire,
)
from multicloud.core.messages import Body, Channel, NodeAddress, Reply, Request
from multicloud.core.network import Link, LinkEmulator, Location
from multicloud.core.types import BlobInfo, Chunk, ReplicaAck
from multicloud.node.faults import HeldWrites, NodeFaults
from multicloud.node.metrics import NodeMetrics
from multicloud.node.source_reads import SourceReader
from multicloud.node.store import check_chunk_id
from multicloud.node.stores import NodeStore, catalog_for

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
CheckResult = Literal["ok", "missing", "corrupt"]
Handler = Callable[[Request], Awaitable[Reply]]

# Disk work (hashing received bytes, writing, fsync) gets its own threads so it never waits
# behind processing on the worker slots.
_IO_THREADS = 4


@dataclass(frozen=True, slots=True)
class PushResult:
    """How a push to a peer went: its ack or its error, and the bytes that left this node."""

    ack: ReplicaAck | None
    error: MulticloudError | None
    sent_bytes: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (the error in its wire form)."""
        return {"ack": self.ack.to_json() if self.ack else None,
                "error": to_wire(self.error) if self.error else None,
                "sent_bytes": self.sent_bytes}


class _ChunkLocks:
    """One lock per chunk id, alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, chunk_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(chunk_id, (asyncio.Lock(), 0))
        self._locks[chunk_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[chunk_id]
            if users == 1:
                del self._locks[chunk_id]
            else:
                self._locks[chunk_id] = (lock, users - 1)


class NodeService:
    """A worker node: processing slots, a staging area, a durable chunk store, its peers."""

    def __init__(self, node_id: str, location: Location, store: NodeStore, peers: Channel,
                 processing: ProcessingConfig | None = None, *, allow_faults: bool = True,
                 seed: int = 0, time_scale: float = 0.0) -> None:
        self.node_id = node_id
        self.location = location
        self.store = store
        self.peers = peers
        self.allow_faults = allow_faults
        self.faults = NodeFaults(f"{seed}/{node_id}")  # each node its own, reproducible
        self.metrics = NodeMetrics(node_id, location)
        self.metrics.watch_store(store)
        store.observe_fsync(self.metrics.fsync_seconds.observe)
        self.links = LinkEmulator(time_scale)  # the orchestrator's `configure` may reset it
        self._io = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix=f"{node_id}-io")
        self._workers: ThreadPoolExecutor | None = None
        self._chain: TransformChain | None = None
        self._check_records = False  # whether .jsonl/.csv records are parsed (configure)
        self._fail_on_invalid = True  # processing.on_invalid_records == "fail"
        self._staged: dict[str, tuple[Body, BlobInfo]] = {}
        # The same chunk can be in flight twice at once (identical pieces of two files):
        # a staged blob stays until every processing of it has been released.
        self._staged_refs: dict[str, int] = {}
        self._chunk_locks = _ChunkLocks()
        self._processing_key = ""  # the configured transform chain, as JSON
        self._undoing = 0  # cancelled writes waiting for their disk write, to take it back
        self.sources = SourceReader()  # bucket sources this node reads chunks of itself
        self._ops: dict[str, Handler] = {
            "health": self._op_health, "configure": self._op_configure,
            "process": self._op_process, "push": self._op_push, "put": self._op_put,
            "get": self._op_get, "has": self._op_has, "delete": self._op_delete,
            "check": self._op_check, "inventory": self._op_inventory,
            "usage": self._op_usage, "release": self._op_release, "fault": self._op_fault,
            "catalog": self._op_catalog,
        }
        self.catalog = catalog_for(store, f"node {node_id}")
        self.configure(processing or ProcessingConfig())

    @property
    def address(self) -> NodeAddress:
        """How peers reach this node in-process (cluster mode adds the URL)."""
        return NodeAddress(self.node_id, self.location)

    # -- requests --------------------------------------------------------------------------

    async def handle(self, request: Request) -> Reply:
        """Serve one request: the one entry point of every carrier."""
        handler = self._ops.get(request.op)
        if handler is None:
            known = ", ".join(sorted(self._ops))
            raise ClusterError(f"node {self.node_id} has no operation {request.op!r} "
                               f"(known: {known})")
        started = time.perf_counter()
        status = "ok"
        try:
            if request.op != "fault":
                self._check_reachable(request.sender)
            reply = await handler(request)
            if request.op != "fault" and self.faults.crashed:
                raise NodeUnavailable(self.node_id, "crashed before it could reply")
            return reply
        except MulticloudError as exc:
            status = error_code(exc)
            raise
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            self.metrics.request(request.op, status, time.perf_counter() - started)

    def _check_reachable(self, sender: Location | None) -> None:
        if self.faults.crashed:
            raise NodeUnavailable(self.node_id, "connection refused (crashed)")
        if sender is not None and self.faults.partitioned(sender.cloud, self.location.cloud):
            raise NodeUnavailable(self.node_id, f"network partition between {sender.cloud} "
                                                f"and {self.location.cloud}")

    async def _op_health(self, request: Request) -> Reply:
        return Reply({"id": self.node_id, "cloud": self.location.cloud,
                      "region": self.location.region, "status": "ok"})

    async def _op_configure(self, request: Request) -> Reply:
        try:
            processing = ProcessingConfig.model_validate(_arg(request, "processing"))
            time_scale = float(request.meta.get("time_scale", 0.0))
        except (TypeError, ValueError) as exc:
            raise ClusterError(f"a 'configure' request with a bad config: {exc}") from None
        self.configure(processing, time_scale)
        return Reply({"configured": True})

    async def _op_process(self, request: Request) -> Reply:
        try:
            chunk = Chunk.from_json(_arg(request, "chunk"))
            wanted = request.meta.get("processing")
            if wanted is not None and _key(wanted) != self._processing_key:
                # A node that missed the run's `configure` (down at the start, restarted
                # since) processes with the run's chain all the same.
                self.configure(ProcessingConfig.model_validate(wanted))
            raw_link = request.meta.get("link")
            link = Link.from_json(raw_link) if raw_link is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ClusterError(f"a 'process' request with bad metadata: {exc}") from None
        if request.body is None and chunk.source_ref is not None:
            data: Body = await self.read_source(chunk, link)
        else:
            data = _body(request)
        self._count_received(request.sender, len(data))
        info, invalid = await self.process_outcome(chunk, data)
        return Reply({"blob": info.to_json(),
                      "invalid": invalid.to_json() if invalid is not None else None})

    async def _op_push(self, request: Request) -> Reply:
        try:
            target = NodeAddress.from_json(_arg(request, "target"))
            link = Link.from_json(_arg(request, "link"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ClusterError(f"a 'push' request needs a valid target and link: {exc}") \
                from None
        result = await self.push(check_chunk_id(_arg(request, "chunk_id")), target, link)
        return Reply(result.to_json())

    async def _op_put(self, request: Request) -> Reply:
        data = _body(request)
        self._count_received(request.sender, len(data))
        ack = await self.write(check_chunk_id(_arg(request, "chunk_id")), data,
                               str(_arg(request, "checksum")))
        return Reply({"ack": ack.to_json()})

    async def _op_get(self, request: Request) -> Reply:
        blob = await self.read(check_chunk_id(_arg(request, "chunk_id")))
        raw_link = request.meta.get("link")
        if raw_link is not None:  # this node sends the bytes, so it emulates their link
            try:
                link = Link.from_json(raw_link)
            except (KeyError, TypeError, ValueError) as exc:
                raise ClusterError(f"a 'get' request has a malformed 'link': {exc!r}") \
                    from None
            await self.links.transfer(self.node_id, link, len(blob))
            self.metrics.sent.labels(link.dst.cloud).inc(len(blob))
        return Reply({"size": len(blob)}, blob)

    async def _op_has(self, request: Request) -> Reply:
        chunk_id = check_chunk_id(_arg(request, "chunk_id"))
        return Reply({"present": await self._run(self._io, self.has, chunk_id)})

    async def _op_delete(self, request: Request) -> Reply:
        older_than = request.meta.get("older_than")
        chunk_id = check_chunk_id(_arg(request, "chunk_id"))
        if older_than is not None and (isinstance(older_than, bool)
                                       or not isinstance(older_than, int | float)):
            raise ClusterError(f"a 'delete' request has a malformed 'older_than': "
                               f"{older_than!r} (expected epoch seconds)")
        return Reply({"deleted": await self.delete(
            chunk_id, None if older_than is None else float(older_than))})

    async def _op_check(self, request: Request) -> Reply:
        return Reply({"state": await self.check(check_chunk_id(_arg(request, "chunk_id")))})

    async def _op_inventory(self, request: Request) -> Reply:
        if request.meta.get("details"):
            return Reply({"objects": await self._run(self._io, self.store.describe)})
        return Reply({"chunks": await self.inventory()})

    async def _op_usage(self, request: Request) -> Reply:
        chunks, nbytes = self.store.usage()
        return Reply({"chunks": chunks, "bytes": nbytes, "disk_free": self.store.disk_free()})

    async def _op_release(self, request: Request) -> Reply:
        self.release(str(_arg(request, "chunk_id")))
        return Reply({"released": True})

    async def _op_catalog(self, request: Request) -> Reply:
        action = request.meta.get("action")
        if action == "list":
            return Reply({"entries": await self._run(self._io, self.catalog.entries)})
        if action == "put" and isinstance(request.meta.get("entry"), dict):
            await self._before_write()
            kept = await self._run(self._io, self.catalog.put, request.meta["entry"])
            return Reply({"kept": kept})
        raise ClusterError(f"a 'catalog' request needs action 'list', or 'put' with an "
                           f"entry; got {action!r}")

    async def _op_fault(self, request: Request) -> Reply:
        if not self.allow_faults:
            raise ClusterError(f"node {self.node_id} does not take faults: start it with "
                               f"--allow-faults (for tests and soaks only)")
        try:
            return Reply(await self.fault(str(_arg(request, "action")), request.meta))
        except (KeyError, TypeError, ValueError) as exc:
            raise ClusterError(f"a 'fault' request with bad arguments: {exc!r}") from None

    def _count_received(self, sender: Location | None, nbytes: int) -> None:
        self.metrics.received.labels(sender.cloud if sender else "").inc(nbytes)

    # -- operations ------------------------------------------------------------------------

    def configure(self, processing: ProcessingConfig, time_scale: float | None = None) -> None:
        """Set the transform chain, the number of worker slots and the link time scale."""
        # The node parses records itself, after the chain has checked that the bytes are the
        # source's (see _transform): so a chunk whose records do not parse can still be
        # encoded and staged in quarantine mode, and records are parsed once in either mode.
        chain = TransformChain.from_config(processing.model_copy(update={"parse_records": False}))
        old = self._workers
        self._workers = ThreadPoolExecutor(processing.max_workers_per_node,
                                           thread_name_prefix=f"{self.node_id}-worker")
        self._chain = chain
        self._check_records = "validate" in processing.transforms and processing.parse_records
        self._fail_on_invalid = processing.on_invalid_records == "fail"
        self.worker_slots = processing.max_workers_per_node
        self._processing_key = _key(processing.model_dump(mode="json"))
        if time_scale is not None:
            self.links = LinkEmulator(time_scale)
        if old is not None:
            old.shutdown(wait=False)

    async def process(self, chunk: Chunk, data: Body) -> BlobInfo:
        """Validate and transform a chunk on a worker slot; stage the blob for distribution."""
        info, _ = await self.process_outcome(chunk, data)
        return info

    async def process_outcome(self, chunk: Chunk, data: Body,
                              ) -> tuple[BlobInfo, InvalidRecord | None]:
        """`process`, also saying which record did not parse when the chunk was staged all
        the same (`on_invalid_records: quarantine`); with `fail`, such a chunk raises
        ValidationFailed and nothing is staged. Bytes that are not the source's (size or
        checksum) raise ValidationFailed in either mode."""
        if self._workers is None or self._chain is None:  # pragma: no cover - set in __init__
            raise RuntimeError("NodeService.configure() was not called")
        blob, info, invalid = await self._run(
            self._workers, _transform, self._chain, chunk, data,
            check_records=self._check_records, fail_on_invalid=self._fail_on_invalid)
        # Already staged (identical pieces of two files): keep the first blob, whose info
        # distribution is writing with, and hand out that info again.
        blob, info = self._staged.setdefault(info.chunk_id, (blob, info))
        self._staged_refs[info.chunk_id] = self._staged_refs.get(info.chunk_id, 0) + 1
        return info, invalid

    async def read_source(self, chunk: Chunk, link: Link | None) -> memoryview:
        """Read a chunk of a bucket source from the bucket (see `SourceReader`); the link
        from the bucket to this node is emulated here, as the node is the one reading."""
        if link is not None:
            await self.links.transfer(self.node_id, link, chunk.size_bytes)
        if self._workers is None:  # pragma: no cover - set in __init__
            raise RuntimeError("NodeService.configure() was not called")
        # On a worker slot, as processing is: a slow bucket then holds up this node's
        # processing, never its replica writes and reads (the I/O threads).
        return await self._run(self._workers, self.sources.read, chunk)

    def staged_blob(self, chunk_id: str) -> Body | None:
        """The staged blob of a processed chunk, if still held."""
        staged = self._staged.get(chunk_id)
        return staged[0] if staged else None

    def release(self, chunk_id: str) -> None:
        """Drop a staged blob once every replica write for it has finished."""
        refs = self._staged_refs.get(chunk_id, 0) - 1
        if refs > 0:
            self._staged_refs[chunk_id] = refs
            return
        self._staged_refs.pop(chunk_id, None)
        self._staged.pop(chunk_id, None)

    def drop_staged(self) -> None:
        """Forget every staged blob (what a crash does to memory)."""
        self._staged.clear()
        self._staged_refs.clear()

    async def blob_for_push(self, chunk_id: str) -> tuple[Body, str]:
        """The bytes to send to another node, and their checksum: the staged blob, else the
        stored one (its envelope verified, so the checksum is of good bytes)."""
        staged = self._staged.get(chunk_id)
        if staged is not None:
            return staged[0], staged[1].blob_checksum
        blob = await self.read(chunk_id)
        return blob, await self._run(self._io, blob_checksum, blob)

    async def push(self, chunk_id: str, target: NodeAddress, link: Link) -> PushResult:
        """Send a staged or stored blob to target, which verifies and stores it.

        Pushing to this node itself stores the staged blob in place. A failure of the
        target (down, cut off, refusing the bytes, out of room) is the result's `error`,
        with the bytes that left this node; a failure of this node itself is raised.
        """
        if target.node_id == self.node_id:
            try:
                return PushResult(await self.persist_staged(chunk_id), None, 0)
            except (NodeUnavailable, StorageError) as exc:  # as target: out of room, crashed
                if isinstance(exc, ChunkNotFound):
                    raise  # as source: the staged blob is gone
                return PushResult(None, exc, 0)
        blob, checksum = await self.blob_for_push(chunk_id)
        cloud = target.location.cloud
        if self.faults.partitioned(self.location.cloud, cloud):
            cut = NodeUnavailable(target.node_id, f"network partition between "
                                                  f"{self.location.cloud} and {cloud}")
            return PushResult(None, cut, 0)
        await self.links.transfer(self.node_id, link, len(blob))
        self.metrics.sent.labels(cloud).inc(len(blob))
        put = Request("put", {"chunk_id": chunk_id, "checksum": checksum}, blob, self.location)
        try:
            reply = await self.peers.call(target, put)
        except MulticloudError as exc:
            return PushResult(None, exc, len(blob))
        return PushResult(ReplicaAck.from_json(reply.meta["ack"]), None, len(blob))

    async def persist_staged(self, chunk_id: str) -> ReplicaAck:
        """Store this node's own staged blob (the processing node is one of the targets).

        The blob never left this node's memory: the checksum processing computed stands.
        """
        staged = self._staged.get(chunk_id)
        if staged is None:
            raise ChunkNotFound(f"chunk {chunk_id} is not staged on {self.node_id}")
        blob, info = staged
        started = time.perf_counter()
        await self._before_write()
        await self._durable_put(chunk_id, blob)
        return ReplicaAck(self.node_id, chunk_id, info.blob_checksum, len(blob),
                          time.perf_counter() - started)

    async def write(self, chunk_id: str, blob: Body, expected_checksum: str) -> ReplicaAck:
        """Verify a received blob against the sender's checksum, then store it durably."""
        check_chunk_id(chunk_id)
        started = time.perf_counter()
        await self._before_write()
        await self._run(self._io, _verify_received, self.node_id, chunk_id, blob,
                        expected_checksum)
        await self._durable_put(chunk_id, blob)
        return ReplicaAck(self.node_id, chunk_id, expected_checksum, len(blob),
                          time.perf_counter() - started)

    async def read(self, chunk_id: str) -> bytes:
        """A stored blob, checked before it leaves the node."""
        check_chunk_id(chunk_id)
        blob = await self._run(self._io, self.store.get, chunk_id)
        await self._run(self._io, check_blob, blob, chunk_id)
        return blob

    async def check(self, chunk_id: str) -> CheckResult:
        """Scrub one replica: "ok", "missing" or "corrupt"."""
        try:
            await self.read(chunk_id)
        except ChunkNotFound:
            return "missing"
        except IntegrityError:
            return "corrupt"
        return "ok"

    def has(self, chunk_id: str) -> bool:
        """Whether the store holds the object (unverified)."""
        return self.store.exists(chunk_id)

    async def delete(self, chunk_id: str, older_than: float | None = None) -> bool:
        """Remove a stored object (only if last written before ``older_than``, when given:
        gc's guard against taking an object a run has just written again)."""
        async with self._chunk_locks.hold(chunk_id):
            return await self._run(self._io, self.store.delete, chunk_id, older_than)

    async def inventory(self) -> list[str]:
        """Ids of every object the node holds."""
        return await self._run(self._io, lambda: sorted(self.store.inventory()))

    async def usage(self) -> tuple[int, int]:
        """(objects, bytes) stored."""
        return self.store.usage()

    async def fault(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """Switch a fault on or off (see multicloud.node.faults); what it did, as JSON."""
        faults = self.faults
        if action == "crash":
            self._crash()
        elif action == "restart":
            faults.crashed = False
            await self._run(self._io, self.store.clear_temp_files)
        elif action == "partition":
            faults.partitions.add(frozenset((str(args["a"]), str(args["b"]))))
        elif action == "heal":
            faults.partitions.clear()
        elif action == "corrupt":
            chunk_id = check_chunk_id(args["chunk_id"])
            size = self.store.size(chunk_id)
            if size is None:
                raise ChunkNotFound(f"chunk {chunk_id} is not on {self.node_id}")
            offset = faults.rng.randrange(size)
            await self._run(self._io, self.store.corrupt, chunk_id, offset)
            return {"offset": offset}
        elif action == "lose":
            return {"lost": await self._run(self._io, self.store.delete,
                                            check_chunk_id(args["chunk_id"]))}
        elif action == "crash_during_write":
            faults.crash_on_write(int(args.get("nth", 1)))
        elif action == "disarm":
            faults.disarm()
        elif action == "disk_full":
            self.store.quota_bytes = self.store.bytes if args.get("full", True) else None
        elif action == "hold_disk":
            # Writes stop on the disk itself, after their bytes hit the temp file and
            # before the rename: where a cancelled request meets a write it cannot stop.
            self.store.commit_held.clear()
            self.store.commit_gate = threading.Event()
        elif action == "wait_disk_held":
            await asyncio.to_thread(self.store.commit_held.wait)
        elif action == "release_disk":
            commit_gate, self.store.commit_gate = self.store.commit_gate, None
            if commit_gate is not None:
                commit_gate.set()
        elif action == "hold_writes":
            faults.gate = HeldWrites()
        elif action == "state":
            return {"crashed": faults.crashed, "quota_bytes": self.store.quota_bytes,
                    "partitions": sorted(sorted(pair) for pair in faults.partitions),
                    "held": faults.gate.held if faults.gate else 0,
                    "undoing": self._undoing}
        elif action in ("wait_held", "held", "release_writes"):
            gate = faults.gate
            if gate is None:
                raise ClusterError(f"node {self.node_id} holds no writes: hold_writes first")
            if action == "wait_held":
                await gate.arrived.wait()
            elif action == "release_writes":
                gate.opened.set()
            return {"held": gate.held}
        else:
            raise ClusterError(f"unknown fault {action!r} for node {self.node_id}")
        return {"ok": True}

    def close(self) -> None:
        """Stop the node's threads."""
        self.drop_staged()
        self.sources.close()
        if self._workers is not None:
            self._workers.shutdown(wait=True)
        self._io.shutdown(wait=True)

    # -- internals ------------------------------------------------------------------------

    def _crash(self) -> None:
        self.faults.crashed = True
        self.drop_staged()

    async def _before_write(self) -> None:
        await self.faults.hold_if_gated()
        if self.faults.crashed:
            raise NodeUnavailable(self.node_id, "crashed while the write waited")
        if self.faults.write_crashes_now():
            await self._run(self._io, self.store.write_partial, "interrupted-write.partial", 1024)
            self._crash()
            raise NodeUnavailable(self.node_id, "crashed in the middle of a write")

    async def _durable_put(self, chunk_id: str, blob: Body) -> None:
        """store.put on an I/O thread; if the request is cancelled, undo what it created."""
        loop = asyncio.get_running_loop()
        async with self._chunk_locks.hold(chunk_id):
            # On a thread, like every store call: a bucket store asks its bucket.
            existed = await self._run(self._io, self.store.exists, chunk_id)
            write = loop.run_in_executor(self._io, self.store.put, chunk_id, blob)
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # The thread cannot be stopped: wait for it (through further cancels, and
                # still holding the chunk's lock), then take back an object that no caller
                # will record; one that was already there stays.
                self._undoing += 1
                try:
                    await _despite_cancels(write)
                    if not write.cancelled() and write.exception() is None and not existed:
                        undo = loop.run_in_executor(self._io, self.store.delete, chunk_id)
                        await _despite_cancels(undo)
                        if undo.exception() is None:
                            log.info("%s: removed chunk %s, whose write was cancelled",
                                     self.node_id, chunk_id[:12])
                        else:
                            log.warning("%s: could not remove chunk %s, whose write was "
                                        "cancelled (gc will): %s", self.node_id,
                                        chunk_id[:12], undo.exception())
                finally:
                    self._undoing -= 1
                raise

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[P, T], *args: P.args,
                   **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, partial(fn, *args, **kwargs))


async def _despite_cancels(work: asyncio.Future[Any]) -> None:
    """Wait until work (a thread's job, which cannot be stopped) is done, however often the
    waiting task is cancelled meanwhile; its outcome stays on the future."""
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(work)
    if not work.cancelled():
        work.exception()  # retrieved: an error of the undo is not left unobserved


def _transform(chain: TransformChain, chunk: Chunk, data: Body, *, check_records: bool,
               fail_on_invalid: bool) -> tuple[Body, BlobInfo, InvalidRecord | None]:
    """A chunk's blob and its first invalid record (on a worker slot).

    The chain runs first: it checks that the bytes are the source's, and a chunk that fails
    that is never stored. A record that does not parse is the source's own, so in
    quarantine mode the blob holds it exactly as it is and a restore gives it back.
    """
    blob, info = chain.apply(chunk, data)
    invalid = find_invalid_record(chunk, data) if check_records else None
    if invalid is not None and fail_on_invalid:
        raise ValidationFailed(invalid.message(chunk))
    return blob, info, invalid


def _key(processing: Any) -> str:
    """A transform chain's config as one comparable string."""
    return json.dumps(processing, sort_keys=True, separators=(",", ":"))


def _arg(request: Request, name: str) -> Any:
    """A required argument of the request; ClusterError (a bad request) when it is missing."""
    try:
        return request.meta[name]
    except KeyError:
        raise ClusterError(f"a {request.op!r} request needs {name!r}") from None


def _body(request: Request) -> Body:
    if request.body is None:
        raise ClusterError(f"a {request.op!r} request needs a body")
    return request.body


def _verify_received(node_id: str, chunk_id: str, blob: Body, expected_checksum: str) -> None:
    actual = blob_checksum(blob)
    if actual != expected_checksum:
        raise IntegrityError(
            f"{node_id} refused chunk {chunk_id}: checksum {actual} does not match "
            f"the sender's {expected_checksum}; nothing was stored"
        )
    check_blob(blob, chunk_id)
