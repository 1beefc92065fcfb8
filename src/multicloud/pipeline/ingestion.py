"""Stage 1, ingestion: cut source files into fixed-size chunks and hash each one once.

Each chunk gets its SHA-256 (the chunk id) and, in the same pass over the bytes in cache,
an xxh3-128 that processing uses to check the bytes arrived intact.

Files are read in chunk-sized pieces on a worker thread (read and SHA-256 together), so a
file is never held whole and the event loop never hashes. A whole-file digest is derived
from the chunk ids (SHA-256 over them, like a one-level Merkle tree), so restore can check
whole files without a second pass over the data here.

Files smaller than `pack_below_mb` are not chunks of their own: they are packed, whole and
one after another, into a shared chunk of up to `pack_size_mb` (a pack, as restic and borg
make), which records each file's place in it (`Chunk.members`). Ten thousand small files
are then a few chunks to process, send, store and restore, not ten thousand. A packed
file's digest is the same as if it were a chunk alone: SHA-256 over its own SHA-256.

An object in a bucket is not read here at all: its chunks leave as references (bucket,
key, version, range) with no id yet, a node of the bucket's cloud reads and hashes each,
and the run hands the id back through `identified`; the file's entry is complete once
every chunk of it has been identified. A listing that is not a list (a bucket's, which
streams page by page) is pulled on a worker thread a page at a time.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import itertools
import os
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from multicloud.core import clock
from multicloud.core.buffers import aligned
from multicloud.core.config import IngestionConfig
from multicloud.core.errors import SourceError
from multicloud.core.types import Chunk, FileEntry, PackMember
from multicloud.node.source_reads import SourceReader
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.sources import SourceFile, infer_source_cloud, survey_source

if TYPE_CHECKING:
    from multicloud.control.registry import NodeRegistry


def file_digest(chunk_ids: list[str]) -> str:
    """The whole-file check: SHA-256 over the file's chunk ids in order."""
    digest = hashlib.sha256()
    for chunk_id in chunk_ids:
        digest.update(bytes.fromhex(chunk_id))
    return digest.hexdigest()


_MAX_CARRY = 1024 * 1024  # longer unfinished lines are not carried (nor checked whole)


def line_carry(prefix: bytes | None, data: bytes | memoryview) -> bytes | None:
    """The unfinished last line after data, given the unfinished line before it."""
    view = memoryview(data)
    newline = bytes(view[-_MAX_CARRY - 1:]).rfind(b"\n")
    if newline >= 0:
        return bytes(view[len(view) - min(len(view), _MAX_CARRY + 1) + newline + 1:])
    if prefix is None or len(prefix) + len(view) > _MAX_CARRY:
        return None
    return prefix + bytes(view)


def _read_into(path: Path, offset: int, size: int) -> memoryview:
    """size bytes of path from offset (fewer at its end), in a buffer of huge pages: a
    chunk-sized `bytes` would cost a page fault every 4 KiB, more than the read itself."""
    buffer = aligned(size)
    got = 0
    with path.open("rb", buffering=0) as handle:
        while got < size and (n := os.preadv(handle.fileno(), [buffer[got:]], offset + got)):
            got += n
    return buffer[:got]


def _read_and_hash(path: Path, offset: int, size: int) -> tuple[memoryview, str, str]:
    """The bytes, their SHA-256 (the chunk id) and their xxh3-128 (for the transit check)."""
    data = _read_into(path, offset, size)
    return data, hashlib.sha256(data).hexdigest(), xxhash.xxh3_128_hexdigest(data)


def _hash(data: bytes | memoryview) -> tuple[str, str]:
    return hashlib.sha256(data).hexdigest(), xxhash.xxh3_128_hexdigest(data)


def _file_bytes(source_file: SourceFile) -> bytes | memoryview:
    """A small file's bytes, whole: held in memory, else read."""
    if source_file.data is not None:
        return source_file.data
    with source_file.path.open("rb") as handle:
        return handle.read(source_file.size)  # as a chunk is read: a file that grew is cut


