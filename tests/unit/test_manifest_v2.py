"""The durable manifest (schema v2): batch leases and immutability, hints, what gc may not
take, the v1 upgrade, names that are not UTF-8, and the export/import round trip."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multicloud.core.errors import BatchExists, BatchLeased, StorageError, UnknownBatch
from multicloud.core.types import BlobInfo, Chunk, FileEntry
from multicloud.pipeline.lease import this_owner
from multicloud.pipeline.manifest import SCHEMA_VERSION, Manifest

FP = "fingerprint-1"
OTHER_FP = "fingerprint-2"


def cid(data: bytes) -> str:
    """The chunk id of ``data``."""
    return hashlib.sha256(data).hexdigest()


def piece(data: bytes, file: str, index: int = 0, offset: int = 0) -> tuple[Chunk, BlobInfo]:
    """A chunk of ``file`` and the blob it was stored as."""
    h = cid(data)
    return (Chunk(chunk_id=h, file=file, index=index, offset=offset, size_bytes=len(data),
                  source_cloud="aws"),
            BlobInfo(chunk_id=h, raw_size=len(data), blob_size=len(data) + 7,
                     blob_checksum=h[:32], codec="zstd"))


def file_of(path: str, *pieces: tuple[Chunk, BlobInfo], **extra: Any) -> FileEntry:
    """The FileEntry of a file made of ``pieces``."""
    ids = "".join(c.chunk_id for c, _ in pieces)
    return FileEntry(path=path, size=sum(c.size_bytes for c, _ in pieces),
                     chunk_count=len(pieces), digest=hashlib.sha256(ids.encode()).hexdigest(),
                     **extra)


def stored(m: Manifest, batch_id: str, data: bytes = b"hello", *, fingerprint: str = FP,
           owner: str = "", status: str | None = "success") -> str:
    """Begin a batch with one single-chunk file, optionally finish it; the chunk id."""
    m.begin_batch(batch_id, f"/src/{batch_id}", "aws", fingerprint=fingerprint, owner=owner)
    part = piece(data, "a.txt")
    m.add_chunks(batch_id, [part])
    m.add_files(batch_id, [file_of("a.txt", part)])
    m.add_replicas([(part[0].chunk_id, "aws-node-1"), (part[0].chunk_id, "gcp-node-1")])
    if status is not None:
        m.finish_batch(batch_id, status, {"status": status})
    return part[0].chunk_id


def owner_with_pid(pid: int) -> str:
    """An owner string of this host and boot for another process."""
    host, _, boot = this_owner().rsplit(":", 2)
    return f"{host}:{pid}:{boot}"


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[Manifest]:
    """A fresh manifest, closed after the test."""
    m = Manifest(tmp_path / "manifest.db")
    yield m
    m.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of this host whose pid a forged owner can name; killed after."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


# -- begin_batch ------------------------------------------------------------------------


def test_an_unknown_batch_is_new_and_holds_the_lease(manifest: Manifest) -> None:
    owner = this_owner()
    assert manifest.begin_batch("b", "/src", "aws", fingerprint=FP, owner=owner) == "new"
    record = manifest.batch("b")
    assert (record.status, record.fingerprint, record.owner) == ("running", FP, owner)
    assert record.heartbeat_at is not None
    assert record.finished_at is None
    assert record.manifest_object is None
    assert record.lease_live


def test_the_same_content_after_success_is_done(manifest: Manifest) -> None:
    chunk_id = stored(manifest, "b")
    assert manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP) == "done"
    # "done" changes nothing: the batch is still complete with its chunks.
    assert manifest.batch("b").status == "success"
    assert manifest.chunk_ids("b") == [chunk_id]


def test_other_content_after_success_is_refused_naming_replace(manifest: Manifest) -> None:
    stored(manifest, "b")
    with pytest.raises(BatchExists, match="--replace") as caught:
        manifest.begin_batch("b", "/elsewhere", "aws", fingerprint=OTHER_FP)
    assert "'b'" in str(caught.value)
    assert manifest.batch("b").status == "success"
    assert len(manifest.chunks("b")) == 1


def test_an_empty_fingerprint_never_counts_as_the_same_content(manifest: Manifest) -> None:
    stored(manifest, "b", fingerprint="")
    with pytest.raises(BatchExists):
        manifest.begin_batch("b", "/src/b", "aws", fingerprint="")


def test_replace_runs_a_completed_batch_anew_dropping_its_refs(manifest: Manifest) -> None:
    chunk_id = stored(manifest, "b")
    mode = manifest.begin_batch("b", "/new", "gcp", fingerprint=OTHER_FP, replace=True)
    assert mode == "new"
    record = manifest.batch("b")
    assert (record.status, record.source, record.source_cloud, record.fingerprint) == (
        "running", "/new", "gcp", OTHER_FP)
    assert record.result is None
    assert record.finished_at is None
    assert manifest.files("b") == []
    assert manifest.chunks("b") == []
    # Blobs and replicas are shared: they stay for the new run (or gc).
    assert manifest.blob(chunk_id) is not None
    assert manifest.replicas([chunk_id]) == {chunk_id: ["aws-node-1", "gcp-node-1"]}


def test_replace_with_the_same_content_runs_anew_too(manifest: Manifest) -> None:
    stored(manifest, "b")
    assert manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP, replace=True) == "new"
    assert manifest.chunks("b") == []


def test_a_run_held_by_a_live_process_is_leased_then_resumes_once_it_dies(
        manifest: Manifest, sleeper: subprocess.Popen[bytes]) -> None:
    owner = owner_with_pid(sleeper.pid)
    chunk_id = stored(manifest, "b", owner=owner, status=None)
    assert manifest.batch("b").lease_live
    assert manifest.batch("b").state == "running"
    with pytest.raises(BatchLeased, match=f"pid {sleeper.pid}\\b") as caught:
        manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP, owner=this_owner())
    assert "--batch-id" in str(caught.value)
    # Nor may another content, or --replace, take it from a live holder.
    with pytest.raises(BatchLeased):
        manifest.begin_batch("b", "/x", "aws", fingerprint=OTHER_FP, replace=True)
    assert manifest.batch("b").owner == owner

    sleeper.kill()
    sleeper.wait(timeout=30)  # reaped: the pid no longer exists
    assert not manifest.batch("b").lease_live
    assert manifest.batch("b").state == "stopped"  # what `batches` and `verify` show
    assert manifest.batch("b").status == "running"
    me = this_owner()
    assert manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP, owner=me) == "resume"
    assert manifest.chunk_ids("b") == [chunk_id]
    assert [f.path for f in manifest.files("b")] == ["a.txt"]
    assert manifest.batch("b").owner == me


def test_the_holder_itself_may_begin_its_batch_again(manifest: Manifest) -> None:
    me = this_owner()
    chunk_id = stored(manifest, "b", owner=me, status=None)
    assert manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP, owner=me) == "resume"
    assert manifest.chunk_ids("b") == [chunk_id]


def test_a_dead_run_with_other_content_starts_anew(manifest: Manifest,
                                                   sleeper: subprocess.Popen[bytes]) -> None:
    stored(manifest, "b", owner=owner_with_pid(sleeper.pid), status=None)
    sleeper.kill()
    sleeper.wait(timeout=30)
    assert manifest.begin_batch("b", "/x", "aws", fingerprint=OTHER_FP) == "new"
    assert manifest.chunks("b") == []


def test_an_interrupted_batch_resumes_with_its_chunks(manifest: Manifest) -> None:
    chunk_id = stored(manifest, "b", owner=this_owner(), status="interrupted")
    record = manifest.batch("b")
    assert (record.status, record.owner) == ("interrupted", "")  # the lease is released
    assert record.result == {"status": "interrupted"}
    assert not record.lease_live
    assert manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP) == "resume"
    assert manifest.batch("b").status == "running"
    assert manifest.chunk_ids("b") == [chunk_id]


def test_a_failed_batch_resumes_for_the_same_content(manifest: Manifest) -> None:
    chunk_id = stored(manifest, "b", status="failed")
    assert manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP) == "resume"
    assert manifest.chunk_ids("b") == [chunk_id]


def test_a_failed_batch_with_other_content_is_new_and_drops_refs(manifest: Manifest) -> None:
    chunk_id = stored(manifest, "b", status="failed")
    assert manifest.begin_batch("b", "/other", "aws", fingerprint=OTHER_FP) == "new"
    assert manifest.files("b") == []
    assert manifest.chunks("b") == []
    assert manifest.batch("b").fingerprint == OTHER_FP
    assert manifest.blob(chunk_id) is not None  # shared rows stay


def test_finish_batch_refuses_an_unknown_status(manifest: Manifest) -> None:
    stored(manifest, "b", status=None)
    with pytest.raises(StorageError, match="interrupted"):
        manifest.finish_batch("b", "done")


# -- the lease ----------------------------------------------------------------------------


def _set_heartbeat(db: Path, batch_id: str, at: float) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE batches SET heartbeat_at = ? WHERE batch_id = ?", (at, batch_id))
    finally:
        conn.close()


def test_renew_lease_keeps_a_remote_holder_alive(manifest: Manifest) -> None:
    remote = "some-other-host:4242:cafebabe"  # a pid there cannot be checked: heartbeats
    manifest.begin_batch("b", "/src", "aws", fingerprint=FP, owner=remote)
    assert manifest.batch("b").lease_live
    _set_heartbeat(manifest.path, "b", 1000.0)  # a holder that stopped renewing long ago
    assert not manifest.batch("b").lease_live

    manifest.renew_lease("b", "not-the-holder:1:x")  # only the holder renews
    assert manifest.batch("b").heartbeat_at == 1000.0

    manifest.renew_lease("b", remote)
    record = manifest.batch("b")
    assert record.heartbeat_at is not None
    assert record.heartbeat_at > 1000.0
    assert record.lease_live
    with pytest.raises(BatchLeased, match="some-other-host"):
        manifest.begin_batch("b", "/src", "aws", fingerprint=FP, owner=this_owner())


def test_a_remote_holder_that_stopped_renewing_can_be_taken_over(manifest: Manifest) -> None:
    chunk_id = stored(manifest, "b", owner="some-other-host:4242:cafebabe", status=None)
    _set_heartbeat(manifest.path, "b", 1000.0)
    assert manifest.begin_batch("b", "/src/b", "aws", fingerprint=FP,
                                owner=this_owner()) == "resume"
    assert manifest.chunk_ids("b") == [chunk_id]


# -- delete_batch -------------------------------------------------------------------------


def test_delete_batch_forgets_the_batch_but_keeps_shared_rows(manifest: Manifest) -> None:
    chunk_id = stored(manifest, "b")
    stored(manifest, "keep", data=b"other")
    record = manifest.delete_batch("b")
    assert (record.batch_id, record.status) == ("b", "success")
    with pytest.raises(UnknownBatch, match="keep"):
        manifest.batch("b")
    assert [b.batch_id for b in manifest.batches()] == ["keep"]
    assert manifest.blob(chunk_id) is not None  # gc's to free
    # The id is free again: it starts anew.
    assert manifest.begin_batch("b", "/src", "aws", fingerprint=OTHER_FP) == "new"


def test_delete_batch_is_refused_while_a_live_run_holds_it(
        manifest: Manifest, sleeper: subprocess.Popen[bytes]) -> None:
    stored(manifest, "b", owner=owner_with_pid(sleeper.pid), status=None)
    with pytest.raises(BatchLeased, match=f"pid {sleeper.pid}\\b"):
        manifest.delete_batch("b")
    assert manifest.batch("b").status == "running"
    sleeper.kill()
    sleeper.wait(timeout=30)
    assert manifest.delete_batch("b").status == "running"
    assert manifest.batches() == []


def test_delete_batch_of_an_unknown_id(manifest: Manifest) -> None:
    with pytest.raises(UnknownBatch, match="none yet"):
        manifest.delete_batch("nope")


# -- hints --------------------------------------------------------------------------------


def test_hints_round_trip(manifest: Manifest) -> None:
    a, b = cid(b"a"), cid(b"b")
    assert manifest.hints() == {}
    manifest.add_hints([])
    manifest.add_hints([(b, "gcp-node-2"), (a, "aws-node-3"), (a, "*"), (a, "aws-node-3")])
    assert manifest.hints() == {a: ["*", "aws-node-3"], b: ["gcp-node-2"]}
    manifest.remove_hints([(a, "*"), (b, "not-hinted")])
    manifest.remove_hints([])
    assert manifest.hints() == {a: ["aws-node-3"], b: ["gcp-node-2"]}
    manifest.remove_hints([(a, "aws-node-3"), (b, "gcp-node-2")])
    assert manifest.hints() == {}


def test_hints_survive_a_reopen(tmp_path: Path) -> None:
    a = cid(b"a")
    with Manifest(tmp_path / "m.db") as m:
        m.add_hints([(a, "*")])
    with Manifest(tmp_path / "m.db") as m:
        assert m.hints() == {a: ["*"]}


# -- what gc may not take -----------------------------------------------------------------


def test_referenced_chunk_ids_are_every_recorded_batch(
        manifest: Manifest, sleeper: subprocess.Popen[bytes]) -> None:
    # A batch that did not finish keeps its committed chunks: the same command resumes
    # from them, so gc must not take them; only `delete` lets them go.
    done = stored(manifest, "done", b"done")
    manifest.add_blob(BlobInfo(cid(b"manifest-of-done"), 10, 20, "c" * 32, "zstd"))
    manifest.set_manifest_object("done", cid(b"manifest-of-done"))
    live = stored(manifest, "live", b"live", owner=owner_with_pid(sleeper.pid), status=None)
    interrupted = stored(manifest, "interrupted", b"interrupted", status="interrupted")
    failed = stored(manifest, "failed", b"failed", status="failed")
    dead = stored(manifest, "dead", b"dead", owner="gone-host:1:x", status=None)
    _set_heartbeat(manifest.path, "dead", 1000.0)  # running, but its holder is gone
    everything = {done, cid(b"manifest-of-done"), live, interrupted, failed, dead}

    ids, live_run = manifest.referenced_chunk_ids()
    assert ids == everything
    assert live_run

    sleeper.kill()
    sleeper.wait(timeout=30)
    assert manifest.referenced_chunk_ids() == (everything, False)
    for batch_id in ("interrupted", "failed", "dead"):
        manifest.delete_batch(batch_id)
    assert manifest.referenced_chunk_ids() == ({done, cid(b"manifest-of-done"), live}, False)


def test_a_chunk_shared_with_an_interrupted_batch_stays_referenced(manifest: Manifest) -> None:
    shared = stored(manifest, "done", b"same")
    stored(manifest, "interrupted", b"same", status="interrupted")
    assert manifest.referenced_chunk_ids() == ({shared}, False)


def test_an_empty_manifest_references_nothing(manifest: Manifest) -> None:
    assert manifest.referenced_chunk_ids() == (set(), False)


def test_forget_chunks_drops_blob_replica_and_hint_rows(manifest: Manifest) -> None:
    gone = stored(manifest, "old", b"old")
    kept = stored(manifest, "new", b"new")
    manifest.add_hints([(gone, "gcp-node-3"), (kept, "gcp-node-3")])
    manifest.delete_batch("old")
    manifest.forget_chunks([gone, cid(b"never-known")])
    assert manifest.blob(gone) is None
    assert manifest.replicas([gone, kept]) == {gone: [], kept: ["aws-node-1", "gcp-node-1"]}
    assert manifest.hints() == {kept: ["gcp-node-3"]}
    assert gone not in manifest.replicas()
    assert manifest.node_usage() == {"aws-node-1": (1, 3 + 7), "gcp-node-1": (1, 3 + 7)}
    manifest.forget_chunks([])


# -- the v1 -> v2 upgrade -----------------------------------------------------------------

# The schema version 1 manifests were created with, as it was.
V1_SCHEMA = (
    "CREATE TABLE batches ("
    " batch_id TEXT PRIMARY KEY,"
    " status TEXT NOT NULL,"
    " source TEXT NOT NULL,"
    " source_cloud TEXT NOT NULL,"
    " created_at REAL NOT NULL,"
    " finished_at REAL,"
    " result TEXT,"
    " seq INTEGER NOT NULL)",
    "CREATE TABLE files ("
    " batch_id TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " size INTEGER NOT NULL,"
    " chunk_count INTEGER NOT NULL,"
    " digest TEXT NOT NULL,"
    " PRIMARY KEY (batch_id, path)) WITHOUT ROWID",
    "CREATE TABLE file_chunks ("
    " batch_id TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " idx INTEGER NOT NULL,"
    " offset INTEGER NOT NULL,"
    " size INTEGER NOT NULL,"
    " chunk_id TEXT NOT NULL,"
    " PRIMARY KEY (batch_id, path, idx)) WITHOUT ROWID",
    "CREATE TABLE blobs ("
    " chunk_id TEXT PRIMARY KEY,"
    " raw_size INTEGER NOT NULL,"
    " blob_size INTEGER NOT NULL,"
    " blob_checksum TEXT NOT NULL,"
    " codec TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE replicas ("
    " chunk_id TEXT NOT NULL,"
    " node_id TEXT NOT NULL,"
    " PRIMARY KEY (chunk_id, node_id)) WITHOUT ROWID",
    "CREATE INDEX replicas_by_node ON replicas (node_id, chunk_id)",
)


def make_v1(db: Path) -> str:
    """A version 1 manifest holding one successful batch of one file; its chunk id."""
    h = cid(b"v1 data")
    conn = sqlite3.connect(db)
    try:
        with conn:
            for statement in V1_SCHEMA:
                conn.execute(statement)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            conn.execute("INSERT INTO batches VALUES ('old', 'success', '/src', 'aws', 100.0,"
                         " 200.0, '{\"status\": \"success\"}', 1)")
            conn.execute("INSERT INTO files VALUES ('old', 'a.txt', 7, 1, 'd1')")
            conn.execute("INSERT INTO file_chunks VALUES ('old', 'a.txt', 0, 0, 7, ?)", (h,))
            conn.execute("INSERT INTO blobs VALUES (?, 7, 30, 'ck', 'zstd')", (h,))
            conn.execute("INSERT INTO replicas VALUES (?, 'aws-node-1')", (h,))
    finally:
        conn.close()
    return h


def columns(db: Path, table: str) -> dict[str, tuple[Any, ...]]:
    """Column name -> its PRAGMA table_info row."""
    conn = sqlite3.connect(db)
    try:
        return {row[1]: row for row in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


def test_a_v1_manifest_is_upgraded_on_open(tmp_path: Path) -> None:
    db = tmp_path / "manifest.db"
    h = make_v1(db)
    assert "fingerprint" not in columns(db, "batches")
    with Manifest(db) as m:
        record = m.batch("old")
        assert (record.status, record.source, record.created_at, record.finished_at) == (
            "success", "/src", 100.0, 200.0)
        assert record.result == {"status": "success"}
        assert (record.fingerprint, record.owner, record.heartbeat_at,
                record.manifest_object) == ("", "", None, None)
        assert m.files("old") == [FileEntry(path="a.txt", size=7, chunk_count=1, digest="d1",
                                            mode=0o644, mtime_ns=0, kind="file",
                                            link_target=None, quarantine=None)]
        assert [(c.path, c.chunk_id, c.blob_size) for c in m.chunks("old")] == [
            ("a.txt", h, 30)]
        assert m.replicas([h]) == {h: ["aws-node-1"]}
        # The new table works, and so do the new columns.
        m.add_hints([(h, "*")])
        assert m.hints() == {h: ["*"]}
        assert m.referenced_chunk_ids() == ({h}, False)
        m.set_manifest_object("old", cid(b"m"))
        assert m.batch("old").manifest_object == cid(b"m")
    batches = columns(db, "batches")
    assert {"fingerprint", "owner", "heartbeat_at", "manifest_object"} <= set(batches)
    assert set(columns(db, "files")) >= {"mode", "mtime_ns", "kind", "link_target",
                                         "quarantine"}
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)]
    finally:
        conn.close()
    with Manifest(db) as m:  # a second open of the upgraded file changes nothing
        assert m.batch("old").manifest_object == cid(b"m")
        assert m.hints() == {h: ["*"]}


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    db = tmp_path / "manifest.db"
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    finally:
        conn.close()
    with pytest.raises(StorageError, match=f"version {SCHEMA_VERSION + 1}.*{SCHEMA_VERSION}"):
        Manifest(db)


# -- names that are not UTF-8 -------------------------------------------------------------

LATIN1 = os.fsdecode(b"caf\xe9.txt")  # "caf\udce9.txt"
UTF8 = "café.txt"


def test_names_that_are_not_utf8_round_trip(manifest: Manifest) -> None:
    assert LATIN1 == "caf\udce9.txt"
    manifest.begin_batch("b", "/src", "aws", fingerprint=FP)
    bad_first, bad_second = piece(b"1" * 10, LATIN1, 0, 0), piece(b"2" * 5, LATIN1, 1, 10)
    good = piece(b"3", UTF8)
    link = os.fsdecode(b"link-\xff")
    manifest.add_chunks("b", [bad_first, bad_second, good])
    entries = [file_of(LATIN1, bad_first, bad_second, mode=0o600, mtime_ns=123),
               file_of(UTF8, good),
               FileEntry(path=link, size=0, chunk_count=0, digest="", kind="symlink",
                         link_target=os.fsdecode(b"target-\xfe/" + "é".encode()))]
    manifest.add_files("b", entries)

    assert manifest.files("b") == sorted(entries, key=lambda f: f.path)
    records = manifest.chunks("b")
    assert [(r.path, r.index, r.offset, r.size) for r in records] == [
        (UTF8, 0, 0, 1), (LATIN1, 0, 0, 10), (LATIN1, 1, 10, 5)]
    assert [r.chunk_id for r in records] == [good[0].chunk_id, bad_first[0].chunk_id,
                                             bad_second[0].chunk_id]
    # Stored as raw bytes (a BLOB), the UTF-8 name as TEXT: two keys, never confused.
    conn = sqlite3.connect(manifest.path)
    try:
        stored_as = dict(conn.execute("SELECT CAST(path AS BLOB), typeof(path) FROM files"))
    finally:
        conn.close()
    assert stored_as == {b"caf\xe9.txt": "blob", UTF8.encode(): "text", b"link-\xff": "blob"}


def test_a_source_path_that_is_not_utf8_is_kept(manifest: Manifest) -> None:
    """A batch run from a directory whose name is not UTF-8 (`multicloud run /data/caf\xe9`):
    the orchestrator passes str(source), surrogate escapes and all."""
    source = os.fsdecode(b"/data/caf\xe9")
    assert manifest.begin_batch("b", source, "aws", fingerprint=FP) == "new"
    assert manifest.batch("b").source == source
    manifest.finish_batch("b", "success")
    data = json.loads(json.dumps(manifest.export_batch("b")))
    assert data["batch"]["source"] == source


def test_a_name_given_again_replaces_its_entry_when_not_utf8(manifest: Manifest) -> None:
    manifest.begin_batch("b", "/src", "aws", fingerprint=FP)
    part = piece(b"x", LATIN1)
    manifest.add_files("b", [file_of(LATIN1, part)])
    manifest.add_files("b", [file_of(LATIN1, part, mode=0o700)])
    assert [(f.path, f.mode) for f in manifest.files("b")] == [(LATIN1, 0o700)]


# -- export and import --------------------------------------------------------------------


def test_export_of_a_running_batch_says_how_it_will_be(manifest: Manifest) -> None:
    stored(manifest, "b", status=None)
    data = manifest.export_batch("b", "success", {"files": 1})
    assert data["format"] == "multicloud-manifest/1"
    assert data["batch"]["status"] == "success"
    assert data["batch"]["result"] == {"files": 1}
    assert isinstance(data["batch"]["finished_at"], float)
    assert manifest.batch("b").status == "running"  # exporting changes nothing


def test_import_refuses_what_is_not_a_manifest(manifest: Manifest) -> None:
    with pytest.raises(StorageError, match="not a multicloud batch manifest"):
        manifest.import_batch({"format": "something/else"})
    with pytest.raises(StorageError, match="damaged"):
        manifest.import_batch({"format": "multicloud-manifest/1", "batch": {}})
    assert manifest.batches() == []


def test_import_replaces_what_the_cache_knew_of_the_batch(manifest: Manifest,
                                                          tmp_path: Path) -> None:
    stored(manifest, "b", b"new content")
    data = json.loads(json.dumps(manifest.export_batch("b")))
    with Manifest(tmp_path / "other.db") as other:
        stored(other, "b", b"stale content", fingerprint="stale")
        stale = other.chunk_ids("b")
        assert other.import_batch(data, cid(b"manifest")) == "b"
        assert other.chunk_ids("b") == manifest.chunk_ids("b") != stale
        assert other.batch("b").fingerprint == FP
        assert other.batch("b").manifest_object == cid(b"manifest")
        assert other.batch("b").owner == ""



def test_import_leaves_a_batch_a_live_run_holds(manifest: Manifest, tmp_path: Path,
                                                sleeper: subprocess.Popen[bytes]) -> None:
    """A recover while a --replace run works must not put the old content back under it."""
    stored(manifest, "b", b"old content")
    data = json.loads(json.dumps(manifest.export_batch("b")))
    owner = owner_with_pid(sleeper.pid)
    manifest.begin_batch("b", "/new", "aws", fingerprint=OTHER_FP, owner=owner, replace=True)
    with pytest.raises(BatchLeased, match=f"pid {sleeper.pid}"):
        manifest.import_batch(data, cid(b"manifest"))
    record = manifest.batch("b")
    assert (record.status, record.owner, record.source) == ("running", owner, "/new")


NODES = ["aws-node-1", "aws-node-2", "gcp-node-1", "gcp-node-2"]
# A path piece as a file system gives it: any bytes but "/" and NUL, surrogate-escaped.
raw_names = st.binary(min_size=1, max_size=12).map(
    lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_")))
text_names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\0"),
                     min_size=1, max_size=12)
paths = st.lists(st.one_of(raw_names, text_names), min_size=1, max_size=3).map("/".join)
json_values = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
results = st.one_of(st.none(), st.dictionaries(st.text(max_size=8), json_values, max_size=4))


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    """A batch's content: files of chunks (some shared), blobs, replicas, a result."""
    pool = draw(st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=6,
                         unique=True))
    names = draw(st.lists(paths, min_size=1, max_size=5, unique=True))
    files = []
    chunks = []
    for name in names:
        kind = draw(st.sampled_from(["file", "file", "symlink"]))
        if kind == "symlink":
            files.append(FileEntry(path=name, size=0, chunk_count=0, digest="", kind=kind,
                                   link_target=draw(paths), mode=0o777))
            continue
        parts = draw(st.lists(st.sampled_from(pool), min_size=0, max_size=3))
        offset = 0
        pieces = []
        for index, data in enumerate(parts):
            pieces.append(piece(data, name, index, offset))
            offset += len(data)
        chunks += pieces
        files.append(file_of(name, *pieces, mode=draw(st.integers(0, 0o7777)),
                             mtime_ns=draw(st.integers(0, 2**62)),
                             quarantine=draw(st.one_of(st.none(), st.text(max_size=20)))))
    replicas = {cid(data): draw(st.lists(st.sampled_from(NODES), max_size=3, unique=True))
                for data in pool}
    return {"files": files, "chunks": chunks, "replicas": replicas, "result": draw(results),
            "status": draw(st.sampled_from(["success", "failed", "interrupted"])),
            "source": draw(paths), "fingerprint": draw(st.text(max_size=16))}


