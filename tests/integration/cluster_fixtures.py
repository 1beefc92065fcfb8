"""Real cluster-mode processes for integration tests: a registry and worker nodes on loopback.

`ProcessCluster` starts `multicloud registry` and `multicloud node` as subprocesses (their own
sessions, logs under the data dir), finds them through their ready files, and stops every one
of them in `stop()`: SIGTERM, then SIGKILL after a bounded wait. Every wait polls a condition
(a ready file, the registry's view of a node, a process exiting) against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from multicloud.core.config import IngestionConfig, NodeSpec, PipelineConfig, load_config
from multicloud.pipeline.sources import scan_source

T = TypeVar("T")

HEARTBEAT_S = 0.2
FAILURE_TIMEOUT_S = 1.0
MAX_BODY_MB = 1  # small chunks fit easily; the security test sends 2 MiB
START_TIMEOUT_S = 60.0  # importing the package takes seconds on a busy 2-core box
STOP_GRACE_S = 10.0
POLL_S = 0.05

CLUSTER_YAML = f"""\
service:
  heartbeat_interval_s: {HEARTBEAT_S}
  failure_timeout_s: {FAILURE_TIMEOUT_S}
  max_body_mb: {MAX_BODY_MB}
"""
INGESTION_YAML = "chunk_size_mb: 0.0625\n"  # 64 KiB chunks: every file has several
# The registry's scheduled repairs stay off, so no test sees replicas it did not cause;
# test_anti_entropy drives passes itself.
STORAGE_YAML = "anti_entropy_interval_s: 0\n"


def write_config_dir(path: Path) -> Path:
    """A config dir with fast failure detection, 1 MB bodies and 64 KiB chunks."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "cluster_config.yml").write_text(CLUSTER_YAML)
    (path / "ingestion_config.yml").write_text(INGESTION_YAML)
    (path / "storage_config.yml").write_text(STORAGE_YAML)
    return path


