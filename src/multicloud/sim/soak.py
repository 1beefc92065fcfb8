"""The soak: the simulator's seeded schedules against real processes, in real time.

`ProcessWorld` plays a scenario like the embedded `World` and checks the same invariants,
but its cluster is a `multicloud registry` and one `multicloud node` process per node on
127.0.0.1, reached over HTTP, and its faults are the real thing: a crash is SIGKILL, a
restart starts the node process again (on its disk, or on an empty one), a hang is
SIGSTOP (SIGCONT when healed), the registry is killed and started again on its port,
and partitions, bit rot, lost replicas, crashes in a write and full disks go through
the nodes' fault API (`--allow-faults`). The orchestrators run in this process, so a
killed one is abandoned as in the simulation.

A soak seed takes tens of seconds (processes start, failures are detected by
heartbeats), so `make soak` runs a handful; it is not part of `make test`, which plays
one short soak seed to keep this code honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import yaml

from multicloud.cluster.launcher import (
    ManagedProcess,
    alive,
    cluster_up,
    start_node,
    start_registry,
    state_path,
    stop_processes,
    wait_ready,
)
from multicloud.cluster.remote import connect_cluster
from multicloud.comm.cluster import Cluster
from multicloud.core.auth import resolve_token
from multicloud.core.errors import MulticloudError
from multicloud.sim.invariants import InvariantViolated
from multicloud.sim.scenario import Scenario, Step, scenario
from multicloud.sim.world import World

__all__ = ["ProcessWorld", "soak_scenario"]

_HEARTBEAT_S = 0.2
_FAILURE_TIMEOUT_S = 1.0
_COMMAND_TIMEOUT_S = 300.0  # a command that takes longer hangs: a liveness failure
_START_TIMEOUT_S = 90.0  # importing the package takes seconds on a busy 2-core box


def soak_scenario(seed: int, ops: int) -> Scenario:
    """The seed's scenario with what only processes can suffer mixed in: some crashes
    become hangs (SIGSTOP), and the registry is restarted once or twice."""
    plan = scenario(seed, ops)
    rng = random.Random(f"multicloud-soak/{seed}")
    steps = [replace(s, kind="hang") if s.kind == "crash" and rng.random() < 0.3 else s
             for s in plan.steps]
    for _ in range(rng.randint(1, 2)):
        steps.insert(rng.randint(1, len(steps)), Step("registry_restart"))
    return replace(plan, steps=tuple(steps))


class ProcessWorld(World):
    """A World whose cluster is real processes, faulted with real signals."""

    def __init__(self, plan: Scenario, root: Path, *, quorum_override: int | None = None,
                 time_scale: float = 0.02) -> None:
        super().__init__(plan, root, quorum_override=quorum_override)
        self.config = self.config.replace(cluster={
            **self.config.cluster.model_dump(), "time_scale": time_scale,
            "service": {"heartbeat_interval_s": _HEARTBEAT_S,
                        "failure_timeout_s": _FAILURE_TIMEOUT_S, "registry_port": 0,
                        "node_base_port": 0}},
            storage={"fsync": False, "anti_entropy_interval_s": 0})
        self.config_dir = root / "config"
        self._processes: dict[str, ManagedProcess] = {}
        self._killed_nodes: set[str] = set()
        self._hung: set[str] = set()
        self._soft_down: set[str] = set()  # crashed in a write: the process lives on
        self._registry_port = 0

    # -- the cluster ------------------------------------------------------------------------

    async def open_cluster(self) -> Cluster:
        self._write_config()
        state = await cluster_up(self.data, self.config_dir, self.config,
                                 registry_port=0, node_base_port=0,
                                 timeout_s=_START_TIMEOUT_S, allow_faults=True)
        self._processes = {p["name"]: ManagedProcess(**p) for p in state["processes"]}
        url = state["registry"]
        self._registry_port = int(url.rsplit(":", 1)[1])
        try:
            token = resolve_token(None, self.data)
            return await connect_cluster(url, token, self.config.cluster, data_dir=self.data)
        except BaseException:
            await self._stop_processes()
            raise

    async def close_cluster(self) -> None:
        try:
            await self.cluster.close()
        finally:
            await self._stop_processes()

    async def _stop_processes(self) -> None:
        """Every process this soak started, restarts included (`cluster down` knows only
        the first ones); a hung one is woken first, so it can hear SIGTERM."""
        for node_id in sorted(self._hung):
            self._signal(node_id, signal.SIGCONT)
        await asyncio.to_thread(stop_processes, list(self._processes.values()), 5.0)
        state_path(self.data).unlink(missing_ok=True)

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        for section in ("cluster", "ingestion", "processing", "distribution", "storage"):
            model = getattr(self.config, section)
            (self.config_dir / f"{section}_config.yml").write_text(
                yaml.safe_dump(model.model_dump(mode="json")))

    @property
    def crashed(self) -> set[str]:
        return self._killed_nodes | self._hung | self._soft_down

    async def observe(self) -> None:
        """Learn which live nodes crashed themselves in a write (their fault state)."""
        for node_id in sorted(set(self.scenario.shape.node_ids) - self._killed_nodes
                              - self._hung):
            with contextlib.suppress(MulticloudError):
                if (await self.cluster.faults.state(node_id)).get("crashed"):
                    self._soft_down.add(node_id)

    async def crash(self, node_id: str) -> None:
        """SIGKILL: the process dies at once, its disk stays."""
        self._signal(node_id, signal.SIGKILL)
        await self._until(lambda: not alive(self._processes[node_id].pid), f"{node_id} dies")
        self._killed_nodes.add(node_id)

    async def restart(self, node_id: str, new_disk: bool) -> None:
        """The node comes back: the same process (a crash in a write), or a new one, on
        its disk or an empty one."""
        if node_id in self._hung:
            self._signal(node_id, signal.SIGCONT)
            self._hung.discard(node_id)
            if not new_disk:
                return
            await self.crash(node_id)
        if node_id in self._soft_down and not new_disk:
            await self.cluster.faults.restart(node_id)
            self._soft_down.discard(node_id)
            return
        if node_id not in self._killed_nodes:
            await self.crash(node_id)
        if new_disk:
            for chunk_id in sorted(self.census().on_node(node_id)):
                self.model.harm(chunk_id, node_id)
            shutil.rmtree(self.store_dirs()[node_id], ignore_errors=True)
            self.count("new disks")
        spec = next(s for s in self.config.cluster.node_specs() if s.id == node_id)
        registry = f"http://127.0.0.1:{self._registry_port}"
        process = start_node(self.data, self.config_dir, node_id, spec.cloud, spec.region,
                             registry, allow_faults=True)
        self._processes[node_id] = process  # stopped at the end even if it never serves
        url = await wait_ready(self.data, process, _START_TIMEOUT_S)
        self._processes[node_id] = replace(process, url=url)
        self._killed_nodes.discard(node_id)
        self._soft_down.discard(node_id)
        await self._until(lambda: self.cluster.get(node_id).url == url,
                          f"the registry to know {node_id} at {url}")

    async def _heal(self) -> None:
        """A hung node is woken first: the network's heal is told to every node."""
        if self.step_index == -1:
            for node_id in sorted(self._hung):
                self._signal(node_id, signal.SIGCONT)
            self._hung.clear()
        await super()._heal()

    async def heal_nodes(self) -> None:
        if not alive(self._processes["registry"].pid):
            await self._restart_registry()
        for node_id in sorted(self.crashed):
            await self.restart(node_id, new_disk=False)
        for node_id in sorted(self.scenario.shape.node_ids):
            await self.cluster.faults.disarm(node_id)
            await self.cluster.faults.disk_full(node_id, False)

    # -- what only processes suffer ---------------------------------------------------------

    async def _strike_fault(self, step: Step) -> str:
        if step.kind == "hang":
            if step.node in self.crashed:
                return "already down"
            self._signal(step.node, signal.SIGSTOP)
            self._hung.add(step.node)
            return "stopped"
        if step.kind == "registry_restart":
            await self._restart_registry()
            return "registry back"
        return await super()._strike_fault(step)

    async def _restart_registry(self) -> None:
        process = self._processes["registry"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        await self._until(lambda: not alive(process.pid), "the registry dies")
        fresh = start_registry(self.data, self.config_dir, self._registry_port)
        self._processes["registry"] = fresh  # stopped at the end even if it never serves
        url = await wait_ready(self.data, fresh, _START_TIMEOUT_S)
        self._processes["registry"] = replace(fresh, url=url)

    async def _command(self, step: Step, *, checked: bool) -> str:
        await self.observe()
        try:
            async with asyncio.timeout(_COMMAND_TIMEOUT_S):
                return await super()._command(step, checked=checked)
        except TimeoutError:
            raise InvariantViolated(7, f"{step.describe()} hung for {_COMMAND_TIMEOUT_S:.0f}s"
                                    ) from None

    # -- helpers ------------------------------------------------------------------------------

    def _signal(self, node_id: str, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._processes[node_id].pid, sig)

    @staticmethod
    async def _until(condition: Callable[[], bool], what: str,
                     timeout_s: float = _START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise InvariantViolated(7, f"timed out after {timeout_s:.0f}s waiting for "
                                           f"{what}")
            await asyncio.sleep(0.05)

