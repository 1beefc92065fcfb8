"""Tests for the SQLite manifest: round trips, re-runs, dedup, errors and concurrency."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from multicloud.core.errors import StorageError, UnknownBatch
from multicloud.core.types import BlobInfo, Chunk, FileEntry
from multicloud.pipeline.manifest import SCHEMA_VERSION, BatchRecord, ChunkRecord, Manifest


def cid(data: bytes) -> str:
    """The chunk id of ``data``."""
    return hashlib.sha256(data).hexdigest()


def chunk(data: bytes, file: str, index: int, offset: int = 0) -> tuple[Chunk, BlobInfo]:
    """A chunk of ``file`` and the blob it was stored as (blob 2 bytes bigger than raw)."""
    h = cid(data)
    return (
        Chunk(
            chunk_id=h, file=file, index=index, offset=offset, size_bytes=len(data),
            source_cloud="aws",
        ),
        BlobInfo(
            chunk_id=h, raw_size=len(data), blob_size=len(data) + 2,
            blob_checksum=h[:32], codec="zstd",
        ),
    )


def entry(path: str, *chunks: tuple[Chunk, BlobInfo]) -> FileEntry:
    """The FileEntry for a file made of ``chunks``."""
    ids = "".join(c.chunk_id for c, _ in chunks)
    return FileEntry(
        path=path,
        size=sum(c.size_bytes for c, _ in chunks),
        chunk_count=len(chunks),
        digest=hashlib.sha256(ids.encode()).hexdigest(),
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where the manifest lives, in a directory that does not exist yet."""
    return tmp_path / "data" / "manifest.db"


@pytest.fixture
def manifest(db: Path) -> Iterator[Manifest]:
    """A fresh manifest, closed after the test."""
    m = Manifest(db)
    yield m
    m.close()


def test_new_manifest_creates_directory_schema_and_wal(db: Path) -> None:
    with Manifest(db) as m:
        assert m.batches() == []
    assert db.exists()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "replicas_by_node" in indexes
    finally:
        conn.close()


def test_round_trip_of_every_method(manifest: Manifest) -> None:
    a0 = chunk(b"alpha-0", "a.txt", 0)
    a1 = chunk(b"alpha-1", "a.txt", 1, offset=7)
    b0 = chunk(b"beta", "dir/b.csv", 0)
    files = [entry("dir/b.csv", b0), entry("a.txt", a0, a1), FileEntry("empty", 0, 0, cid(b""))]

    manifest.begin_batch("b1", "/src", "aws")
    running = manifest.batch("b1")
    assert running.status == "running"
    assert (running.source, running.source_cloud) == ("/src", "aws")
    assert running.finished_at is None
    assert running.result is None

    manifest.add_files("b1", files)
    manifest.add_chunks("b1", [b0, a1, a0])
    manifest.add_replicas([(a0[0].chunk_id, "n2"), (a0[0].chunk_id, "n1"), (b0[0].chunk_id, "n3")])
    manifest.finish_batch("b1", "success", {"files": 3, "metrics": {"x": [1.5, None]}})

    done = manifest.batch("b1")
    assert done.status == "success"
    assert done.result == {"files": 3, "metrics": {"x": [1.5, None]}}
    assert done.finished_at is not None
    assert done.finished_at >= done.created_at
    assert manifest.batches() == [done]

    assert manifest.files("b1") == sorted(files, key=lambda f: f.path)
    assert manifest.chunks("b1") == [
        ChunkRecord("a.txt", 0, 0, 7, a0[0].chunk_id, 9, a0[1].blob_checksum, "zstd", 0, 7),
        ChunkRecord("a.txt", 1, 7, 7, a1[0].chunk_id, 9, a1[1].blob_checksum, "zstd", 0, 7),
        ChunkRecord("dir/b.csv", 0, 0, 4, b0[0].chunk_id, 6, b0[1].blob_checksum, "zstd", 0,
                    4),
    ]
    assert manifest.chunk_ids("b1") == sorted(c.chunk_id for c, _ in (a0, a1, b0))
    assert manifest.blob(a1[0].chunk_id) == a1[1]
    assert manifest.blob(cid(b"never stored")) is None

    assert manifest.replicas([a0[0].chunk_id]) == {a0[0].chunk_id: ["n1", "n2"]}
    assert manifest.replicas() == {
        a0[0].chunk_id: ["n1", "n2"],
        a1[0].chunk_id: [],  # stored, but every replica is gone: repair must see it
        b0[0].chunk_id: ["n3"],
    }
    assert manifest.chunks_on_node("n1") == [a0[0].chunk_id]
    assert manifest.chunks_on_node("nobody") == []

    manifest.remove_replicas([(a0[0].chunk_id, "n1"), (a0[0].chunk_id, "not-there")])
    assert manifest.replicas([a0[0].chunk_id, a1[0].chunk_id]) == {
        a0[0].chunk_id: ["n2"],
        a1[0].chunk_id: [],
    }