@settings(max_examples=30, deadline=None)
@given(content=batches())
def test_export_then_import_gives_the_same_batch(content: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with Manifest(Path(tmp) / "a.db") as source:
            source.begin_batch("b", content["source"], "gcp",
                               fingerprint=content["fingerprint"], owner=this_owner())
            if content["chunks"]:
                source.add_chunks("b", content["chunks"])
            source.add_files("b", content["files"])
            source.add_replicas([(c, n) for c, nodes in content["replicas"].items()
                                 for n in nodes])
            source.finish_batch("b", content["status"], content["result"])
            wire = json.dumps(source.export_batch("b"), sort_keys=True)
            want_batch = source.batch("b")
            want_files, want_chunks = source.files("b"), source.chunks("b")
            ids = source.chunk_ids("b")
            want_replicas = source.replicas(ids)
        with Manifest(Path(tmp) / "b.db") as copy:
            assert copy.import_batch(json.loads(wire), cid(b"its manifest")) == "b"
            got = copy.batch("b")
            assert copy.files("b") == want_files
            assert copy.chunks("b") == want_chunks
            assert copy.replicas(ids) == want_replicas
            assert copy.replicas() == {c: want_replicas[c] for c in ids}
    for name in ("batch_id", "status", "source", "source_cloud", "created_at", "finished_at",
                 "result", "fingerprint"):
        assert getattr(got, name) == getattr(want_batch, name), name
    assert (got.owner, got.manifest_object) == ("", cid(b"its manifest"))
