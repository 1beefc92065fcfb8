"""The performance targets users set, with their own thresholds: the only timed asserts.

Both time the code `multicloud run` runs: ingest_batch streams through the run's
`iter_chunks`, process_chunks through the run's `process_on` on each chunk's node.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from multicloud import NodeRegistry
from multicloud.core.config import IngestionConfig
from multicloud.pipeline.ingestion import DataIngestionEngine
from multicloud.pipeline.processing import ProcessingWorkerPool

pytestmark = pytest.mark.performance

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
BLOCK = 64 * MIB
DEFAULT_CHUNK = 100 * MIB  # IngestionConfig's default chunk_size_mb


def jsonl_lines(size: int, seed: int = 0) -> bytes:
    """Whole JSON log lines adding up to at most `size` bytes and more than `size - 512`."""
    rng = random.Random(seed)
    levels = ("INFO", "INFO", "INFO", "WARN", "ERROR")
    paths = ("/api/cart", "/api/orders", "/api/checkout", "/healthz", "/api/products")
    lines: list[bytes] = []
    total = 0
    while True:
        line = json.dumps({
            "ts": 1_767_225_600_000 + len(lines) * 40,
            "level": rng.choice(levels),
            "service": f"svc-{rng.randrange(8)}",
            "trace_id": f"{rng.getrandbits(128):032x}",
            "path": rng.choice(paths),
            "status": rng.choice((200, 200, 201, 404, 500)),
            "latency_ms": round(rng.lognormvariate(3.7, 1.0), 2),
            "message": f"user u_{rng.randrange(10**6):06d} did {rng.randrange(100)} things",
        }).encode() + b"\n"
        if total + len(line) > size:
            return b"".join(lines)
        lines.append(line)
        total += len(line)


async def test_processing_latency_under_100ms(node_registry: NodeRegistry) -> None:
    """Verify processing meets latency requirements."""
    worker_pool = ProcessingWorkerPool(node_registry)
    chunk_size = 100 * KIB
    data = jsonl_lines(100 * chunk_size)
    ingestion = DataIngestionEngine(node_registry, IngestionConfig(chunk_size_mb=100 / 1024))
    chunks = await ingestion.chunk_file("t.jsonl", data)
    assert len(chunks) == 100
    assert all(c.size_bytes == chunk_size for c in chunks[:-1])

    start = time.perf_counter()
    results = await worker_pool.process_chunks(chunks)
    duration = time.perf_counter() - start

    assert len(results) == len(chunks)
    assert all(r.result is not None for r in results), [r.error for r in results if r.error]
    avg_latency = duration / len(chunks)
    print(f"processing: {len(chunks)} chunks of 100 KiB in {duration:.3f} s, "
          f"avg {avg_latency * 1000:.2f} ms per chunk")
    assert avg_latency < 0.1  # <100ms average


@pytest.fixture(scope="session")
def one_gib_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 1 GiB file of random bytes, written once per session and deleted after."""
    path = tmp_path_factory.mktemp("throughput") / "1gb_test_file.dat"
    with path.open("wb") as out:
        for _ in range(GIB // BLOCK):
            out.write(os.urandom(BLOCK))
    yield path
    path.unlink(missing_ok=True)


def read_slice(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes of path from offset."""
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


async def test_ingestion_throughput(node_registry: NodeRegistry, one_gib_file: Path) -> None:
    """Test ingestion can handle target throughput."""
    engine = DataIngestionEngine(node_registry)
    assert engine.config.chunk_size_bytes == DEFAULT_CHUNK
    # Warm the page cache: this measures ingestion (read + SHA-256), not the disk.
    with one_gib_file.open("rb") as handle:
        while handle.read(BLOCK):
            pass

    start = time.perf_counter()
    chunks = await engine.ingest_batch(one_gib_file)
    duration = time.perf_counter() - start

    throughput_mbps = 1024 / duration  # MB/s
    print(f"ingestion: 1 GiB in {duration:.3f} s = {throughput_mbps:.0f} MB/s")
    # 10 full chunks of 100 MiB and one of the remaining 24 MiB.
    assert len(chunks) == 11
    assert [c.size_bytes for c in chunks] == [DEFAULT_CHUNK] * 10 + [24 * MIB]
    assert [c.offset for c in chunks] == [i * DEFAULT_CHUNK for i in range(11)]
    first, last = chunks[0], chunks[-1]
    assert first.chunk_id == hashlib.sha256(
        read_slice(one_gib_file, 0, DEFAULT_CHUNK)).hexdigest()
    assert last.chunk_id == hashlib.sha256(
        read_slice(one_gib_file, last.offset, 24 * MIB)).hexdigest()
    assert throughput_mbps > 200  # >200 MB/s target
