"""What the manifest says is stored already, and when a chunk's record check still holds."""

from __future__ import annotations

from pathlib import Path

from multicloud.core.types import BlobInfo, Chunk, PackMember
from multicloud.pipeline.manifest import Manifest

ID = "ab" * 32


def chunk(**fields: object) -> Chunk:
    base: dict[str, object] = {"chunk_id": ID, "file": "f.jsonl", "index": 1,
                               "offset": 100, "size_bytes": 10, "source_cloud": "aws",
                               "record_format": "jsonl", "line_prefix": b'{"a": '}
    return Chunk(**{**base, **fields})  # type: ignore[arg-type]


def test_the_records_context_is_what_the_check_depends_on_besides_the_bytes() -> None:
    here = chunk().records_context
    assert here is not None
    assert chunk(file="other.jsonl", index=7, offset=900).records_context == here
    assert chunk(line_prefix=b"").records_context != here  # another line carried in
    assert chunk(offset=0).records_context != here  # starts its file: no carried line
    assert chunk(at_file_end=False).records_context != here
    assert chunk(record_format="csv").records_context != here
    assert chunk(record_format=None).records_context is None
    binary = (PackMember("a.bin", 0, 4), PackMember("b.bin", 4, 6))
    assert chunk(record_format=None, members=binary).records_context is None
    logs = (PackMember("a.bin", 0, 4), PackMember("b.jsonl", 4, 6, "jsonl"))
    packed = chunk(record_format=None, members=logs).records_context
    assert packed is not None
    moved = (PackMember("b.jsonl", 0, 6, "jsonl"), PackMember("a.bin", 6, 4))
    assert chunk(record_format=None, members=moved).records_context != packed


def test_stored_needs_a_blob_and_for_records_a_clean_check(tmp_path: Path) -> None:
    blob = BlobInfo(ID, 10, 80, "c" * 32, "zstd")
    context = chunk().records_context
    assert context is not None
    with Manifest(tmp_path / "m.db") as manifest:
        assert manifest.stored(ID, None) is None
        manifest.begin_batch("b", "/src", "aws")
        manifest.record_commits("b", [(chunk(), blob)], [(ID, "n2"), (ID, "n1")])
        assert manifest.stored(ID, None) == (blob, ["n1", "n2"])
        assert manifest.stored(ID, context) is None  # never found clean
        manifest.record_commits("b", [], [], clean=[(ID, context)])
        assert manifest.stored(ID, context) == (blob, ["n1", "n2"])
        assert manifest.stored(ID, "another") is None
        manifest.forget_chunks([ID])
        assert manifest.stored(ID, None) is None
        manifest.record_commits("b", [(chunk(), blob)], [])
        assert manifest.stored(ID, context) is None  # gc forgot the check with the blob
