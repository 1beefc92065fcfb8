"""Blobs sealed in page-aligned buffers go to disk with O_DIRECT, byte-exact, padding cut."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multicloud.blob import TransformChain, decode_blob
from multicloud.core.buffers import PAGE, aligned, padded, round_up
from multicloud.core.config import ProcessingConfig
from multicloud.core.types import Chunk
from multicloud.node.store import ChunkStore


def test_only_a_view_that_starts_an_aligned_buffer_is_padded() -> None:
    view = aligned(PAGE + 10)
    whole = padded(view)
    assert whole is not None
    assert len(whole) == round_up(PAGE + 10) == 2 * PAGE
    assert padded(view[:5]) is not None  # a prefix starts the buffer too
    assert padded(view[1:]) is None
    assert padded(b"bytes") is None
    assert padded(memoryview(b"read-only")) is None
    assert padded(view.toreadonly()) is None
    assert round_up(0) == PAGE


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=0, max_size=3 * 4096 + 7))
def test_a_sealed_blob_is_written_direct_and_reads_back_exact(tmp_path_factory: pytest.
                                                              TempPathFactory, raw: bytes,
                                                              ) -> None:
    store = ChunkStore(tmp_path_factory.mktemp("store"))
    chunk_id = hashlib.sha256(raw).hexdigest()
    chunk = Chunk(chunk_id=chunk_id, file="f", index=0, offset=0, size_bytes=len(raw),
                  source_cloud="aws")
    blob, info = TransformChain(ProcessingConfig(transforms=["validate"])).apply(chunk, raw)
    assert padded(blob) is not None  # sealed where a direct write can take it
    store.put(chunk_id, blob)
    assert store.direct_io
    stored = store.get(chunk_id)
    assert stored == bytes(blob)
    assert len(stored) == info.blob_size
    assert decode_blob(stored, None, chunk_id) == raw
    assert store.usage() == (1, len(stored))


def test_a_file_system_that_refuses_direct_writes_gets_buffered_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fcntl.fcntl

    def refuse(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refuse)
    store = ChunkStore(tmp_path / "store")
    data = os.urandom(10_000)
    blob = aligned(len(data))
    blob[:] = data
    store.put("cd" * 32, blob)
    assert not store.direct_io  # asked once, then never again
    assert store.get("cd" * 32) == data
    store.put("ef" * 32, blob)
    assert store.get("ef" * 32) == data


def test_without_fsync_there_is_no_direct_write(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store", fsync=False)
    assert not store.direct_io
    blob = aligned(5)
    blob[:] = b"hello"
    store.put("12" * 32, blob)
    assert store.get("12" * 32) == b"hello"


def test_malloc_arenas_are_capped_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch,
                                                        ) -> None:
    from multicloud.core.host import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert not limit_malloc_arenas()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas()  # glibc, as on every Linux this runs on