def test_a_new_instance_sees_committed_data(db: Path) -> None:
    c = chunk(b"persisted", "f", 0)
    with Manifest(db) as writer:
        writer.begin_batch("b1", "s3://bucket/x", "aws")
        writer.add_files("b1", [entry("f", c)])
        writer.add_chunks("b1", [c])
        writer.add_replicas([(c[0].chunk_id, "n1")])
        writer.finish_batch("b1", "failed", {"error": "boom"})

    with Manifest(db) as reader:
        assert reader.batch("b1").status == "failed"
        assert reader.batch("b1").result == {"error": "boom"}
        assert reader.files("b1") == [entry("f", c)]
        assert reader.blob(c[0].chunk_id) == c[1]
        assert reader.replicas() == {c[0].chunk_id: ["n1"]}


def test_two_open_instances_see_each_others_commits(db: Path) -> None:
    with Manifest(db) as run, Manifest(db) as dashboard:
        run.begin_batch("b1", "/src", "gcp")
        assert [b.batch_id for b in dashboard.batches()] == ["b1"]
        dashboard.add_replicas([(cid(b"x"), "n9")])
        assert run.chunks_on_node("n9") == [cid(b"x")]


def test_another_process_reads_what_this_one_wrote(db: Path) -> None:
    c = chunk(b"cross-process", "f", 0)
    with Manifest(db) as m:
        m.begin_batch("b1", "/src", "aws")
        m.add_chunks("b1", [c])
        m.add_replicas([(c[0].chunk_id, "n1"), (c[0].chunk_id, "n2")])
        m.finish_batch("b1", "success")
    script = (
        "import sys\n"
        "from multicloud.pipeline.manifest import Manifest\n"
        "with Manifest(sys.argv[1]) as m:\n"
        "    print(m.batch('b1').status, ','.join(m.replicas()[sys.argv[2]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(db), c[0].chunk_id],
        check=True, capture_output=True, text=True, timeout=60,
    )
    assert out.stdout.split() == ["success", "n1,n2"]


def test_rerunning_a_batch_replaces_its_files_but_keeps_shared_data(manifest: Manifest) -> None:
    old = chunk(b"old", "old.txt", 0)
    new = chunk(b"new", "new.txt", 0)
    manifest.begin_batch("b1", "/src", "aws")
    manifest.add_files("b1", [entry("old.txt", old)])
    manifest.add_chunks("b1", [old])
    manifest.add_replicas([(old[0].chunk_id, "n1")])
    manifest.finish_batch("b1", "failed", {"error": "boom"})

    manifest.begin_batch("b1", "/src2", "gcp")
    rerun = manifest.batch("b1")
    assert (rerun.status, rerun.source, rerun.source_cloud) == ("running", "/src2", "gcp")
    assert rerun.finished_at is None
    assert rerun.result is None
    assert manifest.files("b1") == []
    assert manifest.chunks("b1") == []

    manifest.add_files("b1", [entry("new.txt", new)])
    manifest.add_chunks("b1", [new])
    assert [f.path for f in manifest.files("b1")] == ["new.txt"]
    assert manifest.chunk_ids("b1") == [new[0].chunk_id]
    # Blobs and replicas are shared across batches, so a re-run leaves them alone.
    assert manifest.blob(old[0].chunk_id) == old[1]
    assert manifest.replicas([old[0].chunk_id]) == {old[0].chunk_id: ["n1"]}
    assert len(manifest.batches()) == 1


