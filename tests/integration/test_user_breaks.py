"""What a user does to a durable control plane, through the real `multicloud` processes.

Every command runs as its own process on a shared data dir, as a user's shell would run it:
status polled from another process while a run works, a batch id given to other content,
the manifest deleted, a run killed with SIGKILL, SIGTERM or Ctrl-C half-way, replicas
rotted or lost, orphans left for gc, the same batch started twice, and a disk that fills.

Runs that must be caught half-way last a few seconds through the emulated links
(`time_scale`), not through data size; every wait polls a condition (`multicloud status`,
`batches`, a process exiting) against a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Outcome
from cluster_fixtures import assert_same_tree, wait_until

from multicloud.core.units import parse_size
from multicloud.datagen import generate_dataset

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
COMMAND_TIMEOUT_S = 120.0
PROGRESS_TIMEOUT_S = 90.0
# With 64 KiB chunks, a 4 MiB source is 68 chunks: about 10 s of emulated links at this
# scale on a 2-core box, long enough to be caught half-way by a `status` poll (1-3 s each).
SLOW_TIME_SCALE = 15.0
HALF_WAY = 40.0  # percent committed at which a run is stopped


class Workspace:
    """Runs `multicloud` as separate processes from one directory (its root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Each data dir's own token file decides, as for a user with no token exported.
        self.env = {k: v for k, v in os.environ.items() if k != "MULTICLOUD_TOKEN"}
        self.started: list[subprocess.Popen[str]] = []
        self._configs = 0

    def argv(self, args: tuple[str | Path, ...]) -> list[str]:
        """The command line of `multicloud ARGS` as a module of this interpreter."""
        return [sys.executable, "-m", "multicloud.ui.cli", *map(str, args)]

    def __call__(self, *args: str | Path, timeout: float = COMMAND_TIMEOUT_S) -> Outcome:
        """Run `multicloud ARGS` to the end."""
        done = subprocess.run(self.argv(args), capture_output=True, text=True, cwd=self.root,
                              env=self.env, timeout=timeout, check=False)
        return Outcome(done.returncode, done.stdout, done.stderr)

    def start(self, *args: str | Path) -> subprocess.Popen[str]:
        """Start `multicloud ARGS` without waiting (pair with finish)."""
        process = subprocess.Popen(self.argv(args), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   text=True, cwd=self.root, env=self.env)
        self.started.append(process)
        return process

    def close(self) -> None:
        """Kill whatever a failed test left running, and reap it."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=30)

    def config(self, time_scale: float = 0.0, **cluster: object) -> Path:
        """A config dir with 64 KiB chunks and this cluster section."""
        self._configs += 1
        path = self.root / f"cfg-{self._configs}"
        path.mkdir()
        (path / "ingestion_config.yml").write_text("chunk_size_mb: 0.0625\n")
        lines = [f"time_scale: {time_scale}"] + [f"{k}: {v}" for k, v in cluster.items()]
        (path / "cluster_config.yml").write_text("\n".join(lines) + "\n")
        return path

    def gen_data(self, name: str, size: str, seed: int = 0) -> Path:
        """The dataset `multicloud gen-data DIR --size SIZE --seed SEED` writes (made in
        this process: it is not under test, and an interpreter start costs a second)."""
        path = self.root / name
        generate_dataset(path, parse_size(size), seed=seed)
        return path


def finish(process: subprocess.Popen[str], timeout: float = COMMAND_TIMEOUT_S) -> Outcome:
    """Wait for a started command; its outcome."""
    out, err = process.communicate(timeout=timeout)
    return Outcome(process.returncode, out, err)


@dataclass(frozen=True)
class Place:
    """One data dir with the config dir its commands use."""

    ws: Workspace
    data_dir: Path
    config_dir: Path

    @property
    def opts(self) -> tuple[str | Path, ...]:
        """--data-dir and --config-dir."""
        return ("--data-dir", self.data_dir, "--config-dir", self.config_dir)

    def run_args(self, source: Path, batch_id: str, *extra: str) -> tuple[str | Path, ...]:
        """The arguments of `multicloud run` of source as batch_id here."""
        return ("run", "--source", source, "--batch-id", batch_id, *extra,
                "--log-file", self.ws.root / "logs" / f"{batch_id}.log", *self.opts)

    def run(self, source: Path, batch_id: str, *extra: str) -> Outcome:
        """`multicloud run` to the end."""
        return self.ws(*self.run_args(source, batch_id, *extra))

    def start_run(self, source: Path, batch_id: str, *extra: str) -> subprocess.Popen[str]:
        """`multicloud run` in the background."""
        return self.ws.start(*self.run_args(source, batch_id, *extra))

    def __call__(self, *args: str | Path) -> Outcome:
        """Any other command on this data dir."""
        return self.ws(*args, *self.opts)

    def restore_exact(self, batch_id: str, source: Path, dest: Path) -> Outcome:
        """Restore batch_id to dest and check it equals source byte for byte."""
        restored = self("restore", batch_id, "--to", dest)
        assert restored.code == 0, restored.err
        assert_same_tree(source, dest)
        return restored

    def batches(self) -> dict[str, str]:
        """Batch id -> status, as `multicloud batches --json` lists them."""
        listed = self("batches", "--json")
        assert listed.code == 0, listed.err
        return {b["batch_id"]: b["status"] for b in listed.json()}

    def live_status(self) -> dict[str, Any]:
        """The `status` part of `multicloud status --json` ({} when no run is live)."""
        polled = self("status", "--json")
        assert polled.code == 0, polled.err
        assert "Traceback" not in polled.err, polled.err
        status: dict[str, Any] = polled.json()["status"]
        return status

    def wait_for_progress(self, run: subprocess.Popen[str], batch_id: str,
                          percent: float = HALF_WAY) -> float:
        """Poll `multicloud status --json` until the run of batch_id passes percent."""
        def reached() -> float | None:
            if run.poll() is not None:
                ended = finish(run)
                raise AssertionError(f"the run ended (exit {ended.code}) before {percent}%:"
                                     f"\n{ended.err[-2000:]}")
            live = self.live_status()
            if live.get("batch_id") != batch_id or live.get("status") != "running":
                return None
            progress = float(live["progress_percent"])
            return progress if progress >= percent else None

        return wait_until(reached, PROGRESS_TIMEOUT_S, f"batch {batch_id} to pass {percent}%")

    def objects(self) -> dict[Path, int]:
        """Every replica file on every node of the embedded cluster, with its size."""
        return {p: p.stat().st_size for p in sorted(self.data_dir.glob("nodes/*/objects/*/*/*"))
                if p.is_file()}


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    """Processes run from tmp_path; any still running at the end are killed."""
    workspace = Workspace(tmp_path)
    yield workspace
    workspace.close()


@pytest.fixture
def fast(ws: Workspace) -> Path:
    """A config dir whose emulated links take no time."""
    return ws.config()


@pytest.fixture
def slow(ws: Workspace) -> Path:
    """A config dir whose runs last long enough to be interrupted half-way."""
    return ws.config(time_scale=SLOW_TIME_SCALE)


def interrupt_half_way(place: Place, source: Path, batch_id: str,
                       sig: signal.Signals) -> Outcome:
    """Start a run, wait until status shows it past HALF_WAY, send sig; its outcome."""
    run = place.start_run(source, batch_id)
    place.wait_for_progress(run, batch_id)
    run.send_signal(sig)
    return finish(run)


# -- 1. another process watches while a run works -------------------------------------------


def test_status_batches_and_verify_from_other_processes_while_a_run_works(
        ws: Workspace, fast: Path, slow: Path) -> None:
    other_source = ws.gen_data("other", "512KiB", seed=1)
    source = ws.gen_data("src", "4MiB", seed=2)
    data = ws.root / "data"
    first = Place(ws, data, fast)
    assert first.run(other_source, "other").code == 0

    watcher = Place(ws, data, fast)
    run = Place(ws, data, slow).start_run(source, "live")
    progress: list[float] = []
    tries = 0
    while run.poll() is None:
        # The three at once, as three terminals would: each one its own process.
        polls = [ws.start("status", "--json", *watcher.opts),
                 ws.start("batches", "--json", *watcher.opts),
                 ws.start("verify", "other", *watcher.opts)]
        status, batches, verify = (finish(p) for p in polls)
        for outcome in (status, batches, verify):
            assert outcome.code == 0, (outcome.out[-1000:], outcome.err[-2000:])
            assert "Traceback" not in outcome.err, outcome.err
        live = status.json()["status"]
        listed = {b["batch_id"]: b["status"] for b in batches.json()}
        assert listed["other"] == "success"
        assert listed.get("live") in (None, "running", "success"), listed
        assert verify.out.startswith("batch other: ")
        if live.get("status") == "running" and live.get("batch_id") == "live":
            tries += 1
            progress.append(float(live["progress_percent"]))

    ran = finish(run)
    assert ran.code == 0, ran.err
    assert tries >= 2, f"only {tries} polls saw the run working; make it last longer"
    assert progress == sorted(progress), progress
    assert watcher.batches() == {"other": "success", "live": "success"}
    watcher.restore_exact("live", source, ws.root / "restored")


# -- 2. a batch id names one content ---------------------------------------------------------


def test_a_batch_id_keeps_its_content_unless_replaced(ws: Workspace, fast: Path) -> None:
    a = ws.gen_data("a", "1MiB", seed=3)
    b = ws.gen_data("b", "1MiB", seed=4)
    place = Place(ws, ws.root / "data", fast)
    assert place.run(a, "base").code == 0

    refused = place.run(b, "base")

    refused.error_line("'base'", "--replace")
    place.restore_exact("base", a, ws.root / "still-a")

    again = place.run(a, "base")
    assert again.code == 0, again.err
    assert "already complete" in again.out, again.out
    assert "nothing to do" in again.out, again.out

    replaced = place.run(b, "base", "--replace")
    assert replaced.code == 0, replaced.err
    assert place.batches() == {"base": "success"}
    place.restore_exact("base", b, ws.root / "now-b")


# -- 3. the local manifest is only a cache --------------------------------------------------


def lose_manifest(data_dir: Path) -> None:
    """Delete the manifest and its WAL files, as a lost disk would."""
    lost = list(data_dir.glob("manifest.db*"))
    assert data_dir / "manifest.db" in lost
    for path in lost:
        path.unlink()


def test_a_lost_manifest_is_recovered_from_the_nodes(ws: Workspace, fast: Path) -> None:
    source = ws.gen_data("src", "1MiB", seed=5)
    place = Place(ws, ws.root / "data", fast)
    assert place.run(source, "kept").code == 0
    lose_manifest(place.data_dir)

    recovered = place("recover")

    assert recovered.code == 0, recovered.err
    assert "recovered 1 batch(es)" in recovered.out, recovered.out
    assert recovered.out.rstrip().endswith(": kept"), recovered.out
    assert place.batches() == {"kept": "success"}
    place.restore_exact("kept", source, ws.root / "after-recover")

    # No recover: restore on a fresh cache rebuilds it, and says so.
    lose_manifest(place.data_dir)
    restored = place.restore_exact("kept", source, ws.root / "after-restore")
    assert "rebuilt the catalogue from the cluster" in restored.err, restored.err
    assert (place.data_dir / "manifest.db").exists()


# -- 4. kill -9 half-way, then the same command ---------------------------------------------


def test_a_run_killed_half_way_resumes_without_redoing_its_work(
        ws: Workspace, fast: Path, slow: Path) -> None:
    source = ws.gen_data("src", "4MiB", seed=6)
    place = Place(ws, ws.root / "data", slow)
    # The reference: the same data, fresh, in a data dir of its own (beside the slow run,
    # which mostly waits on its emulated links).
    reference = Place(ws, ws.root / "fresh", fast).start_run(source, "k9", "--json")

    killed = interrupt_half_way(place, source, "k9", signal.SIGKILL)
    assert killed.code == -signal.SIGKILL
    # The dead run's ready file is left behind: status must not trip over it.
    assert Place(ws, place.data_dir, fast).live_status() == {}

    rerun = place.run(source, "k9", "--json")

    assert rerun.code == 0, rerun.err
    result = rerun.json()
    assert result["status"] == "success"
    resumed, total = result["metrics"]["resumed_chunks"], result["chunks_processed"]
    assert resumed > 0
    fresh = finish(reference)
    assert fresh.code == 0, fresh.err
    assert fresh.json()["chunks_processed"] == total
    fresh_writes = fresh.json()["metrics"]["distribution"]["replica_writes"]
    rerun_writes = result["metrics"]["distribution"]["replica_writes"]
    # The rerun writes only the chunks the killed run had not recorded; it was killed
    # after status showed 40%, so it redoes at most the rest (plus the catalogue's object,
    # and a copy of a chunk the kill caught between its write and its record: on a busy
    # machine a second chunk's worth of slack).
    share_left = (total - resumed) / total
    assert share_left <= 0.75, (resumed, total)
    assert rerun_writes <= fresh_writes * share_left + 6, (rerun_writes, fresh_writes,
                                                           resumed, total)
    place.restore_exact("k9", source, ws.root / "restored")


# -- 5 and 6. SIGTERM / Ctrl-C half-way: interrupted, resumable ------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_stopped_run_is_marked_interrupted_and_resumes(ws: Workspace, fast: Path, slow: Path,
                                                         sig: signal.Signals) -> None:
    source = ws.gen_data("src", "4MiB", seed=7)
    place = Place(ws, ws.root / "data", slow)
    reader = Place(ws, place.data_dir, fast)

    stopped = interrupt_half_way(place, source, "stop", sig)

    assert stopped.code == 128 + sig.value, (stopped.code, stopped.err)
    assert "Traceback" not in stopped.out + stopped.err, stopped.err
    assert f"interrupted ({sig.name})" in stopped.err, stopped.err
    assert "run the same command to resume" in stopped.err, stopped.err
    assert reader.batches() == {"stop": "interrupted"}
    assert not (place.data_dir / "run" / "orchestrator.json").exists()
    incomplete = reader("verify", "stop")
    assert incomplete.code == 1, (incomplete.out, incomplete.err)
    assert "incomplete" in incomplete.out, incomplete.out

    resumed = place.run(source, "stop", "--json")

    assert resumed.code == 0, resumed.err
    assert resumed.json()["metrics"]["resumed_chunks"] > 0
    complete = reader("verify", "stop")
    assert complete.code == 0, (complete.out, complete.err)
    assert "incomplete" not in complete.out


# -- 7. rotten and lost replicas --------------------------------------------------------------


def test_repair_replaces_a_corrupt_and_a_missing_replica(ws: Workspace, fast: Path) -> None:
    source = ws.gen_data("src", "1MiB", seed=8)
    place = Place(ws, ws.root / "data", fast)
    assert place.run(source, "fix").code == 0
    objects = list(place.objects())
    rotten = objects[0]
    lost = next(p for p in objects if p.name != rotten.name)
    with rotten.open("ab") as handle:
        handle.write(b"bit rot")
    lost.unlink()
    assert place("verify", "fix").code == 1

    repaired = place("repair", "fix")

    assert repaired.code == 0, (repaired.out, repaired.err)
    assert "1 missing and 1 corrupt dropped, 2 replica(s) created" in repaired.out, repaired.out
    assert "0 chunk(s) under-replicated, 0 lost" in repaired.out, repaired.out
    verified = place("verify", "fix")
    assert verified.code == 0, verified.out
    everything = place("repair", "--all", "--json")
    assert everything.code == 0, (everything.out, everything.err)
    report = everything.json()
    assert (report["missing"], report["corrupt"], report["under_replicated"]) == (0, 0, 0)
    assert report["replicas_checked"] >= 3 * report["chunks"] > 0


# -- 8. gc: orphans of an interrupted run, bytes of a deleted batch --------------------------


def test_gc_frees_what_an_interrupted_and_deleted_run_left(ws: Workspace, fast: Path,
                                                          slow: Path) -> None:
    source = ws.gen_data("src", "4MiB", seed=9)
    place = Place(ws, ws.root / "data", slow)
    reader = Place(ws, place.data_dir, fast)
    assert interrupt_half_way(place, source, "gone", signal.SIGTERM).code == 143
    deleted = reader("delete", "gone")
    assert deleted.code == 0, deleted.err
    before = reader.objects()
    assert before

    dry = reader("gc", "--dry-run", "--json")

    assert dry.code == 0, dry.err
    assert dry.json()["dry_run"] is True
    assert dry.json()["bytes_freed"] > 0
    assert reader.objects() == before

    collected = reader("gc", "--json")

    assert collected.code == 0, collected.err
    freed = collected.json()["bytes_freed"]
    assert freed == dry.json()["bytes_freed"]
    after = reader.objects()
    assert sum(before.values()) - sum(after.values()) == freed
    assert after == {}, "no batch references anything, yet objects remain"


def test_gc_frees_a_deleted_complete_batch_at_once(ws: Workspace, fast: Path) -> None:
    keep = ws.gen_data("keep", "1MiB", seed=10)
    drop = ws.gen_data("drop", "1MiB", seed=11)
    place = Place(ws, ws.root / "data", fast)
    assert place.run(keep, "keep").code == 0
    assert place.run(drop, "drop").code == 0
    assert place("delete", "drop").code == 0
    before = place.objects()

    # The objects are seconds old, far inside the default grace: with no run in progress
    # nothing unrecorded can be in flight, so they go now.
    collected = place("gc", "--json")

    assert collected.code == 0, collected.err
    freed = collected.json()["bytes_freed"]
    assert freed > 0
    assert sum(before.values()) - sum(place.objects().values()) == freed
    place.restore_exact("keep", keep, ws.root / "restored")


# -- 9. the same batch twice at once ---------------------------------------------------------


def test_a_second_run_of_a_running_batch_names_the_first(ws: Workspace, fast: Path,
                                                         slow: Path) -> None:
    source = ws.gen_data("src", "4MiB", seed=12)
    place = Place(ws, ws.root / "data", slow)
    reader = Place(ws, place.data_dir, fast)
    first = place.start_run(source, "twice")

    def leased() -> bool:
        if first.poll() is not None:
            raise AssertionError(f"the first run ended early: {finish(first).err[-2000:]}")
        if not (reader.data_dir / "manifest.db").exists():
            return False  # before the run opens it, `batches` says no run has happened
        return reader.batches().get("twice") == "running"

    wait_until(leased, PROGRESS_TIMEOUT_S, "the first run to take batch 'twice'")

    second = place.run(source, "twice")

    second.error_line("'twice'", f"pid {first.pid}", f"host {socket.gethostname()}")
    first.send_signal(signal.SIGTERM)
    assert finish(first).code == 143


# -- 10. a full disk -------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of size at path; False when this process may not (not root)."""
    if os.geteuid() != 0:
        return False
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(path)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return False
    return mounted.returncode == 0


@pytest.fixture
def full_disk(ws: Workspace) -> Iterator[tuple[Place, tuple[str, ...]]]:
    """A data dir too small for 20 MiB, with what its error names: an 8 MiB tmpfs when
    this process may mount one, else nodes whose configured capacity is 1 MiB each."""
    data = ws.root / "data"
    data.mkdir()
    if _mount_tmpfs(data, "8m"):
        try:
            yield Place(ws, data, ws.config()), ("disk full", "No space left on device")
        finally:
            subprocess.run(["umount", "-l", str(data)], check=True)
    else:
        yield Place(ws, data, ws.config(node_capacity_gb=0.001)), ("room", "disk full")


def test_a_full_disk_is_one_error_line(ws: Workspace,
                                       full_disk: tuple[Place, tuple[str, ...]]) -> None:
    place, any_of = full_disk
    source = ws.gen_data("src", "20MiB", seed=13)

    line = place.run(source, "big").error_line()

    assert any(needle in line for needle in any_of), line


def test_nodes_at_their_capacity_are_one_error_line(ws: Workspace) -> None:
    place = Place(ws, ws.root / "data", ws.config(node_capacity_gb=0.001))
    source = ws.gen_data("src", "20MiB", seed=14)

    line = place.run(source, "big").error_line()

    assert "room" in line or "disk full" in line, line
