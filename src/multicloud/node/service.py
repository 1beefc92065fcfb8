"""What a worker node does, whichever transport reaches it.

The embedded cluster calls a `NodeService` directly; cluster mode wraps the same class in
an HTTP server. Processing runs the transform chain on the node's worker slots
(`max_workers_per_node` threads) and stages the blob until distribution has pushed it;
writes are verified against the sender's checksum before they are made durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal, ParamSpec, TypeVar

from multicloud.blob.transforms import TransformChain, blob_checksum, check_blob
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import ChunkNotFound, IntegrityError
from multicloud.core.types import BlobInfo, Chunk, ReplicaAck
from multicloud.node.store import ChunkStore, check_chunk_id

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
CheckResult = Literal["ok", "missing", "corrupt"]

# Disk work (hashing received bytes, writing, fsync) gets its own threads so it never waits
# behind processing on the worker slots.
_IO_THREADS = 4


class NodeService:
    """A worker node: processing slots, a staging area and a durable chunk store."""

    def __init__(self, node_id: str, store: ChunkStore,
                 processing: ProcessingConfig | None = None) -> None:
        self.node_id = node_id
        self.store = store
        self._io = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix=f"{node_id}-io")
        self._workers: ThreadPoolExecutor | None = None
        self._chain: TransformChain | None = None
        self._staged: dict[str, bytes] = {}
        # The same chunk can be in flight twice at once (identical pieces of two files):
        # a staged blob stays until every processing of it has been released.
        self._staged_refs: dict[str, int] = {}
        self.configure(processing or ProcessingConfig())

    def configure(self, processing: ProcessingConfig) -> None:
        """Set the transform chain and the number of worker slots."""
        chain = TransformChain.from_config(processing)
        old = self._workers
        self._workers = ThreadPoolExecutor(processing.max_workers_per_node,
                                           thread_name_prefix=f"{self.node_id}-worker")
        self._chain = chain
        self.max_workers = processing.max_workers_per_node
        if old is not None:
            old.shutdown(wait=False)

    async def process(self, chunk: Chunk, data: bytes | memoryview) -> BlobInfo:
        """Validate and transform a chunk on a worker slot; stage the blob for distribution."""
        if self._workers is None or self._chain is None:
            raise RuntimeError("NodeService.configure() was not called")
        blob, info = await self._run(self._workers, self._chain.apply, chunk, data)
        self._staged.setdefault(info.chunk_id, blob)
        self._staged_refs[info.chunk_id] = self._staged_refs.get(info.chunk_id, 0) + 1
        return info

    def staged_blob(self, chunk_id: str) -> bytes | None:
        """The staged blob of a processed chunk, if still held."""
        return self._staged.get(chunk_id)

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

    async def blob_for_push(self, chunk_id: str) -> bytes:
        """The bytes to send to another node: the staged blob, else the stored, verified one."""
        staged = self._staged.get(chunk_id)
        if staged is not None:
            return staged
        return await self.read(chunk_id)

    async def persist_staged(self, chunk_id: str, checksum: str | None = None) -> ReplicaAck:
        """Store this node's own staged blob (the processing node is one of the targets).

        `checksum` is the one processing computed (BlobInfo.blob_checksum); the blob never
        left this node's memory, so it is not hashed again when given.
        """
        blob = self._staged.get(chunk_id)
        if blob is None:
            raise ChunkNotFound(f"chunk {chunk_id} is not staged on {self.node_id}")
        started = time.perf_counter()
        checksum = checksum or blob_checksum(blob)
        await self._run(self._io, self.store.put, chunk_id, blob)
        return ReplicaAck(self.node_id, chunk_id, checksum, len(blob),
                          time.perf_counter() - started)

    async def write(self, chunk_id: str, blob: bytes | memoryview,
                    expected_checksum: str) -> ReplicaAck:
        """Verify a received blob against the sender's checksum, then store it durably."""
        check_chunk_id(chunk_id)
        started = time.perf_counter()
        await self._run(self._io, _verify_received, self.node_id, chunk_id, blob,
                        expected_checksum)
        await self._run(self._io, self.store.put, chunk_id, blob)
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

    async def delete(self, chunk_id: str) -> bool:
        """Remove a stored object."""
        return await self._run(self._io, self.store.delete, chunk_id)

    async def inventory(self) -> list[str]:
        """Ids of every object the node holds."""
        return await self._run(self._io, lambda: sorted(self.store.inventory()))

    async def usage(self) -> tuple[int, int]:
        """(objects, bytes) stored."""
        return await self._run(self._io, self.store.usage)

    def close(self) -> None:
        """Stop the node's threads."""
        self._staged.clear()
        self._staged_refs.clear()
        if self._workers is not None:
            self._workers.shutdown(wait=True)
        self._io.shutdown(wait=True)

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[P, T], *args: P.args,
                   **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, partial(fn, *args, **kwargs))


def _verify_received(node_id: str, chunk_id: str, blob: bytes | memoryview,
                     expected_checksum: str) -> None:
    actual = blob_checksum(blob)
    if actual != expected_checksum:
        raise IntegrityError(
            f"{node_id} refused chunk {chunk_id}: checksum {actual} does not match "
            f"the sender's {expected_checksum}; nothing was stored"
        )
    check_blob(blob, chunk_id)