def test_rerunning_does_not_touch_other_batches(manifest: Manifest) -> None:
    c = chunk(b"kept", "k", 0)
    manifest.begin_batch("keep", "/src", "aws")
    manifest.add_files("keep", [entry("k", c)])
    manifest.add_chunks("keep", [c])
    manifest.begin_batch("redo", "/src", "aws")
    manifest.begin_batch("redo", "/src", "aws")
    assert manifest.files("keep") == [entry("k", c)]
    assert manifest.chunk_ids("keep") == [c[0].chunk_id]


def test_batches_are_newest_first_and_a_rerun_becomes_newest(manifest: Manifest) -> None:
    for batch_id in ("first", "second", "third"):
        manifest.begin_batch(batch_id, "/src", "aws")
    assert [b.batch_id for b in manifest.batches()] == ["third", "second", "first"]
    manifest.begin_batch("first", "/src", "aws")
    assert [b.batch_id for b in manifest.batches()] == ["first", "third", "second"]
    assert all(isinstance(b, BatchRecord) for b in manifest.batches())


def test_dedup_one_blob_for_a_chunk_in_two_files_and_batches(manifest: Manifest) -> None:
    shared = b"same bytes everywhere"
    in_a = chunk(shared, "a.txt", 0)
    in_b = chunk(shared, "b.txt", 3, offset=300)
    h = in_a[0].chunk_id
    manifest.begin_batch("b1", "/src", "aws")
    manifest.add_chunks("b1", [in_a, in_b])
    manifest.begin_batch("b2", "/src", "aws")
    manifest.add_chunks("b2", [chunk(shared, "c.txt", 0)])
    manifest.add_replicas([(h, "n1"), (h, "n2"), (h, "n3")])

    assert [(r.path, r.index, r.offset) for r in manifest.chunks("b1")] == [
        ("a.txt", 0, 0),
        ("b.txt", 3, 300),
    ]
    assert manifest.chunk_ids("b1") == [h]
    assert manifest.chunk_ids("b2") == [h]
    assert manifest.replicas() == {h: ["n1", "n2", "n3"]}
    # One blob, one replica per node: usage is not double-counted per reference.
    assert manifest.node_usage() == {n: (1, len(shared) + 2) for n in ("n1", "n2", "n3")}


def test_add_replicas_is_idempotent(manifest: Manifest) -> None:
    pairs = [(cid(b"x"), "n1"), (cid(b"x"), "n1"), (cid(b"y"), "n1")]
    manifest.add_replicas(pairs)
    manifest.add_replicas(pairs)
    manifest.add_replicas([])
    manifest.remove_replicas([])
    assert manifest.chunks_on_node("n1") == sorted([cid(b"x"), cid(b"y")])
    assert manifest.node_usage() == {"n1": (2, 0)}  # no blobs recorded yet: 0 bytes


def test_node_usage_sums_count_and_blob_bytes(manifest: Manifest) -> None:
    small = chunk(b"s" * 10, "f", 0)
    big = chunk(b"b" * 1000, "f", 1, offset=10)
    manifest.begin_batch("b1", "/src", "aws")
    manifest.add_chunks("b1", [small, big])
    s, b = small[0].chunk_id, big[0].chunk_id
    manifest.add_replicas([(s, "n1"), (b, "n1"), (s, "n2"), (b, "n3")])
    assert manifest.node_usage() == {
        "n1": (2, 12 + 1002),
        "n2": (1, 12),
        "n3": (1, 1002),
    }
    manifest.remove_replicas([(b, "n1")])
    assert manifest.node_usage()["n1"] == (1, 12)