def wait_until(check: Callable[[], T | None], timeout_s: float, what: str,
               on_timeout: Callable[[], str] | None = None) -> T:
    """Poll check() until it returns something truthy; AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{on_timeout()}" if on_timeout is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{detail}")
        time.sleep(POLL_S)


async def eventually(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Async twin of wait_until, for conditions on in-process state (the loop keeps running)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(POLL_S)


def pid_gone(pid: int) -> bool:
    """True once the process no longer exists (reaping it if it is our zombie child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class ProcessCluster:
    """A registry and nodes as real processes under one data dir, for one config dir."""

    def __init__(self, data_dir: Path, config_dir: Path) -> None:
        self.data_dir = data_dir
        self.config_dir = config_dir
        self.config: PipelineConfig = load_config(config_dir)
        self.specs: dict[str, NodeSpec] = {s.id: s for s in self.config.cluster.node_specs()}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.registry_url = ""
        self.registry_port = 0
        self._starts = 0

    # -- starting ------------------------------------------------------------------------

    def start(self) -> None:
        """The registry, then every node of the config; returns once all are healthy."""
        self.start_registry(port=0)
        spawned = {node_id: self._spawn_node(node_id) for node_id in self.specs}
        for node_id, process in spawned.items():
            self.wait_ready(node_id, process)
        self.wait_healthy(set(self.specs))

    def start_registry(self, port: int) -> str:
        """Start `multicloud registry` on port (0: any free one) and wait for its URL."""
        process = self._spawn("registry", ["registry", "--port", str(port)])
        url = self.wait_ready("registry", process)
        self.registry_url = url
        self.registry_port = int(url.rsplit(":", 1)[1])
        return url

    def spawn_registry(self, port: int) -> subprocess.Popen[bytes]:
        """Start the registry without waiting (pair with wait_ready)."""
        return self._spawn("registry", ["registry", "--port", str(port)])

    def start_node(self, node_id: str) -> str:
        """Start one node of the config (again: same id, same data dir) and wait for its URL."""
        return self.wait_ready(node_id, self._spawn_node(node_id))

    def _spawn_node(self, node_id: str) -> subprocess.Popen[bytes]:
        spec = self.specs[node_id]
        return self._spawn(node_id, ["node", "--id", spec.id, "--cloud", spec.cloud,
                                     "--region", spec.region, "--port", "0",
                                     "--registry", self.registry_url])

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        old = self.processes.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.pid})")
        run = self.data_dir / "run"
        run.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        log = run / f"{name}.{self._starts}.log"
        env = {k: v for k, v in os.environ.items() if k != "MULTICLOUD_TOKEN"}
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "multicloud.ui.cli", *args,
                 "--data-dir", str(self.data_dir), "--config-dir", str(self.config_dir)],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env)
        process.log_path = log  # type: ignore[attr-defined]
        self.processes[name] = process
        return process

    def wait_ready(self, name: str, process: subprocess.Popen[bytes],
                   timeout_s: float = START_TIMEOUT_S) -> str:
        """The URL process announces in `<data>/run/<name>.json`, once it does."""
        path = self.data_dir / "run" / f"{name}.json"

        def announced() -> str | None:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode} during start-up:"
                                     f"\n{self.log_tail(name)}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                ready = json.loads(path.read_text())
                if ready.get("pid") == process.pid:
                    return str(ready["url"])
            return None

        return wait_until(announced, timeout_s, f"{name} to announce its URL",
                          lambda: self.log_tail(name))

    # -- looking -------------------------------------------------------------------------

    @property
    def token(self) -> str:
        """The bearer token the registry created."""
        return (self.data_dir / "token").read_text().strip()

    def node_url(self, node_id: str) -> str:
        """The URL a node announced most recently."""
        ready = json.loads((self.data_dir / "run" / f"{node_id}.json").read_text())
        return str(ready["url"])

    def pid(self, name: str) -> int:
        """Pid of the current process called name."""
        return self.processes[name].pid

    def running(self, name: str) -> bool:
        """Whether the process called name is up."""
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def views(self) -> dict[str, dict[str, Any]]:
        """The registry's view of every node by id ({} while the registry is away)."""
        request = urllib.request.Request(f"{self.registry_url}/v1/nodes",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                body = json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return {}
        return {v["id"]: v for v in body["nodes"]}

    def wait_status(self, node_ids: set[str], status: str,
                    timeout_s: float = START_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Wait until the registry reports every node of node_ids with status."""
        def reached() -> dict[str, dict[str, Any]] | None:
            views = self.views()
            if all(views.get(n, {}).get("status") == status for n in node_ids):
                return views
            return None

        return wait_until(reached, timeout_s, f"{sorted(node_ids)} to be {status}",
                          lambda: json.dumps(self.views(), indent=1)[:3000])

    def wait_healthy(self, node_ids: set[str],
                     timeout_s: float = START_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Wait until the registry reports every node of node_ids healthy."""
        return self.wait_status(node_ids, "healthy", timeout_s)

    def store(self, node_id: str) -> Path:
        """A node's chunk store."""
        return self.data_dir / "nodes" / node_id

    def object_path(self, node_id: str, chunk_id: str) -> Path:
        """Where a node keeps the object of chunk_id."""
        return self.store(node_id) / "objects" / chunk_id[:2] / chunk_id[2:4] / chunk_id

    def object_files(self, node_id: str | None = None) -> list[Path]:
        """Every object file in one node's store, or in all of them."""
        stores = [self.store(node_id)] if node_id else sorted(
            (self.data_dir / "nodes").glob("*"))
        return [p for s in stores for p in (s / "objects").glob("*/*/*") if p.is_file()]

    def log_tail(self, name: str, chars: int = 1500) -> str:
        """The end of the current log of the process called name."""
        process = self.processes.get(name)
        path = getattr(process, "log_path", None)
        if path is None:
            return "(no log)"
        return Path(path).read_text(errors="replace")[-chars:]

    # -- stopping ------------------------------------------------------------------------

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send sig to the process called name; returns its pid."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        return process.pid

    def wait_exit(self, name: str, timeout_s: float = STOP_GRACE_S) -> int:
        """Wait for the process called name to exit; its return code."""
        return self.processes[name].wait(timeout=timeout_s)

    def revive(self) -> None:
        """Start again every process that has gone (same ids, same data dir); wait healthy."""
        if not self.running("registry"):
            self.start_registry(self.registry_port)
        dead = [n for n in self.specs if not self.running(n)]
        spawned = {n: self._spawn_node(n) for n in dead}
        for node_id, process in spawned.items():
            self.wait_ready(node_id, process)
        self.wait_healthy(set(self.specs))

    def stop(self) -> None:
        """SIGTERM every process, SIGKILL whatever outlives the grace period, reap all."""
        live = [p for p in self.processes.values() if p.poll() is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in live:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=STOP_GRACE_S)


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Write files (relative path -> bytes) under root; root."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Relative path (forward slashes) -> bytes of every regular file under root, or root."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(source: Path, restored: Path) -> None:
    """Every source file exists under restored with the same bytes, and nothing else does."""
    want, got = tree(source), tree(restored)
    assert sorted(got) == sorted(want)
    different = [path for path in want if got[path] != want[path]]
    assert not different, f"restored files differ from the source: {different[:5]}"


def expected_chunks(source: Path, ingestion: IngestionConfig) -> int:
    """How many chunks fixed-size chunking cuts the files under source into, files below
    `pack_below_mb` packed together in listing order (a pack of one is a chunk alike)."""
    chunks = packs = 0
    packed = ingestion.pack_size_bytes  # as if the last pack were full
    for file in scan_source(source).files:
        if 0 < file.size < ingestion.pack_below_bytes:
            if packed + file.size > ingestion.pack_size_bytes:
                packs, packed = packs + 1, 0
            packed += file.size
        else:
            chunks += math.ceil(file.size / ingestion.chunk_size_bytes)
    return chunks + packs