def _read_pack(files: tuple[SourceFile, ...]) -> tuple[bytes, str, str, list[str]]:
    """The pack of files (their bytes one after another), its SHA-256 and xxh3-128, and
    each file's own SHA-256 (its id in the file's digest)."""
    parts = []
    for source_file in files:
        try:
            data = _file_bytes(source_file)
        except OSError as exc:
            raise SourceError(f"cannot read {source_file.path}: {exc.strerror}") from exc
        if len(data) != source_file.size:
            raise SourceError(f"{source_file.path} changed while it was read (expected "
                              f"{source_file.size} bytes); run again")
        parts.append(data)
    data = b"".join(parts)
    return (data, *_hash(data), [hashlib.sha256(part).hexdigest() for part in parts])


def pack_bytes(chunk: Chunk) -> bytes:
    """Read a pack's files again (a retry after its bytes were dropped)."""
    files = []
    for member in chunk.members:
        if member.path is None:
            raise SourceError(f"{member.file} was packed from memory and cannot be re-read")
        files.append(SourceFile(member.file, member.path, member.size))
    return _read_pack(tuple(files))[0]


def _csv_columns(data: bytes | memoryview) -> int | None:
    head = bytes(data[:65536]).split(b"\n", 1)[0]
    if not head:
        return None
    try:
        row = next(csv.reader([head.decode("utf-8", errors="replace").rstrip("\r")]))
    except (csv.Error, StopIteration):
        return None
    return len(row)


class ByteBudget:
    """Bounds the bytes of the chunks in flight (not their number), so small files overlap
    more while the memory bound, max_inflight_chunks full chunks, stays the same."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    def would_block(self, nbytes: int) -> bool:
        """Whether acquiring nbytes now would wait."""
        return self.used > 0 and self.used + nbytes > self.limit

    async def acquire(self, nbytes: int) -> None:
        """Take nbytes of the budget (a chunk larger than the limit waits to be alone)."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self.would_block(nbytes))
            self.used += nbytes

    async def release(self, nbytes: int) -> None:
        """Give nbytes back."""
        async with self._changed:
            self.used -= nbytes
            self._changed.notify_all()


@dataclass(frozen=True, slots=True)
class _Piece:
    """One chunk-sized read of a source file (length 0 stands for an empty file), or a pack
    of small files (`packed`; `file` is then its first)."""

    file: SourceFile
    index: int
    offset: int
    length: int
    packed: tuple[SourceFile, ...] = ()

    def can_pack(self, below: int) -> bool:
        """Whether this is a whole small file that goes into a pack."""
        return (0 < self.length == self.file.size < below and self.file.ref is None
                and self.file.kind == "file")


# What reading a piece gives: its bytes, SHA-256, xxh3-128, and for a pack each file's id.
_Read = tuple[bytes | memoryview, str, str, list[str]]


@dataclass
class _FileProgress:
    file: SourceFile
    ids: list[str] = field(default_factory=list)  # "" where a node has yet to hash it
    csv_columns: int | None = None
    carry: bytes | None = b""  # the unfinished last line so far
    pending: int = 0  # chunks sent as references, not yet identified
    planned: bool = False  # every chunk of the file has been yielded or skipped


def _pieces(source_file: SourceFile, size: int) -> Iterator[_Piece]:
    if source_file.size == 0 or source_file.kind == "symlink":
        # Nothing to read: an empty file, or a link, which is recorded and never read
        # (reading it would store its target's bytes, and could block on a FIFO).
        yield _Piece(source_file, 0, 0, 0)
        return
    for index, offset in enumerate(range(0, source_file.size, size)):
        yield _Piece(source_file, index, offset, min(size, source_file.size - offset))


_LISTING_PAGE = 500  # files pulled from a streamed listing per trip to a worker thread


async def _plan(files: Iterable[SourceFile], size: int) -> AsyncIterator[_Piece]:
    """The pieces of every file; a listing that is not a list is pulled off the loop."""
    if isinstance(files, list | tuple):
        for source_file in files:
            for piece in _pieces(source_file, size):
                yield piece
        return
    listing = iter(files)
    while page := await asyncio.to_thread(lambda: list(itertools.islice(listing,
                                                                        _LISTING_PAGE))):
        for source_file in page:
            for piece in _pieces(source_file, size):
                yield piece


async def _packed(pieces: AsyncIterator[_Piece], below: int, size: int,
                  ) -> AsyncIterator[_Piece]:
    """pieces, with the whole files under `below` bytes gathered into packs of up to
    `size` bytes, each pack handed on once the next file does not fit, or at the end."""
    packing: list[SourceFile] = []
    packed = 0
    async for piece in pieces:
        if not piece.can_pack(below):
            yield piece
            continue
        if packed + piece.length > size:
            yield _pack(packing, packed)
            packing, packed = [], 0
        packing.append(piece.file)
        packed += piece.length
    if packing:
        yield _pack(packing, packed)


