"""Restoring small files packed into shared chunks (and chunks files share) on the embedded
cluster: byte-exact, each chunk read once, only the chunks asked for, a failure confined to
its file, and group commit leaving no temp file behind when a file fails or a restore is
cancelled."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multicloud import Cluster, PipelineConfig, PipelineOrchestrator, WorkerNode
from multicloud.blob import TransformChain
from multicloud.cloud import open_store
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import IntegrityError, RestoreError
from multicloud.core.network import Location
from multicloud.core.types import BlobInfo, Chunk, FileEntry, PackMember
from multicloud.pipeline import restore_files
from multicloud.pipeline.ingestion import file_digest
from multicloud.pipeline.manifest import ChunkRecord, Manifest
from multicloud.pipeline.restore import BatchRestorer, SharedChunks

CLIENT = Location("aws", "us-east-1")  # where the test writes blobs from
MTIME = 1_262_304_000_123_456_789
HOLDERS = ["aws-node-1", "aws-node-2", "gcp-node-1"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def store_chunk(cluster: Cluster, chunk: Chunk, raw: bytes) -> BlobInfo:
    """The chunk's blob, written to every holder."""
    blob, info = TransformChain(ProcessingConfig()).apply(chunk, raw)
    for node_id in HOLDERS:
        await cluster.client.write(cluster.get(node_id), info, bytes(blob), CLIENT)
    return info


async def add_pack(cluster: Cluster, manifest: Manifest, batch_id: str,
                   files: dict[str, bytes]) -> str:
    """Record files packed into one chunk (in this order) and store it; its id."""
    raw = b"".join(files.values())
    members, at = [], 0
    for path, data in files.items():
        members.append(PackMember(path, at, len(data)))
        at += len(data)
    chunk = Chunk(chunk_id=sha(raw), file=f"a pack of {len(files)}", index=0, offset=0,
                  size_bytes=len(raw), source_cloud="aws", members=tuple(members))
    info = await store_chunk(cluster, chunk, raw)
    manifest.record_commits(batch_id, [(chunk, info)],
                            [(chunk.chunk_id, node_id) for node_id in HOLDERS])
    manifest.add_files(batch_id, [
        FileEntry(path, len(data), 1, file_digest([sha(data)]), mode=0o640, mtime_ns=MTIME)
        for path, data in files.items()])
    return chunk.chunk_id


async def add_plain(cluster: Cluster, manifest: Manifest, batch_id: str, path: str,
                    data: bytes) -> str:
    """Record a file of one chunk of its own (not packed) and store it; the chunk's id."""
    chunk = Chunk(chunk_id=sha(data), file=path, index=0, offset=0, size_bytes=len(data),
                  source_cloud="aws")
    info = await store_chunk(cluster, chunk, data)
    manifest.record_commits(batch_id, [(chunk, info)],
                            [(chunk.chunk_id, node_id) for node_id in HOLDERS])
    manifest.add_files(batch_id, [FileEntry(path, len(data), 1, file_digest([sha(data)]))])
    return chunk.chunk_id


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[Manifest]:
    """A manifest of its own (the test writes the batches)."""
    with Manifest(tmp_path / "manifest.db") as opened:
        yield opened


