"""`scan_source` keeps files as they are: links as links (or followed, loops included),
special files skipped and listed (never opened), modes and mtimes, names as bytes."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from multicloud.core.errors import SourceError
from multicloud.pipeline.ingestion import DataIngestionEngine, file_digest
from multicloud.pipeline.sources import SourceFile, list_source, scan_source

MTIME_2001 = 978_307_200_123_456_789  # 2001-01-01T00:00:00.123456789Z, in nanoseconds


def by_path(files: list[SourceFile]) -> dict[str, SourceFile]:
    """The listing keyed by relative path."""
    return {f.rel_path: f for f in files}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A source with a file, a subdirectory, and links to each and to nothing."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.txt").write_bytes(b"beta beta\n")
    os.symlink("a.txt", root / "to-file")
    os.symlink("sub", root / "to-dir")
    os.symlink("no/such/target", root / "dangling")
    return root


def test_symlinks_are_listed_as_links_with_their_target_text(tree: Path) -> None:
    listing = scan_source(tree)
    files = by_path(listing.files)

    assert sorted(files) == ["a.txt", "dangling", "sub/b.txt", "to-dir", "to-file"]
    for name, target in [("to-file", "a.txt"), ("to-dir", "sub"),
                         ("dangling", "no/such/target")]:
        link = files[name]
        assert (link.kind, link.size, link.link_target) == ("symlink", 0, target)
        assert link.path == tree / name  # the link itself, not what it points to
        info = os.lstat(tree / name)
        assert (link.mode, link.mtime_ns) == (stat.S_IMODE(info.st_mode), info.st_mtime_ns)
    assert (files["a.txt"].kind, files["a.txt"].link_target) == ("file", None)
    assert listing.skipped == []
    assert [f.rel_path for f in listing.files] == sorted(files)  # sorted by path
    assert list_source(tree) == listing.files


def test_following_reads_link_targets_and_skips_dangling_links(tree: Path) -> None:
    listing = scan_source(tree, follow_symlinks=True)
    files = by_path(listing.files)

    assert sorted(files) == ["a.txt", "sub/b.txt", "to-dir/b.txt", "to-file"]
    followed = files["to-file"]
    assert (followed.kind, followed.size, followed.link_target) == ("file", 6, None)
    assert followed.path == (tree / "a.txt").resolve()  # its target's bytes are read
    assert files["to-dir/b.txt"].size == len(b"beta beta\n")
    [dangling] = listing.skipped
    assert (dangling.path, dangling.kind) == ("dangling", "broken-symlink")
    assert "no/such/target" in dangling.reason


def test_following_stops_at_a_link_back_up_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f.txt").write_bytes(b"f")
    os.symlink("..", root / "d" / "e" / "up")  # e/up -> d: d contains e
    os.symlink("../..", root / "d" / "e" / "top")  # -> the root itself
    os.symlink("self", root / "self")  # a link to itself: ELOOP when followed

    listing = scan_source(root, follow_symlinks=True)
    files = by_path(listing.files)

    assert sorted(files) == ["d/e/f.txt", "d/e/top", "d/e/up"]
    assert (files["d/e/up"].kind, files["d/e/up"].link_target) == ("symlink", "..")
    assert (files["d/e/top"].kind, files["d/e/top"].link_target) == ("symlink", "../..")
    assert [(s.path, s.kind) for s in listing.skipped] == [("self", "broken-symlink")]


def test_following_walks_a_directory_linked_twice_both_times(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.bin").write_bytes(b"x" * 10)
    root = tmp_path / "src"
    root.mkdir()
    os.symlink(outside, root / "one")
    os.symlink(outside, root / "two")

    files = by_path(scan_source(root, follow_symlinks=True).files)

    # Not a loop: each path gets the files (their chunks dedupe by id in the store).
    assert sorted(files) == ["one/x.bin", "two/x.bin"]


def test_fifos_and_sockets_are_skipped_and_listed_never_opened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    root.mkdir()
    monkeypatch.chdir(root)
    (root / "data.bin").write_bytes(b"1234")
    os.mkfifo(root / "pipe")  # opening it for reading would block this test forever
    os.symlink("pipe", root / "to-pipe")
    with unix_socket(Path("sock")):
        listing = scan_source(root)
        followed = scan_source(root, follow_symlinks=True)

    assert sorted(by_path(listing.files)) == ["data.bin", "to-pipe"]
    assert by_path(listing.files)["to-pipe"].kind == "symlink"
    assert [(s.path, s.kind) for s in listing.skipped] == [("pipe", "fifo"),
                                                           ("sock", "socket")]
    assert all("not read" in s.reason for s in listing.skipped)
    assert sorted(by_path(followed.files)) == ["data.bin"]
    assert [(s.path, s.kind) for s in followed.skipped] == [
        ("pipe", "fifo"), ("sock", "socket"), ("to-pipe", "fifo")]


def test_char_devices_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    os.symlink("/dev/null", root / "null")

    listing = scan_source(root, follow_symlinks=True)

    assert listing.files == []
    assert [(s.path, s.kind) for s in listing.skipped] == [("null", "char-device")]


def test_modes_and_mtimes_are_captured(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for name, mode in [("run.sh", 0o755), ("secret", 0o640), ("sticky", 0o1644)]:
        (root / name).write_bytes(name.encode())
        os.chmod(root / name, mode)
        os.utime(root / name, ns=(MTIME_2001, MTIME_2001))

    files = by_path(scan_source(root).files)

    assert {name: f.mode for name, f in files.items()} == {
        "run.sh": 0o755, "secret": 0o640, "sticky": 0o1644}
    assert {f.mtime_ns for f in files.values()} == {MTIME_2001}
    single = scan_source(root / "run.sh").files  # a file as the whole source
    assert [(f.rel_path, f.mode, f.mtime_ns) for f in single] == [
        ("run.sh", 0o755, MTIME_2001)]


def test_a_name_that_is_not_utf8_is_listed_with_surrogate_escapes(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "dir\udcff").mkdir(parents=True)
    raw = os.fsencode(root) + b"/dir\xff/bad\xff\xfe.bin"
    fd = os.open(raw, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"payload")
    os.close(fd)

    [listed] = scan_source(root).files

    assert listed.rel_path == "dir\udcff/bad\udcff\udcfe.bin"
    assert os.fsencode(listed.rel_path) == b"dir\xff/bad\xff\xfe.bin"
    assert listed.path.read_bytes() == b"payload"  # the str path opens the same file
    assert listed.mode == 0o600


def test_missing_and_special_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        scan_source(tmp_path / "nope\udcff")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SourceError, match="neither a regular file nor a directory"):
        scan_source(tmp_path / "fifo")


async def test_ingestion_records_a_link_without_reading_it(tree: Path) -> None:
    os.chmod(tree / "a.txt", 0o751)
    os.utime(tree / "a.txt", ns=(MTIME_2001, MTIME_2001))
    engine = DataIngestionEngine()
    files = scan_source(tree).files

    chunks = [chunk async for chunk in engine.iter_chunks(files, "aws")]

    read = sorted(m.file for c in chunks for m in c.members)  # two small files: one pack
    assert read == ["a.txt", "sub/b.txt"]  # no link is read
    entries = {e.path: e for e in engine.stats.file_entries}
    link = entries["to-file"]
    assert (link.kind, link.link_target, link.size, link.chunk_count) == (
        "symlink", "a.txt", 0, 0)
    assert link.digest == file_digest([])
    assert entries["dangling"].link_target == "no/such/target"
    regular = entries["a.txt"]
    assert (regular.kind, regular.mode, regular.mtime_ns) == ("file", 0o751, MTIME_2001)
    assert regular.chunk_count == 1


@contextlib.contextmanager
def unix_socket(path: Path) -> Iterator[None]:
    """A unix socket bound at path (relative: sun_path holds only 108 bytes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield
