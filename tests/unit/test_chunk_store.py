"""Tests for a node's on-disk chunk store: content addressing, atomic writes, id checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from multicloud.core.errors import ChunkNotFound, InvalidChunkId, StorageError
from multicloud.node.store import ChunkStore, check_chunk_id


def cid(data: bytes) -> str:
    """The chunk id of ``data``."""
    return hashlib.sha256(data).hexdigest()


A, B = b"alpha" * 100, b"bravo" * 7
ID_A, ID_B = cid(A), cid(B)


@pytest.fixture(params=[True, False], ids=["fsync", "no-fsync"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ChunkStore:
    """A fresh store, with and without fsync."""
    return ChunkStore(tmp_path / "node", fsync=request.param)


def temp_files(store: ChunkStore) -> list[Path]:
    """What is left in the store's temp dir."""
    return list((store.root / "tmp").iterdir())


def test_put_get_round_trip(store: ChunkStore) -> None:
    store.put(ID_A, A)
    store.put(ID_B, memoryview(B))
    assert store.get(ID_A) == A
    assert store.get(ID_B) == B
    assert store.exists(ID_A)
    assert store.size(ID_A) == len(A)
    assert store.size(ID_B) == len(B)


def test_objects_live_under_a_two_level_fan_out(store: ChunkStore) -> None:
    store.put(ID_A, A)
    path = store.path_for(ID_A)
    assert path == store.root / "objects" / ID_A[:2] / ID_A[2:4] / ID_A
    assert path.read_bytes() == A


def test_missing_object(store: ChunkStore) -> None:
    assert not store.exists(ID_A)
    assert store.size(ID_A) is None
    assert store.delete(ID_A) is False
    with pytest.raises(ChunkNotFound, match=ID_A):
        store.get(ID_A)


def test_delete(store: ChunkStore) -> None:
    store.put(ID_A, A)
    assert store.delete(ID_A) is True
    assert not store.exists(ID_A)
    assert store.delete(ID_A) is False


def test_inventory_and_usage(store: ChunkStore) -> None:
    assert list(store.inventory()) == []
    assert store.usage() == (0, 0)
    store.put(ID_A, A)
    store.put(ID_B, B)
    assert sorted(store.inventory()) == sorted([ID_A, ID_B])
    assert store.usage() == (2, len(A) + len(B))
    store.delete(ID_A)
    assert store.usage() == (1, len(B))


def test_inventory_ignores_stray_files(store: ChunkStore) -> None:
    store.put(ID_A, A)
    stray = store.path_for(ID_A).parent / "notes.txt"
    stray.write_text("not an object")
    assert list(store.inventory()) == [ID_A]
    assert store.usage() == (1, len(A))


def test_empty_object(store: ChunkStore) -> None:
    empty = cid(b"")
    store.put(empty, b"")
    assert store.get(empty) == b""
    assert store.size(empty) == 0
    assert store.usage() == (1, 0)


BAD_IDS = {
    "uppercase": ID_A.upper(),
    "63-chars": ID_A[:63],
    "65-chars": ID_A + "0",
    "empty": "",
    "traversal": "../x",
    "traversal-64-chars": "../" + ID_A[3:],
    "slash": ID_A[:62] + "/x",
    "not-hex": "g" * 64,
    "leading-space": " " + ID_A[1:],
    "trailing-newline": ID_A + "\n",
}


@pytest.mark.parametrize("bad", list(BAD_IDS.values()), ids=list(BAD_IDS))
def test_invalid_ids_are_refused(store: ChunkStore, bad: str) -> None:
    with pytest.raises(InvalidChunkId) as err:
        store.put(bad, b"data")
    assert err.value.chunk_id == bad
    assert "64 lowercase hex" in str(err.value)
    for call in (store.get, store.exists, store.size, store.delete, store.path_for):
        with pytest.raises(InvalidChunkId):
            call(bad)
    assert list((store.root).rglob("*data*")) == []
    assert store.usage() == (0, 0)
    assert temp_files(store) == []


def test_invalid_chunk_id_is_a_storage_error() -> None:
    with pytest.raises(StorageError):
        check_chunk_id("../../etc/passwd")
    assert check_chunk_id(ID_A) == ID_A


def test_traversal_writes_nothing_outside(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "node")
    with pytest.raises(InvalidChunkId):
        store.put("../../escaped", b"x")
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "node" / "escaped").exists()


def test_put_replaces_atomically(store: ChunkStore) -> None:
    store.put(ID_A, b"old contents")
    with store.path_for(ID_A).open("rb") as reader:
        store.put(ID_A, b"new contents!")
        # A rename, not an overwrite in place: an open reader still sees the old object whole.
        assert reader.read() == b"old contents"
    assert store.get(ID_A) == b"new contents!"
    assert store.usage() == (1, len(b"new contents!"))


def test_no_temp_files_left_after_put(store: ChunkStore) -> None:
    for i in range(5):
        data = bytes([i]) * 1000
        store.put(cid(data), data)
    store.put(ID_A, A)
    store.put(ID_A, A)
    assert temp_files(store) == []


def test_leftover_temp_files_are_cleared_on_open(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "node")
    store.put(ID_A, A)
    (store.root / "tmp" / f"{ID_B[:16]}.abc123").write_bytes(b"half a write")
    (store.root / "tmp" / "interrupted-write.partial").write_bytes(b"\0" * 100)
    reopened = ChunkStore(tmp_path / "node")
    assert temp_files(reopened) == []
    assert reopened.get(ID_A) == A  # committed objects survive
    assert not reopened.exists(ID_B)


class ExplodingBuffer:
    """Something handed to put() whose write fails after the temp file exists.

    Python 3.12+ asks __buffer__ for the bytes (OSError); 3.11 refuses the object (TypeError).
    """

    def __buffer__(self, flags: int) -> memoryview:
        raise OSError("disk on fire")


def test_failed_put_leaves_no_object_and_no_temp(store: ChunkStore) -> None:
    with pytest.raises((OSError, TypeError)):
        store.put(ID_A, ExplodingBuffer())  # type: ignore[arg-type]
    assert not store.exists(ID_A)
    assert temp_files(store) == []


def test_put_of_a_released_memoryview_leaves_nothing(store: ChunkStore) -> None:
    view = memoryview(bytearray(A))
    view.release()
    with pytest.raises(ValueError, match="released"):
        store.put(ID_A, view)
    assert not store.exists(ID_A)
    assert store.usage() == (0, 0)
    assert temp_files(store) == []


def test_failed_replace_keeps_the_old_object(store: ChunkStore) -> None:
    store.put(ID_A, A)
    view = memoryview(bytearray(b"replacement"))
    view.release()
    with pytest.raises(ValueError, match="released"):
        store.put(ID_A, view)
    assert store.get(ID_A) == A
    assert temp_files(store) == []


def test_unreadable_object_is_a_storage_error(store: ChunkStore) -> None:
    store.put(ID_A, A)
    path = store.path_for(ID_A)
    path.unlink()
    path.mkdir()  # a directory where the object should be: reading it fails
    with pytest.raises(StorageError, match="cannot read chunk"):
        store.get(ID_A)
    assert not store.exists(ID_A)
