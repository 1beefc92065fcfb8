"""Temp files belong to the write that made them: opening a store clears only the dead's.

`multicloud status` (or verify, or a second run) opens every node's store while a
`multicloud run` may be writing to it; the run's in-flight temp files must survive that.
Writes are frozen between temp file and rename with the store's commit gate, never a sleep.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from multicloud.node.store import ChunkStore, temp_prefix

DATA = b"in flight while another command opens the store\n" * 100
ID = hashlib.sha256(DATA).hexdigest()
HOUR = 3600.0


def tmp_names(root: Path) -> list[str]:
    """Names in the store's temp dir."""
    return sorted(p.name for p in (root / "tmp").iterdir())


def forge(root: Path, name: str, age_s: float = 0.0) -> Path:
    """A temp file as some writer left it, last modified age_s ago."""
    path = root / "tmp" / name
    path.write_bytes(b"half a write")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A store's root with its directories made (by opening it once)."""
    ChunkStore(tmp_path / "node")
    return tmp_path / "node"


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of another process alive on this host for the test's length."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that ran on this host and has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- who owns a temp file ------------------------------------------------------------------


def test_a_live_processs_temp_file_survives_another_open(root: Path, live_pid: int) -> None:
    theirs = forge(root, temp_prefix(ID, live_pid) + "abcd1234", age_s=2 * HOUR)
    ChunkStore(root)
    assert theirs.exists()  # however old: its writer is still running


def test_a_dead_processs_temp_file_is_cleared(root: Path, dead_pid: int) -> None:
    forge(root, temp_prefix(ID, dead_pid) + "abcd1234")
    ChunkStore(root)
    assert tmp_names(root) == []


def test_a_temp_file_from_an_earlier_boot_is_cleared(root: Path, live_pid: int) -> None:
    # The same pid on another boot is another process, whatever runs under it now.
    prefix = temp_prefix(ID, live_pid)
    boot = prefix.split(".")[2]
    other_boot = "ffffffff" if boot != "ffffffff" else "00000000"
    forge(root, f"{ID[:16]}.{live_pid}.{other_boot}.abcd1234")
    ChunkStore(root)
    assert tmp_names(root) == []


def test_this_processs_own_leftover_is_cleared(root: Path) -> None:
    # No write of this process has it open: a write of ours that failed left it.
    forge(root, temp_prefix(ID) + "abcd1234")
    ChunkStore(root)
    assert tmp_names(root) == []


def test_an_unknown_name_is_cleared_only_once_an_hour_old(root: Path) -> None:
    forge(root, "someone-elses.tmp")
    forge(root, "older.tmp", age_s=HOUR + 60)
    ChunkStore(root)
    assert tmp_names(root) == ["someone-elses.tmp"]


def test_names_without_an_owner_and_crash_leftovers_are_cleared(root: Path) -> None:
    forge(root, f"{ID[:16]}.k2x_9qz0")  # named before temp files carried their owner
    store = ChunkStore(root)
    left = store.write_partial("interrupted-write.partial", 100)
    other = store.write_partial("cut-short", 10)
    assert left.name == "interrupted-write.partial"
    assert other.name == "cut-short.partial"  # the crash marker is always there
    ChunkStore(root)
    assert tmp_names(root) == []


def test_a_write_names_its_temp_file_after_its_process(root: Path) -> None:
    store = ChunkStore(root, fsync=False)
    seen: list[str] = []
    store.commit_gate = threading.Event()
    writer = threading.Thread(target=store.put, args=(ID, DATA))
    writer.start()
    try:
        assert store.commit_held.wait(timeout=30)
        seen = tmp_names(root)
    finally:
        store.commit_gate.set()
        writer.join(timeout=30)
    assert len(seen) == 1
    assert seen[0].startswith(temp_prefix(ID))
    assert seen[0].startswith(f"{ID[:16]}.{os.getpid()}.")


# -- a write racing an open ----------------------------------------------------------------


def held_put(store: ChunkStore) -> tuple[threading.Thread, list[BaseException]]:
    """Start store.put(ID, DATA) on a thread and wait until it holds between temp and rename."""
    errors: list[BaseException] = []

    def put() -> None:
        try:
            store.put(ID, DATA)
        except BaseException as exc:  # handed to the test, which re-raises it
            errors.append(exc)

    store.commit_gate = threading.Event()
    writer = threading.Thread(target=put)
    writer.start()
    assert store.commit_held.wait(timeout=30), "the write never reached its rename"
    return writer, errors


def finish(store: ChunkStore, writer: threading.Thread, errors: list[BaseException]) -> None:
    """Let the held write rename, and fail the test if it raised."""
    assert store.commit_gate is not None
    store.commit_gate.set()
    writer.join(timeout=30)
    assert not writer.is_alive()
    if errors:
        raise errors[0]


def test_a_put_racing_a_second_open_in_another_thread_succeeds(root: Path) -> None:
    store = ChunkStore(root, fsync=False)
    writer, errors = held_put(store)
    try:
        second = ChunkStore(root)  # as `multicloud status` beside a run, in one process
        assert len(tmp_names(root)) == 1
    finally:
        finish(store, writer, errors)
    assert store.get(ID) == DATA
    assert second.get(ID) == DATA
    assert tmp_names(root) == []


def test_a_put_racing_an_open_in_another_process_succeeds(root: Path) -> None:
    store = ChunkStore(root, fsync=False)
    writer, errors = held_put(store)
    try:
        opened = subprocess.run(
            [sys.executable, "-c",
             "import sys; from multicloud.node.store import ChunkStore; "
             "ChunkStore(sys.argv[1])", str(root)],
            capture_output=True, text=True, timeout=60)
        assert opened.returncode == 0, opened.stderr
        assert len(tmp_names(root)) == 1
    finally:
        finish(store, writer, errors)
    assert store.get(ID) == DATA
    assert tmp_names(root) == []


def test_a_node_restart_keeps_a_write_still_in_flight(root: Path) -> None:
    # A restart clears this process's own leftovers, but not the file of a live write.
    store = ChunkStore(root, fsync=False)
    writer, errors = held_put(store)
    try:
        store.clear_temp_files()
        assert len(tmp_names(root)) == 1
    finally:
        finish(store, writer, errors)
    assert store.get(ID) == DATA
    store.clear_temp_files()
    assert tmp_names(root) == []
