"""`multicloud cluster up|down|status`: the registry and the config's nodes as processes.

`up` generates the cluster token, starts `multicloud registry` and one `multicloud node` per
node of `cluster_config.yml` in the background (their own sessions, so they outlive the
command), and returns once the registry reports every node healthy. Pids, URLs and logs are
under `<data_dir>/run/`. `down` sends SIGTERM (nodes drain their writes), waits, and
SIGKILLs whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from multicloud.control.membership import fetch_nodes
from multicloud.core.auth import generate_token
from multicloud.core.config import PipelineConfig
from multicloud.core.errors import ClusterError
from multicloud.core.host import process_alive
from multicloud.core.runfiles import ready_file

STATE_FILE = "cluster.json"
_POLL_S = 0.05  # how often to look again while waiting for a condition


@dataclass(frozen=True)
class ManagedProcess:
    """A process `cluster up` started."""

    name: str
    pid: int
    log: str
    url: str = ""


def state_path(data_dir: str | Path) -> Path:
    """Where `cluster up` records what it started."""
    return Path(data_dir) / "run" / STATE_FILE


def read_state(data_dir: str | Path) -> dict[str, Any] | None:
    """What `cluster up` recorded, or None when no cluster was started here."""
    path = state_path(data_dir)
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def alive(pid: int) -> bool:
    """Whether a process exists (and is not a zombie we could reap)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass  # not our child: fall back to signal 0
    return process_alive(pid)


async def cluster_up(data_dir: str | Path, config_dir: str | Path, config: PipelineConfig,
                     *, registry_port: int | None = None, node_base_port: int | None = None,
                     timeout_s: float = 60.0, allow_faults: bool = False) -> dict[str, Any]:
    """Start the registry and the nodes; return the recorded state once all are healthy.

    allow_faults: the nodes take fault requests (the soak's crashes, partitions...)."""
    data = Path(data_dir)
    existing = read_state(data)
    if existing is not None and any(alive(p["pid"]) for p in existing["processes"]):
        raise ClusterError(f"a cluster is already up with data dir {data} (registry "
                           f"{existing['registry']}): run `multicloud cluster down` first")
    run_dir = data / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob("*.json"):
        stale.unlink()
    token = generate_token(data)
    service = config.cluster.service
    reg_port = service.registry_port if registry_port is None else registry_port
    base = service.node_base_port if node_base_port is None else node_base_port
    deadline = time.monotonic() + timeout_s
    started: list[ManagedProcess] = []
    try:
        registry = start_registry(data, config_dir, reg_port)
        started.append(registry)
        url = await _wait_ready(data, registry, deadline)
        started[0] = ManagedProcess(registry.name, registry.pid, registry.log, url)
        specs = config.cluster.node_specs()
        for i, spec in enumerate(specs):
            started.append(start_node(data, config_dir, spec.id, spec.cloud, spec.region, url,
                                      port=base + i if base else 0,
                                      allow_faults=allow_faults))
        nodes = [await _wait_ready(data, p, deadline) for p in started[1:]]
        started[1:] = [ManagedProcess(p.name, p.pid, p.log, u)
                       for p, u in zip(started[1:], nodes, strict=True)]
        await _wait_healthy(url, token, {s.id for s in specs}, deadline)
    except BaseException:
        stop_processes(started, grace_s=5.0)
        raise
    state = {"registry": url, "data_dir": str(data),
             "processes": [asdict(p) for p in started]}
    tmp = state_path(data).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_path(data))
    return state


def cluster_down(data_dir: str | Path, grace_s: float = 20.0) -> list[str]:
    """Stop what `cluster up` started; returns the names stopped."""
    state = read_state(data_dir)
    if state is None:
        raise ClusterError(f"no cluster was started with data dir {data_dir} "
                           f"(no {state_path(data_dir)})")
    processes = [ManagedProcess(**p) for p in state["processes"]]
    # Nodes first, so they can still reach the registry while they drain.
    stop_processes(processes[1:] + processes[:1], grace_s)
    state_path(data_dir).unlink(missing_ok=True)
    return [p.name for p in processes]


def start_node(data_dir: str | Path, config_dir: str | Path, node_id: str, cloud: str,
               region: str, registry_url: str, *, port: int = 0,
               allow_faults: bool = False) -> ManagedProcess:
    """Start one `multicloud node` process in the background, logging to
    `<data_dir>/run/<node_id>.log` (how `cluster up` starts each node, and how a node it
    started is started again with its data)."""
    return _spawn(Path(data_dir), config_dir, node_id, [
        "node", "--id", node_id, "--cloud", cloud, "--region", region, "--port", str(port),
        "--registry", registry_url, *(["--allow-faults"] if allow_faults else [])])


def start_registry(data_dir: str | Path, config_dir: str | Path, port: int) -> ManagedProcess:
    """Start `multicloud registry` in the background on port (0: a free one), logging to
    `<data_dir>/run/registry.log`."""
    return _spawn(Path(data_dir), config_dir, "registry", ["registry", "--port", str(port)])


async def wait_ready(data_dir: str | Path, process: ManagedProcess,
                     timeout_s: float = 60.0) -> str:
    """The URL a process started here announces once it serves (ClusterError if it exits
    or takes longer than timeout_s)."""
    return await _wait_ready(Path(data_dir), process, time.monotonic() + timeout_s)


def _spawn(data: Path, config_dir: str | Path, name: str, args: list[str]) -> ManagedProcess:
    log = data / "run" / f"{name}.log"
    with log.open("ab") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "multicloud.ui.cli", *args, "--data-dir", str(data),
             "--config-dir", str(config_dir)],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    return ManagedProcess(name, child.pid, str(log))


async def _wait_ready(data: Path, process: ManagedProcess, deadline: float) -> str:
    """The URL a process announces in its ready file, once it has."""
    path = ready_file(data, process.name)
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            ready = json.loads(await asyncio.to_thread(path.read_text))
            if ready.get("pid") == process.pid:
                return str(ready["url"])
        if not alive(process.pid):
            log = await asyncio.to_thread(Path(process.log).read_text, errors="replace")
            tail = log[-800:]
            raise ClusterError(f"{process.name} exited during start-up; its log "
                               f"({process.log}) ends with:\n{tail}")
        await asyncio.sleep(_POLL_S)
    raise ClusterError(f"{process.name} did not start within the timeout; see {process.log}")


async def _wait_healthy(url: str, token: str, ids: set[str], deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(ClusterError):
            views = await fetch_nodes(url, token)
            healthy = {v["id"] for v in views if v["status"] == "healthy"}
            if ids <= healthy:
                return
        await asyncio.sleep(_POLL_S)
    raise ClusterError(f"not every node became healthy within the timeout (wanted "
                       f"{', '.join(sorted(ids))})")


def stop_processes(processes: list[ManagedProcess], grace_s: float) -> None:
    """SIGTERM the processes (they drain), wait up to grace_s, SIGKILL what is left."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        while alive(process.pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if alive(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