def test_replicas_of_many_ids_spans_parameter_batches(manifest: Manifest) -> None:
    ids = [cid(str(i).encode()) for i in range(1_200)]
    manifest.add_replicas([(h, "n1") for h in ids])
    found = manifest.replicas([*ids, cid(b"missing")])
    assert len(found) == 1_201
    assert all(found[h] == ["n1"] for h in ids)
    assert found[cid(b"missing")] == []


def test_unknown_batch_names_the_known_ones(manifest: Manifest) -> None:
    with pytest.raises(UnknownBatch, match=r"none yet; run `multicloud run` first"):
        manifest.batch("nope")
    manifest.begin_batch("a", "/src", "aws")
    manifest.begin_batch("b", "/src", "aws")
    with pytest.raises(UnknownBatch) as info:
        manifest.batch("x")
    assert str(info.value) == "unknown batch 'x': known batches: b, a"
    assert isinstance(info.value, StorageError)


@pytest.mark.parametrize("method", ["files", "chunks", "chunk_ids"])
def test_reads_of_an_unknown_batch_raise(manifest: Manifest, method: str) -> None:
    manifest.begin_batch("real", "/src", "aws")
    with pytest.raises(UnknownBatch, match="known batches: real"):
        getattr(manifest, method)("ghost")


def test_writes_to_an_unknown_batch_raise_and_write_nothing(manifest: Manifest) -> None:
    c = chunk(b"orphan", "f", 0)
    with pytest.raises(UnknownBatch):
        manifest.add_chunks("ghost", [c])
    with pytest.raises(UnknownBatch):
        manifest.add_files("ghost", [entry("f", c)])
    with pytest.raises(UnknownBatch):
        manifest.finish_batch("ghost", "success")
    assert manifest.blob(c[0].chunk_id) is None  # the transaction rolled back


def test_long_known_batch_lists_are_cut_short(manifest: Manifest) -> None:
    for i in range(25):
        manifest.begin_batch(f"b{i:02d}", "/src", "aws")
    with pytest.raises(UnknownBatch, match=r"known batches: b24, b23, .*, b05, \.\.\. and 5 more$"):
        manifest.batch("x")


def test_finish_batch_rejects_bad_status_and_unserialisable_results(manifest: Manifest) -> None:
    manifest.begin_batch("b1", "/src", "aws")
    with pytest.raises(StorageError, match=r"status 'done'.*success, failed"):
        manifest.finish_batch("b1", "done")
    with pytest.raises(StorageError, match="not JSON-serialisable"):
        manifest.finish_batch("b1", "success", {"when": object()})
    assert manifest.batch("b1").status == "running"


def test_add_chunks_rejects_a_blob_of_another_chunk(manifest: Manifest) -> None:
    manifest.begin_batch("b1", "/src", "aws")
    c, _ = chunk(b"one", "f", 0)
    _, other_blob = chunk(b"two", "f", 0)
    with pytest.raises(StorageError, match="pair each chunk with its own BlobInfo"):
        manifest.add_chunks("b1", [(c, other_blob)])


def test_concurrent_add_replicas_from_eight_threads(manifest: Manifest) -> None:
    ids = [cid(str(i).encode()) for i in range(50)]
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait(timeout=30)
            for h in ids:
                # Each thread writes its own node plus a shared one, so inserts also collide.
                manifest.add_replicas([(h, f"n{n}"), (h, "shared")])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    expected = sorted([*(f"n{n}" for n in range(8)), "shared"])
    assert manifest.replicas(ids) == dict.fromkeys(ids, expected)
    assert manifest.node_usage() == dict.fromkeys(expected, (50, 0))


def test_closed_manifest_refuses_calls(db: Path) -> None:
    m = Manifest(db)
    m.close()
    m.close()
    with pytest.raises(StorageError, match="is closed"):
        m.batches()


def test_a_file_that_is_not_a_manifest_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "manifest.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="manifest"):
        Manifest(bogus)


def test_a_newer_schema_is_refused(db: Path) -> None:
    Manifest(db).close()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Manifest(db)
