"""Small files packed together into shared chunks: ingestion, the wire, validation, manifest."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multicloud import DataIngestionEngine, IngestionConfig, SourceError
from multicloud.blob.validate import find_invalid_record
from multicloud.core.types import BlobInfo, Chunk, PackMember
from multicloud.pipeline.ingestion import file_digest, read_chunk_bytes
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.manifest_schema import ChunkRecord
from multicloud.pipeline.sources import scan_source

KIB = 1024
MIB = 1024 * KIB
# Packs of at most 8 KiB, of files under 4 KiB, in 64 KiB chunks.
PACKED = IngestionConfig(chunk_size_mb=64 * KIB / MIB, pack_below_mb=4 * KIB / MIB,
                         pack_size_mb=8 * KIB / MIB)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


async def ingest(root: Path, config: IngestionConfig = PACKED,
                 ) -> tuple[DataIngestionEngine, list[Chunk]]:
    engine = DataIngestionEngine(None, config)
    chunks = [c async for c in engine.iter_chunks(scan_source(root).files, "aws")]
    return engine, chunks


async def test_small_files_share_packs_that_record_each_files_place(tmp_path: Path) -> None:
    files = {f"d/{i:02d}.txt": bytes([i]) * (1000 + i) for i in range(20)}
    files["big.bin"] = b"B" * (20 * KIB)  # above pack_below: chunks of its own
    engine, chunks = await ingest(write_tree(tmp_path / "src", files))

    packs = [c for c in chunks if c.members]
    assert [c.file for c in chunks if not c.members] == ["big.bin"]
    # 8 KiB packs of ~1 KiB files: every file once, in listing order, back to back.
    members = [m for pack in packs for m in pack.members]
    assert [m.file for m in members] == sorted(f for f in files if f != "big.bin")
    for pack in packs:
        assert pack.size_bytes <= 8 * KIB
        assert pack.chunk_id == hashlib.sha256(pack.data or b"").hexdigest()
        at = 0
        for member in pack.members:
            assert member.at == at
            assert bytes(pack.data or b"")[member.at:member.at + member.size] == \
                files[member.file]
            at += member.size
        assert at == pack.size_bytes
    assert len(packs) == 3  # 20 files of ~1 KiB, 7 to a pack
    # A packed file's digest is the one it would have as a chunk alone.
    entries = {e.path: e for e in engine.stats.file_entries}
    for rel, data in files.items():
        if rel != "big.bin":
            assert entries[rel].digest == file_digest([hashlib.sha256(data).hexdigest()])
            assert entries[rel].chunk_count == 1
    assert engine.stats.chunks == len(chunks)
    assert engine.stats.bytes == sum(len(d) for d in files.values())


async def test_a_lone_small_file_is_a_plain_chunk_and_zero_turns_packing_off(
        tmp_path: Path) -> None:
    root = write_tree(tmp_path / "one", {"only.txt": b"x" * 100})
    _, chunks = await ingest(root)
    assert [(c.file, c.members) for c in chunks] == [("only.txt", ())]

    many = write_tree(tmp_path / "many", {f"{i}.txt": b"y" * 10 for i in range(5)})
    _, off = await ingest(many, PACKED.model_copy(update={"pack_below_mb": 0}))
    assert sorted(c.file for c in off) == [f"{i}.txt" for i in range(5)]
    assert not any(c.members for c in off)


async def test_a_pack_is_read_again_from_its_files_for_a_retry(tmp_path: Path) -> None:
    files = {"a.txt": b"alpha\n", "b.txt": b"beta\n"}
    root = write_tree(tmp_path / "src", files)
    _, [pack] = await ingest(root)
    pack.data = None
    assert await read_chunk_bytes(pack) == b"alpha\nbeta\n"
    (root / "b.txt").write_bytes(b"beta, grown\n")  # cut at its listed size, as chunks are
    assert await read_chunk_bytes(pack) == b"alpha\nbeta,"
    (root / "b.txt").write_bytes(b"b\n")
    with pytest.raises(SourceError, match=r"b\.txt changed while it was read"):
        await read_chunk_bytes(pack)
    (root / "a.txt").unlink()
    with pytest.raises(SourceError, match=r"cannot read .*a\.txt"):
        await read_chunk_bytes(pack)


def test_a_pack_crosses_the_wire_with_its_members_but_not_their_paths() -> None:
    pack = Chunk(chunk_id="ab" * 32, file="a pack", index=0, offset=0, size_bytes=7,
                 source_cloud="aws",
                 members=(PackMember("x.jsonl", 0, 3, "jsonl", Path("/src/x.jsonl")),
                          PackMember("y.bin", 3, 4)))
    back = Chunk.from_json(pack.to_json())
    assert back.members == pack.members  # paths are not compared: they stay here
    assert [m.path for m in back.members] == [None, None]
    assert Chunk.from_json(Chunk(chunk_id="", file="f", index=0, offset=0, size_bytes=1,
                                 source_cloud="aws").to_json()).members == ()


def test_each_record_file_of_a_pack_is_checked_whole_and_every_bad_one_named() -> None:
    parts = [(b'{"ok": 1}\n', "jsonl"), (b'{"bad": \n', "jsonl"), (b"\xff\x00", None),
             (b"a,b\n1,2\n3\n", "csv"), (b'{"fine": 2}\n', "jsonl")]
    data = b"".join(p for p, _ in parts)
    members, at = [], 0
    for i, (part, fmt) in enumerate(parts):
        members.append(PackMember(f"f{i}", at, len(part), fmt))
        at += len(part)
    pack = Chunk(chunk_id=hashlib.sha256(data).hexdigest(), file="a pack", index=0,
                 offset=0, size_bytes=len(data), source_cloud="aws", members=tuple(members))
    problem = find_invalid_record(pack, data)
    assert problem is not None
    assert (problem.file, problem.line) == ("f1", 1)
    assert [(m.file, m.line) for m in problem.more] == [("f3", 3)]
    assert problem.message(pack).startswith("f1: line 1 ")
    assert type(problem).from_json(problem.to_json()) == problem
    good = b"".join(p for p, fmt in parts if fmt is None)
    assert find_invalid_record(Chunk(chunk_id="", file="p", index=0, offset=0,
                                     size_bytes=len(good), source_cloud="aws",
                                     members=(PackMember("bin", 0, len(good)),)), good) is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
def test_every_member_comes_back_out_of_its_pack(parts: list[bytes]) -> None:
    raw = b"".join(parts)
    chunk_id = hashlib.sha256(raw).hexdigest()
    at = 0
    for part in parts:
        record = ChunkRecord("f", 0, 0, len(part), chunk_id, 1, "c", "raw", at)
        piece, piece_id = record.piece(raw)
        assert piece == part
        assert piece_id == (chunk_id if len(part) == len(raw)
                            else hashlib.sha256(part).hexdigest())
        at += len(part)


def test_the_manifest_keeps_each_packed_files_place_and_exports_it(tmp_path: Path) -> None:
    raw = b"one" + b"twotwo"
    chunk_id = hashlib.sha256(raw).hexdigest()
    pack = Chunk(chunk_id=chunk_id, file="a pack", index=0, offset=0, size_bytes=len(raw),
                 source_cloud="aws",
                 members=(PackMember("a.txt", 0, 3), PackMember("b/c.txt", 3, 6)))
    blob = BlobInfo(chunk_id, len(raw), 80, "0" * 32, "raw")
    with Manifest(tmp_path / "m.db") as manifest:
        manifest.begin_batch("b1", "/src", "aws")
        manifest.record_commits("b1", [(pack, blob)], [(chunk_id, "n1")])
        records = manifest.chunks("b1")
        assert [(r.path, r.offset, r.size, r.at) for r in records] == [
            ("a.txt", 0, 3, 0), ("b/c.txt", 0, 6, 3)]
        assert [r.piece(raw)[0] for r in records] == [b"one", b"twotwo"]
        assert manifest.chunk_ids("b1") == [chunk_id]
        exported = manifest.export_batch("b1")
        assert sorted(exported["chunks"]) == [["a.txt", 0, 0, 3, chunk_id],
                                              ["b/c.txt", 0, 0, 6, chunk_id, 3]]
    with Manifest(tmp_path / "other.db") as other:
        other.import_batch(exported)
        assert [(r.path, r.at) for r in other.chunks("b1")] == [("a.txt", 0), ("b/c.txt", 3)]


def test_a_version_2_manifest_gains_the_column_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    with Manifest(path) as manifest:
        manifest.begin_batch("old", "/src", "aws")
    conn = sqlite3.connect(path)
    with conn:  # what a version 2 file looks like: no `at`, no clean_records
        conn.execute("ALTER TABLE file_chunks DROP COLUMN at")
        conn.execute("DROP TABLE clean_records")
        conn.execute("UPDATE schema_version SET version = 2")
    conn.close()
    with Manifest(path) as manifest:
        assert manifest.batch("old").status == "running"
        chunk = Chunk(chunk_id="cd" * 32, file="f", index=0, offset=0, size_bytes=1,
                      source_cloud="aws")
        manifest.record_commits("old", [(chunk, BlobInfo("cd" * 32, 1, 62, "0", "raw"))], [])
        assert [r.at for r in manifest.chunks("old")] == [0]