def _pack(files: list[SourceFile], length: int) -> _Piece:
    if len(files) == 1:  # alone: a chunk like any other
        return _Piece(files[0], 0, 0, length)
    return _Piece(files[0], 0, 0, length, tuple(files))


@dataclass
class IngestionStats:
    """What ingestion has done so far."""

    files: int = 0
    chunks: int = 0
    bytes: int = 0
    failures: int = 0
    seconds: float = 0.0  # time spent reading and hashing
    resumed_chunks: int = 0  # committed by an earlier run of the batch: not read again
    resumed_bytes: int = 0
    file_entries: list[FileEntry] = field(default_factory=list)


class DataIngestionEngine:
    """Lists a source, reads it chunk by chunk, and hashes every chunk once."""

    def __init__(self, node_registry: NodeRegistry | None = None,
                 config: IngestionConfig | None = None,
                 default_cloud: str | None = None,
                 metrics: PipelineMetrics | None = None) -> None:
        self.registry = node_registry
        self.metrics = metrics or PipelineMetrics()
        self.config = config or IngestionConfig()
        cluster_default = node_registry.config.default_source_cloud if node_registry else "aws"
        self.default_cloud = default_cloud or cluster_default
        self.stats = IngestionStats()
        self._progress: dict[str, _FileProgress] = {}

    def reset(self) -> None:
        """Count a new run from zero."""
        self.stats = IngestionStats()
        self._progress = {}

    def resolve(self, source: str | Path | dict[str, Any]) -> tuple[str, str]:
        """(data source, source cloud) from a path or a batch_config dict."""
        if isinstance(source, dict):
            if "data_source" not in source:
                raise SourceError("batch_config has no 'data_source': give a directory or file")
            path = str(source["data_source"])
            cloud = source.get("source_cloud") or infer_source_cloud(path, self.default_cloud)
            return path, str(cloud)
        return str(source), infer_source_cloud(source, self.default_cloud)

    async def iter_chunks(
        self, files: Iterable[SourceFile], source_cloud: str,
        inflight: ByteBudget | None = None,
        committed: Mapping[tuple[str, int], tuple[int, int, str]] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Yield every chunk of files in order, raw bytes attached as `chunk.data`.

        Up to `read_ahead` chunks are read and hashed at once (on worker threads, so
        SHA-256 runs on several cores). The chunk's size is taken from `inflight` before each
        read and
        released by the consumer once the chunk is done with: that bounds memory.

        `committed` maps (file, index) to (offset, size, chunk id) for the chunks an earlier
        run of the batch committed: those are neither read nor yielded (a resume).

        A file in a bucket (`SourceFile.ref`) is not read: its chunks are yielded at once,
        with `source_ref` set and no id, for a node to read (see `identified`).
        """
        size = self.config.chunk_size_bytes
        window: deque[tuple[_Piece, asyncio.Task[_Read]]] = deque()
        progress = self._progress
        try:
            async for piece in _packed(_plan(files, size), self.config.pack_below_bytes,
                                       self.config.pack_size_bytes):
                if not piece.packed:
                    # (A pack is not resumed from `committed`: it is made again, small
                    # files being cheap to read, and rows of the run before are replaced.)
                    state = progress.get(piece.file.rel_path)
                    if state is None:
                        state = progress[piece.file.rel_path] = _FileProgress(piece.file)
                    if piece.length == 0:
                        self._file_done(piece.file, state)
                        continue
                    done = (committed.get((piece.file.rel_path, piece.index)) if committed
                            else None)
                    if done is not None and done[:2] == (piece.offset, piece.length):
                        # Chunks before it finish first, so the file's ids stay in order.
                        while window:
                            yield await self._complete(*window.popleft(), source_cloud,
                                                       progress)
                        self._skip(piece, state, done[2])
                        continue
                # Never block on a slot while holding chunks the consumer has not seen.
                while inflight is not None and inflight.would_block(piece.length) and window:
                    yield await self._complete(*window.popleft(), source_cloud, progress)
                if inflight is not None:
                    await inflight.acquire(piece.length)
                if piece.file.ref is not None:
                    yield self._reference(piece, progress[piece.file.rel_path], source_cloud)
                    continue
                window.append((piece, asyncio.create_task(self._read(piece))))
                if len(window) >= self.config.read_ahead:
                    yield await self._complete(*window.popleft(), source_cloud, progress)
            while window:
                yield await self._complete(*window.popleft(), source_cloud, progress)
        finally:
            for _, task in window:
                task.cancel()
            await asyncio.gather(*(task for _, task in window), return_exceptions=True)

    async def _read(self, piece: _Piece) -> _Read:
        self.metrics.attempt("ingestion")
        with self.metrics.busy("ingestion"):
            if piece.packed:
                return await asyncio.to_thread(_read_pack, piece.packed)
            held = piece.file.data
            if held is not None:  # in memory already: cut and hash, no copy
                view = held[piece.offset:piece.offset + piece.length]
                return (view, *await asyncio.to_thread(_hash, view), [])
            return (*await asyncio.to_thread(_read_and_hash, piece.file.path, piece.offset,
                                             piece.length), [])

    async def _complete(self, piece: _Piece, task: asyncio.Task[_Read], source_cloud: str,
                        progress: dict[str, _FileProgress]) -> Chunk:
        started = clock.monotonic()
        source_file = piece.file
        try:
            data, chunk_id, raw_xxh3, member_ids = await task
        except SourceError:  # a packed file that could not be read or shrank
            self.stats.failures += 1
            self.metrics.failure("ingestion")
            raise
        except OSError as exc:
            self.stats.failures += 1
            self.metrics.failure("ingestion")
            raise SourceError(f"cannot read {source_file.path}: {exc.strerror}") from exc
        if len(data) != piece.length:
            self.stats.failures += 1
            self.metrics.failure("ingestion")
            raise SourceError(f"{source_file.path} changed while it was read "
                              f"(expected {source_file.size} bytes); run again")
        if piece.packed:
            return self._pack_done(piece, data, chunk_id, raw_xxh3, member_ids, source_cloud,
                                   clock.monotonic() - started)
        state = progress[source_file.rel_path]
        fmt = source_file.record_format
        if fmt == "csv" and piece.index == 0:
            state.csv_columns = _csv_columns(data)
        state.ids.append(chunk_id)
        prefix = state.carry if piece.index > 0 else None
        if fmt is not None:
            state.carry = line_carry(prefix if piece.index > 0 else b"", data)
        self.metrics.success("ingestion", piece.length, clock.monotonic() - started)
        self.stats.chunks += 1
        self.stats.bytes += piece.length
        at_end = piece.offset + piece.length >= source_file.size
        if at_end:
            self._file_done(source_file, state)
        return Chunk(chunk_id=chunk_id, file=source_file.rel_path, index=piece.index,
                     offset=piece.offset, size_bytes=piece.length, source_cloud=source_cloud,
                     path=source_file.path if source_file.data is None else None,
                     record_format=fmt, csv_columns=state.csv_columns,
                     at_file_end=at_end, line_prefix=prefix, raw_xxh3=raw_xxh3, data=data)

    def _pack_done(self, piece: _Piece, data: bytes | memoryview, chunk_id: str,
                   raw_xxh3: str, member_ids: list[str], source_cloud: str,
                   seconds: float) -> Chunk:
        """The chunk of a pack just read; each of its files is complete."""
        members = []
        at = 0
        for source_file, file_id in zip(piece.packed, member_ids, strict=True):
            members.append(PackMember(source_file.rel_path, at, source_file.size,
                                      source_file.record_format,
                                      source_file.path if source_file.data is None else None))
            at += source_file.size
            self._file_done(source_file, _FileProgress(source_file, [file_id]))
        self.metrics.success("ingestion", piece.length, seconds)
        self.stats.chunks += 1
        self.stats.bytes += piece.length
        name = f"a pack of {len(members)} file(s) from {members[0].file}"
        return Chunk(chunk_id=chunk_id, file=name, index=0, offset=0,
                     size_bytes=piece.length, source_cloud=source_cloud,
                     raw_xxh3=raw_xxh3, data=data, members=tuple(members))

    def _reference(self, piece: _Piece, state: _FileProgress, source_cloud: str) -> Chunk:
        """A chunk of a bucket object, for a node to read: no bytes, no id yet."""
        source_file = piece.file
        at_end = piece.offset + piece.length >= source_file.size
        state.ids.append("")
        state.pending += 1
        state.planned = at_end
        self.metrics.attempt("ingestion")
        self.metrics.success("ingestion", piece.length, 0.0)
        self.stats.chunks += 1
        self.stats.bytes += piece.length
        # The lines either side of a chunk boundary are the node's to see only in part:
        # the boundary line goes unchecked (line_prefix None), and a later chunk of a CSV
        # is checked for well-formed lines, not against the header's field count.
        return Chunk(chunk_id="", file=source_file.rel_path, index=piece.index,
                     offset=piece.offset, size_bytes=piece.length, source_cloud=source_cloud,
                     record_format=source_file.record_format, at_file_end=at_end,
                     source_ref=source_file.ref)

    def identified(self, chunk: Chunk) -> None:
        """Record the id a node found for a chunk it read from a bucket; the file's entry
        is made once all of its chunks are known."""
        state = self._progress.get(chunk.file)
        if state is None or chunk.index >= len(state.ids) or state.ids[chunk.index]:
            return  # known already (the chunk was processed again on another node)
        state.ids[chunk.index] = chunk.chunk_id
        state.pending -= 1
        self._maybe_done(state)

    def _maybe_done(self, state: _FileProgress) -> None:
        if state.planned and state.pending == 0:
            self._file_done(state.file, state)

    def _skip(self, piece: _Piece, state: _FileProgress, chunk_id: str) -> None:
        """Account for a chunk an earlier run committed, without reading it."""
        state.ids.append(chunk_id)
        state.carry = None  # its last line is unknown: the next boundary line goes unchecked
        self.stats.resumed_chunks += 1
        self.stats.resumed_bytes += piece.length
        if piece.offset + piece.length >= piece.file.size:
            state.planned = True
            self._maybe_done(state)

    def _file_done(self, source_file: SourceFile, state: _FileProgress) -> None:
        self._progress.pop(source_file.rel_path, None)  # memory stays flat over a listing
        self.stats.files += 1
        self.stats.file_entries.append(FileEntry(
            path=source_file.rel_path, size=source_file.size, chunk_count=len(state.ids),
            digest=file_digest(state.ids), mode=source_file.mode,
            mtime_ns=source_file.mtime_ns, kind=source_file.kind,
            link_target=source_file.link_target))

    async def ingest_batch(self, source: str | Path | dict[str, Any]) -> list[Chunk]:
        """Chunk and hash a whole source; returns chunk metadata (bytes are re-read later)."""
        path, cloud = self.resolve(source)
        listing = await asyncio.to_thread(survey_source, path)
        reader = SourceReader()  # a bucket's chunks are read here: no node does it
        chunks = []
        try:
            async with aclosing(self.iter_chunks(listing.files, cloud)) as stream:
                async for chunk in stream:
                    if chunk.source_ref is not None:
                        await asyncio.to_thread(reader.read, chunk)
                        self.identified(chunk)
                    chunk.data = None  # keep memory flat: processing re-reads from chunk.path
                    chunks.append(chunk)
        finally:
            reader.close()
        return chunks

    async def chunk_file(self, name: str, data: bytes | memoryview,
                         source_cloud: str | None = None) -> list[Chunk]:
        """Chunk in-memory bytes as if they were the file `name`, as a run chunks files.

        The chunks keep their bytes attached (`chunk.data`, views of `data`: no copy).
        """
        view = memoryview(data).cast("B")
        source = SourceFile(name, Path(name), len(view), data=view)
        async with aclosing(self.iter_chunks([source], source_cloud or self.default_cloud)) \
                as stream:
            return [chunk async for chunk in stream]


async def read_chunk_bytes(chunk: Chunk) -> bytes | memoryview:
    """The raw bytes of a chunk: attached, else re-read from its source file."""
    if chunk.data is not None:
        return chunk.data
    if chunk.members:
        return await asyncio.to_thread(pack_bytes, chunk)
    if chunk.path is None:
        raise SourceError(f"chunk {chunk.index} of {chunk.file} has no data and no source path")
    try:
        data = await asyncio.to_thread(_read_into, chunk.path, chunk.offset, chunk.size_bytes)
    except OSError as exc:
        raise SourceError(f"cannot re-read {chunk.path}: {exc.strerror}") from exc
    if len(data) != chunk.size_bytes:
        raise SourceError(f"{chunk.path} changed since it was ingested; run the batch again")
    return data  # processing validates the checksum itself
