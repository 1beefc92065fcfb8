"""Files as they are, end to end through the CLI on the embedded cluster: a name that is not
UTF-8, symlinks, a FIFO, modes and mtimes go in with `multicloud run` and come back from
`multicloud restore` exactly (the FIFO is left out, and said to be)."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Cli, Outcome

BAD_NAME = b"bad\xff\xfe.bin"  # not UTF-8: stored and restored as these bytes
BAD_DATA = random.Random(8).randbytes(150 * 1024)  # three 64 KiB chunks
MTIME_2001 = 978_307_200_123_456_789  # 2001-01-01T00:00:00.123456789Z
MTIME_2010 = 1_262_304_000_000_000_000
SCRIPT = b"#!/bin/sh\necho hello\n"


class EdgeCli(Cli):
    """The CLI with a JSON event log of its own, for runs that must succeed."""

    def __init__(self, capsys: pytest.CaptureFixture[str], root: Path) -> None:
        super().__init__(capsys, root)
        self.log_file = root / "run.log"

    def run_ok(self, source: Path, batch_id: str, *args: str) -> dict[str, Any]:
        """`multicloud run --json`; the result, after checking it succeeded."""
        outcome = self.run(source, "--batch-id", batch_id, "--json", "--log-file",
                           self.log_file, *args)
        assert outcome.code == 0, outcome.err
        assert "Traceback" not in outcome.err
        result: dict[str, Any] = outcome.json()
        assert result["status"] == "success", result["error"]
        return result

    def restore(self, batch_id: str, dest: Path) -> Outcome:
        """`multicloud restore --json`."""
        return self.on_cluster("restore", batch_id, "--to", dest, "--json")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON event log, every line parsed (strict UTF-8)."""
        return [json.loads(line) for line in self.log_file.read_bytes().decode().splitlines()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> EdgeCli:
    """The CLI, run from tmp_path (the default --config-dir is relative)."""
    monkeypatch.chdir(tmp_path)
    return EdgeCli(capsys, tmp_path)


def write(path: Path | bytes, data: bytes, mode: int, mtime_ns: int) -> None:
    """A regular file with exactly this content, mode and modification time."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Every kind of entry issue 8 is about, in one directory."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    write(os.fsencode(root) + b"/" + BAD_NAME, BAD_DATA, 0o644, MTIME_2010)
    write(root / "run.sh", SCRIPT, 0o755, MTIME_2001)
    write(root / "secret.txt", b"top secret\n", 0o640, MTIME_2010)
    write(root / "sub" / "deep.txt", b"deep\n" * 1000, 0o600, MTIME_2001)
    os.symlink("run.sh", root / "link-to-script")
    os.symlink("../../outside/anywhere", root / "sub" / "dangling")  # a target is data
    os.mkfifo(root / "pipe")  # reading it would block the run forever
    return root


def bytes_listing(root: Path) -> dict[bytes, os.stat_result]:
    """Relative path (bytes, as the file system has it) -> lstat, for everything under root."""
    out: dict[bytes, os.stat_result] = {}
    raw_root = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(raw_root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, raw_root)] = os.lstat(path)
    return out


def test_names_links_fifos_modes_and_mtimes_round_trip(cli: EdgeCli, source: Path) -> None:
    result = cli.run_ok(source, "edge")

    assert result["files"] == 6  # four regular files and two links; not the FIFO
    assert result["bytes_processed"] == len(BAD_DATA) + len(SCRIPT) + 11 + 5000
    skipped = result["metrics"]["ingestion"]["skipped_entries"]
    assert [(s["file"], s["kind"]) for s in skipped] == [("pipe", "fifo")]
    [logged] = [line for line in cli.log_lines() if line["event"] == "files_skipped"]
    assert logged["level"] == "warning"
    assert "pipe" in logged["detail"]

    dest = cli.root / "restored"
    restored = cli.restore("edge", dest)

    assert restored.code == 0, restored.err
    report = restored.json()
    assert report["files_restored"] == 6
    assert report["failed_files"] == []
    want, got = bytes_listing(source), bytes_listing(dest)
    assert sorted(got) == sorted(set(want) - {b"pipe"})
    assert (dest / os.fsdecode(BAD_NAME)).read_bytes() == BAD_DATA
    assert BAD_NAME in os.listdir(os.fsencode(dest))
    assert os.readlink(dest / "link-to-script") == "run.sh"
    assert os.readlink(dest / "sub" / "dangling") == "../../outside/anywhere"
    for name, info in got.items():
        source_info = want[name]
        assert stat.S_IFMT(info.st_mode) == stat.S_IFMT(source_info.st_mode), name
        if stat.S_ISREG(info.st_mode):
            assert stat.S_IMODE(info.st_mode) == stat.S_IMODE(source_info.st_mode), name
            assert info.st_mtime_ns == source_info.st_mtime_ns, name
            assert Path(os.fsdecode(os.path.join(os.fsencode(dest), name))).read_bytes() == \
                Path(os.fsdecode(os.path.join(os.fsencode(source), name))).read_bytes()
        if stat.S_ISLNK(info.st_mode):
            assert info.st_mtime_ns == source_info.st_mtime_ns, name  # lutimes on Linux

    # Again into the same place: files and links are replaced, never written through.
    os.unlink(dest / "link-to-script")
    os.symlink("secret.txt", dest / "link-to-script")
    again = cli.restore("edge", dest)
    assert again.code == 0, again.err
    assert os.readlink(dest / "link-to-script") == "run.sh"
    assert (dest / "secret.txt").read_bytes() == b"top secret\n"
    assert sorted(bytes_listing(dest)) == sorted(got)


def test_follow_symlinks_stores_what_links_point_to(cli: EdgeCli, source: Path) -> None:
    result = cli.run_ok(source, "followed", "--follow-symlinks")

    assert result["files"] == 5  # the link to the script is the script; dangling is out
    skipped = result["metrics"]["ingestion"]["skipped_entries"]
    assert sorted((s["file"], s["kind"]) for s in skipped) == [
        ("pipe", "fifo"), ("sub/dangling", "broken-symlink")]

    dest = cli.root / "restored"
    restored = cli.restore("followed", dest)

    assert restored.code == 0, restored.err
    followed = dest / "link-to-script"
    assert not followed.is_symlink()
    assert followed.read_bytes() == SCRIPT
    assert stat.S_IMODE(followed.stat().st_mode) == 0o755  # the target's mode and time
    assert followed.stat().st_mtime_ns == MTIME_2001
    assert not os.path.lexists(dest / "sub" / "dangling")


def test_restore_never_writes_through_a_restored_link(cli: EdgeCli, tmp_path: Path) -> None:
    # Batch one holds a link "d" to a directory; batch two a regular file "d/x". Restored
    # one after the other into one place, the second must not land in the link's target.
    first = tmp_path / "one"
    (first / "real").mkdir(parents=True)
    (first / "real" / "keep.txt").write_bytes(b"keep")
    os.symlink("real", first / "d")
    second = tmp_path / "two"
    (second / "d").mkdir(parents=True)
    (second / "d" / "x").write_bytes(b"x")
    (second / "ok.txt").write_bytes(b"ok")
    cli.run_ok(first, "links")
    cli.run_ok(second, "files")
    dest = tmp_path / "restored"

    assert cli.restore("links", dest).code == 0
    assert os.readlink(dest / "d") == "real"
    refused = cli.restore("files", dest)

    assert refused.code == 2, refused.out
    assert "Traceback" not in refused.err
    assert "d/x" in refused.err
    assert "symlink" in refused.err
    assert not (dest / "real" / "x").exists()  # nothing went through the link
    assert (dest / "ok.txt").read_bytes() == b"ok"  # the rest of the batch is restored