@pytest.fixture
def reads(node_registry: Cluster, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Chunk id -> how many times restore read it from a node."""
    counted: Counter[str] = Counter()
    read = node_registry.client.read

    async def counting(node: WorkerNode, chunk_id: str, dest: Location) -> bytes:
        counted[chunk_id] += 1
        return await read(node, chunk_id, dest)

    monkeypatch.setattr(node_registry.client, "read", counting)
    return counted


def small_files(count: int, prefix: str = "f", size: int = 1024) -> dict[str, bytes]:
    """count files of size bytes, each different, under a few directories."""
    return {f"{prefix}/{i % 7}/{i:05d}.bin": i.to_bytes(4, "big") * (size // 4)
            for i in range(count)}


def partials(root: Path) -> list[Path]:
    """Temp files a restore left under root."""
    return [p for p in root.rglob("*") if p.name.endswith((".partial", ".link"))]


def assert_restored(dest: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert (dest / path).read_bytes() == data, path


# -- ChunkRecord.piece ---------------------------------------------------------------------


def record(at: int, size: int, chunk_id: str) -> ChunkRecord:
    return ChunkRecord("x", 0, 0, size, chunk_id, 0, "", "zstd", at)


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_every_member_of_a_pack_comes_back_with_its_own_id(members: list[bytes]) -> None:
    raw = b"".join(members)
    at = 0
    for data in members:
        piece, piece_id = record(at, len(data), sha(raw)).piece(raw)
        assert piece == data
        assert piece_id == sha(data)  # as ingestion lists a packed file in its digest
        at += len(data)
    assert record(0, len(raw), sha(raw)).piece(raw) == (raw, sha(raw))


def test_a_piece_past_the_end_of_its_chunk_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="too few"):
        record(10, 5, sha(b"0123456789ab")).piece(b"0123456789ab")


# -- the shared chunks ---------------------------------------------------------------------


async def test_a_shared_chunk_is_fetched_once_and_let_go_after_its_last_use() -> None:
    fetched: Counter[str] = Counter()

    async def fetch(chunk_id: str) -> bytes | None:
        fetched[chunk_id] += 1
        return chunk_id.encode()

    chunks = SharedChunks(fetch, Counter({"pack": 3, "alone": 1}))
    try:
        assert [await chunks.take("pack") for _ in range(3)] == [b"pack"] * 3
        assert await chunks.take("alone") == b"alone"
        assert fetched == {"pack": 1, "alone": 1}
        # Dropped with its last use: taking it again (nobody does) would fetch anew.
        await chunks.take("pack")
        assert fetched["pack"] == 2
    finally:
        await chunks.aclose()


async def test_a_failed_files_uses_are_given_up() -> None:
    fetched: Counter[str] = Counter()

    async def fetch(chunk_id: str) -> bytes | None:
        fetched[chunk_id] += 1
        return b"x"

    chunks = SharedChunks(fetch, Counter({"a": 2}))
    try:
        await chunks.prefetch(["a"])
        chunks.drop_rest([record(0, 1, "a")])  # one file failed before it took "a"
        await chunks.take("a")  # the last use: dropped
        await chunks.take("a")
        assert fetched["a"] == 2
    finally:
        await chunks.aclose()


# -- restoring packs -----------------------------------------------------------------------


async def test_packed_files_restore_byte_exact_from_one_read(
        node_registry: Cluster, manifest: Manifest, reads: Counter[str],
        tmp_path: Path) -> None:
    files = small_files(300)
    files["same/a.txt"] = files["same/b.txt"] = b"identical members\n"
    files["same/empty"] = b""  # a member of no bytes, in the middle of the pack
    files["zz-last.bin"] = os.urandom(3000)  # the pack's last bytes
    manifest.begin_batch("packs", "/src", "aws")
    pack = await add_pack(node_registry, manifest, "packs", files)
    manifest.add_files("packs", [FileEntry("empty-file", 0, 0, file_digest([]))])  # no chunk
    manifest.finish_batch("packs", "success")
    dest = tmp_path / "out"

    report = await BatchRestorer(node_registry, manifest).restore("packs", dest)

    assert_restored(dest, {**files, "empty-file": b""})
    assert report.files_restored == len(files) + 1
    assert report.bytes_restored == sum(len(data) for data in files.values())
    assert reads == {pack: 1}
    assert os.stat(dest / "same/a.txt").st_mtime_ns == MTIME
    assert os.stat(dest / "same/a.txt").st_mode & 0o777 == 0o640
    assert partials(dest) == []


async def test_a_chunk_files_share_is_read_once(node_registry: Cluster, manifest: Manifest,
                                                reads: Counter[str], tmp_path: Path) -> None:
    """Identical content (not packed) has one chunk: both files come from one read."""
    data = os.urandom(5000)
    manifest.begin_batch("twins", "/src", "aws")
    first = await add_plain(node_registry, manifest, "twins", "one.bin", data)
    await add_plain(node_registry, manifest, "twins", "two.bin", data)
    manifest.finish_batch("twins", "success")

    await BatchRestorer(node_registry, manifest).restore("twins", tmp_path / "out")

    assert_restored(tmp_path / "out", {"one.bin": data, "two.bin": data})
    assert reads == {first: 1}


async def test_one_file_out_of_a_pack_reads_only_its_pack(
        node_registry: Cluster, manifest: Manifest, reads: Counter[str],
        tmp_path: Path) -> None:
    first, second = small_files(20, "a"), small_files(20, "b")
    manifest.begin_batch("two-packs", "/src", "aws")
    await add_pack(node_registry, manifest, "two-packs", first)
    wanted = await add_pack(node_registry, manifest, "two-packs", second)
    manifest.finish_batch("two-packs", "success")
    path = sorted(second)[7]
    restorer = BatchRestorer(node_registry, manifest)

    report = await restorer.restore("two-packs", tmp_path / "out", paths=[path])

    assert report.files_restored == 1
    assert_restored(tmp_path / "out", {path: second[path]})
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == [tmp_path / "out" / path]
    assert reads == {wanted: 1}
    with pytest.raises(RestoreError, match="has no file 'nowhere'"):
        await restorer.restore("two-packs", tmp_path / "out", paths=["nowhere"])


async def test_a_corrupt_replica_of_a_pack_falls_over_to_another(
        node_registry: Cluster, manifest: Manifest, reads: Counter[str],
        tmp_path: Path) -> None:
    files = small_files(50)
    manifest.begin_batch("rot", "/src", "aws")
    pack = await add_pack(node_registry, manifest, "rot", files)
    manifest.finish_batch("rot", "success")
    await node_registry.faults.corrupt("aws-node-1", pack)  # the nearest replica, read first

    report = await BatchRestorer(node_registry, manifest).restore("rot", tmp_path / "out")

    assert_restored(tmp_path / "out", files)
    assert [(p.node_id, p.problem) for p in report.skipped_replicas] == [
        ("aws-node-1", "corrupt")]
    assert reads == {pack: 2}  # the corrupt replica, then a good one: once for all 50 files


async def test_a_digest_mismatch_fails_only_that_file(node_registry: Cluster,
                                                      manifest: Manifest,
                                                      tmp_path: Path) -> None:
    files = small_files(30)
    bad = sorted(files)[11]
    manifest.begin_batch("one-bad", "/src", "aws")
    await add_pack(node_registry, manifest, "one-bad", files)
    manifest.add_files("one-bad", [FileEntry(bad, 1024, 1, file_digest([sha(b"other")]))])
    manifest.finish_batch("one-bad", "success")
    dest = tmp_path / "out"

    with pytest.raises(RestoreError, match=rf"1 file\(s\) .* {bad}: its chunks do not match"):
        await BatchRestorer(node_registry, manifest).restore("one-bad", dest)

    assert not (dest / bad).exists()
    assert_restored(dest, {p: d for p, d in files.items() if p != bad})
    assert partials(dest) == []


async def test_a_file_that_cannot_be_placed_leaves_no_temp_file(
        node_registry: Cluster, manifest: Manifest, tmp_path: Path) -> None:
    files = small_files(30)
    blocked = sorted(files)[3]
    manifest.begin_batch("blocked", "/src", "aws")
    await add_pack(node_registry, manifest, "blocked", files)
    manifest.finish_batch("blocked", "success")
    dest = tmp_path / "out"
    (dest / blocked).mkdir(parents=True)  # a directory where the file goes

    with pytest.raises(RestoreError, match=rf"1 file\(s\) .*{blocked}"):
        await BatchRestorer(node_registry, manifest).restore("blocked", dest)

    assert (dest / blocked).is_dir()
    assert_restored(dest, {p: d for p, d in files.items() if p != blocked})
    assert partials(dest) == []


async def test_a_restore_cancelled_during_group_commit_leaves_no_temp_file(
        node_registry: Cluster, manifest: Manifest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    files = small_files(200)
    manifest.begin_batch("stop", "/src", "aws")
    await add_pack(node_registry, manifest, "stop", files)
    manifest.finish_batch("stop", "success")
    dest = tmp_path / "out"
    # Freeze the group between writing its temp files and making them durable.
    syncing, go_on = threading.Event(), threading.Event()
    sync = restore_files._sync

    def held(fds: list[int]) -> None:
        syncing.set()
        go_on.wait()
        sync(fds)

    monkeypatch.setattr(restore_files, "_sync", held)
    task = asyncio.create_task(BatchRestorer(node_registry, manifest).restore("stop", dest))
    await asyncio.to_thread(syncing.wait)
    assert len(partials(dest)) == len(files)  # all written, none in place yet

    task.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert partials(dest) == []
    for path in dest.rglob("*"):  # what did get in place (if any) is whole
        if path.is_file():
            assert path.read_bytes() == files[path.relative_to(dest).as_posix()]


async def add_large(cluster: Cluster, manifest: Manifest, batch_id: str, path: str,
                    parts: list[bytes]) -> None:
    """Record a file of these chunks (over 8 MiB in all: written alone) and store them."""
    chunks, offset = [], 0
    for index, data in enumerate(parts):
        chunks.append(Chunk(chunk_id=sha(data), file=path, index=index, offset=offset,
                            size_bytes=len(data), source_cloud="aws"))
        offset += len(data)
    infos = [await store_chunk(cluster, c, d) for c, d in zip(chunks, parts, strict=True)]
    manifest.record_commits(batch_id, list(zip(chunks, infos, strict=True)),
                            [(c.chunk_id, n) for c in chunks for n in HOLDERS])
    manifest.add_files(batch_id, [FileEntry(path, offset, len(parts),
                                            file_digest([sha(d) for d in parts]), mode=0o600)])


LARGE_PART = restore_files.GROUP_FILE_BYTES // 2 + 1


async def test_a_large_file_shares_a_chunk_with_a_small_one(
        node_registry: Cluster, manifest: Manifest, reads: Counter[str],
        tmp_path: Path) -> None:
    """Over 8 MiB a file is written chunk by chunk on its own; a chunk it shares with a
    small file is still read once."""
    head, tail = os.urandom(LARGE_PART), os.urandom(LARGE_PART)
    manifest.begin_batch("mixed", "/src", "aws")
    await add_large(node_registry, manifest, "mixed", "large.bin", [head, tail])
    await add_plain(node_registry, manifest, "mixed", "small-copy.bin", tail)
    manifest.finish_batch("mixed", "success")
    dest = tmp_path / "out"

    await BatchRestorer(node_registry, manifest).restore("mixed", dest)

    assert_restored(dest, {"large.bin": head + tail, "small-copy.bin": tail})
    assert os.stat(dest / "large.bin").st_mode & 0o777 == 0o600
    assert reads == {sha(head): 1, sha(tail): 1}


async def test_a_restore_cancelled_during_a_large_file_leaves_no_temp_file(
        node_registry: Cluster, manifest: Manifest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    head, tail = os.urandom(LARGE_PART), os.urandom(LARGE_PART)
    manifest.begin_batch("stop-large", "/src", "aws")
    await add_large(node_registry, manifest, "stop-large", "large.bin", [head, tail])
    manifest.finish_batch("stop-large", "success")
    dest = tmp_path / "out"
    reading, never = asyncio.Event(), asyncio.Event()
    read = node_registry.client.read

    async def held(node: WorkerNode, chunk_id: str, dest: Location) -> bytes:
        if chunk_id == sha(tail):  # the first chunk is written; the second never comes
            reading.set()
            await never.wait()
        return await read(node, chunk_id, dest)

    monkeypatch.setattr(node_registry.client, "read", held)
    task = asyncio.create_task(BatchRestorer(node_registry, manifest).restore("stop-large",
                                                                              dest))
    await reading.wait()
    assert len(partials(dest)) == 1

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert partials(dest) == []
    assert not (dest / "large.bin").exists()


async def test_a_pack_restores_to_a_store_from_one_read(
        node_registry: Cluster, manifest: Manifest, reads: Counter[str]) -> None:
    files = small_files(40)
    manifest.begin_batch("to-store", "/src", "aws")
    pack = await add_pack(node_registry, manifest, "to-store", files)
    manifest.finish_batch("to-store", "success")
    store = open_store(f"memory://restore-{uuid.uuid4().hex[:8]}/out/")

    report = await BatchRestorer(node_registry, manifest).restore_to_store("to-store", store)

    assert report.files_restored == len(files)
    assert {path: bytes(store.get(path)) for path in files} == files
    assert reads == {pack: 1}


# -- through the pipeline ------------------------------------------------------------------


async def test_small_files_packed_by_a_run_restore_byte_exact(
        orchestrator: PipelineOrchestrator, config: PipelineConfig, reads: Counter[str],
        tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = small_files(500, size=700)
    files["dup-1.txt"] = files["dup-2.txt"] = b"the same small file\n"
    files["big.bin"] = os.urandom(3 * config.ingestion.chunk_size_bytes + 5)
    files["empty"] = b""
    for path, data in files.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_bytes(data)
    result = await orchestrator.run_pipeline({"batch_id": "packed", "data_source": str(source)})
    assert result.status == "success", result.error
    manifest = orchestrator.storage_manager.manifest
    assert len(manifest.chunk_ids("packed")) < len(files) // 10  # packed: not one a file

    report = await orchestrator.restore_batch("packed", tmp_path / "out")
    verify = await orchestrator.verify_batch("packed")

    assert report.files_restored == len(files)
    assert_restored(tmp_path / "out", files)
    assert set(reads.values()) == {1}
    assert set(reads) == set(manifest.chunk_ids("packed"))
    assert verify.ok, verify.problems[:3]

