"""Stage 1, ingestion: cut source files into fixed-size chunks and hash each one once.

Files are read in chunk-sized pieces on a worker thread (read and SHA-256 together), so a
file is never held whole and the event loop never hashes. A whole-file digest is derived
from the chunk ids (SHA-256 over them, like a one-level Merkle tree), so restore can check
whole files without a second pass over the data here.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multicloud.config import IngestionConfig
from multicloud.errors import SourceError
from multicloud.monitoring.metrics import PipelineMetrics
from multicloud.pipeline.sources import SourceFile, infer_source_cloud, list_source
from multicloud.types import Chunk, FileEntry

if TYPE_CHECKING:
    from multicloud.cluster.registry import NodeRegistry


def file_digest(chunk_ids: list[str]) -> str:
    """The whole-file check: SHA-256 over the file's chunk ids in order."""
    digest = hashlib.sha256()
    for chunk_id in chunk_ids:
        digest.update(bytes.fromhex(chunk_id))
    return digest.hexdigest()


def _read(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def _read_and_hash(path: Path, offset: int, size: int) -> tuple[bytes, str]:
    data = _read(path, offset, size)
    return data, hashlib.sha256(data).hexdigest()


def _hash(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _csv_columns(data: bytes | memoryview) -> int | None:
    head = bytes(data[:65536]).split(b"\n", 1)[0]
    if not head:
        return None
    try:
        row = next(csv.reader([head.decode("utf-8", errors="replace").rstrip("\r")]))
    except (csv.Error, StopIteration):
        return None
    return len(row)


@dataclass
class IngestionStats:
    """What ingestion has done so far."""

    files: int = 0
    chunks: int = 0
    bytes: int = 0
    failures: int = 0
    seconds: float = 0.0  # time spent reading and hashing
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
        self, files: list[SourceFile], source_cloud: str,
        before_read: Callable[[], Awaitable[object]] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Yield every chunk of files in order, raw bytes attached as `chunk.data`.

        `before_read` is awaited before each read: the orchestrator passes its in-flight
        limit there, which is what bounds memory.
        """
        size = self.config.chunk_size_bytes
        for source_file in files:
            ids: list[str] = []
            columns: int | None = None
            fmt = source_file.record_format
            for index, offset in enumerate(range(0, source_file.size, size)):
                if before_read is not None:
                    await before_read()
                length = min(size, source_file.size - offset)
                started = time.perf_counter()
                self.metrics.attempt("ingestion")
                try:
                    with self.metrics.busy("ingestion"):
                        data, chunk_id = await asyncio.to_thread(
                            _read_and_hash, source_file.path, offset, length)
                except OSError as exc:
                    self.stats.failures += 1
                    self.metrics.failure("ingestion")
                    raise SourceError(f"cannot read {source_file.path}: {exc.strerror}") from exc
                self.stats.seconds += time.perf_counter() - started
                if len(data) != length:
                    self.stats.failures += 1
                    self.metrics.failure("ingestion")
                    raise SourceError(f"{source_file.path} changed while it was read "
                                      f"(expected {source_file.size} bytes); run again")
                if fmt == "csv" and index == 0:
                    columns = _csv_columns(data)
                ids.append(chunk_id)
                self.metrics.success("ingestion", length, time.perf_counter() - started)
                self.stats.chunks += 1
                self.stats.bytes += length
                yield Chunk(chunk_id=chunk_id, file=source_file.rel_path, index=index,
                            offset=offset, size_bytes=length, source_cloud=source_cloud,
                            path=source_file.path, record_format=fmt, csv_columns=columns,
                            at_file_end=offset + length >= source_file.size, data=data)
            self.stats.files += 1
            self.stats.file_entries.append(FileEntry(
                path=source_file.rel_path, size=source_file.size, chunk_count=len(ids),
                digest=file_digest(ids)))

    async def ingest_batch(self, source: str | Path | dict[str, Any]) -> list[Chunk]:
        """Chunk and hash a whole source; returns chunk metadata (bytes are re-read later)."""
        path, cloud = self.resolve(source)
        files = await asyncio.to_thread(list_source, path)
        chunks = []
        async for chunk in self.iter_chunks(files, cloud):
            chunk.data = None  # keep memory flat: processing re-reads from chunk.path
            chunks.append(chunk)
        return chunks

    async def chunk_file(self, name: str, data: bytes | memoryview,
                         source_cloud: str | None = None) -> list[Chunk]:
        """Chunk in-memory bytes as if they were the file `name`."""
        size = self.config.chunk_size_bytes
        view = memoryview(data)
        cloud = source_cloud or self.default_cloud
        fmt = SourceFile(name, Path(name), len(view)).record_format
        chunks = []
        for index, offset in enumerate(range(0, len(view), size)):
            piece = view[offset:offset + size]
            chunk_id = await asyncio.to_thread(_hash, piece)
            chunks.append(Chunk(chunk_id=chunk_id, file=name, index=index, offset=offset,
                                size_bytes=len(piece), source_cloud=cloud, record_format=fmt,
                                csv_columns=_csv_columns(view) if fmt == "csv" else None,
                                at_file_end=offset + len(piece) >= len(view), data=piece))
        self.stats.chunks += len(chunks)
        self.stats.bytes += len(view)
        return chunks


async def read_chunk_bytes(chunk: Chunk) -> bytes | memoryview:
    """The raw bytes of a chunk: attached, else re-read from its source file."""
    if chunk.data is not None:
        return chunk.data
    if chunk.path is None:
        raise SourceError(f"chunk {chunk.index} of {chunk.file} has no data and no source path")
    try:
        data = await asyncio.to_thread(_read, chunk.path, chunk.offset, chunk.size_bytes)
    except OSError as exc:
        raise SourceError(f"cannot re-read {chunk.path}: {exc.strerror}") from exc
    if len(data) != chunk.size_bytes:
        raise SourceError(f"{chunk.path} changed since it was ingested; run the batch again")
    return data  # processing validates the checksum itself
