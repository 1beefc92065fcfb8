"""The five-minute demo, on the embedded cluster or real processes.

1. Cluster status  2. The pipeline on a 1 GiB dataset  3. Results  4. Failure recovery:
a second batch during which a node fails (marked unhealthy in the embedded cluster; killed
with SIGKILL in cluster mode), finishing anyway, with the lost replicas re-created
5. Final statistics, a verify of every replica and a byte-exact restore check.

A node can fail as long as write_quorum nodes are left. With nodes to spare (six), repair
re-creates the lost replicas elsewhere during the run. With three nodes for three
replicas, the batch commits at quorum with its chunks under-replicated and hinted; then
the node comes back (marked healthy again, restarted if the demo started it, or restarted
by the user in its terminal) and a hint replay brings every chunk back to the factor.
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from multicloud.cluster.launcher import (
    ManagedProcess,
    cluster_down,
    cluster_up,
    start_node,
    stop_processes,
)
from multicloud.cluster.local import create_local_cluster
from multicloud.cluster.remote import connect_cluster
from multicloud.comm.cluster import Cluster
from multicloud.control.registry import WorkerNode
from multicloud.core.auth import resolve_token
from multicloud.core.config import PipelineConfig, load_config
from multicloud.core.errors import MulticloudError
from multicloud.core.types import NodeStatus, PipelineResult
from multicloud.core.units import format_bytes
from multicloud.datagen import generate_dataset
from multicloud.run.live import LiveView
from multicloud.run.orchestrator import PipelineOrchestrator
from multicloud.ui.demo_clouds import bucket_matches, cloud_stage
from multicloud.ui.render import node_table, print_summary, run_with_progress

FAIL_AT_PERCENT = 40.0
STOP_GRACE_S = 10.0  # how long a node the demo restarted gets to drain when it ends
PING_AGAIN_S = 0.1  # how soon to ask again a node that is back but not yet listening


@dataclass
class DemoOptions:
    """What the demo runs on."""

    workdir: Path
    config_dir: Path
    size: int
    cluster_mode: bool = False
    registry_url: str | None = None  # an already running cluster (docs/setup.md)
    data_dir: Path = Path(".multicloud")  # its token, ready files, and our manifest
    victim: str = "aws-node-2"
    rejoin_timeout_s: float = 120.0  # how long to wait for a stopped node to come back
    clouds: bool = False  # S3/GCS/Azure emulators: source and replicas in buckets


@dataclass
class _Nodes:
    """How the demo takes a node away and brings it back, by who started the cluster."""

    pids: dict[str, int] = field(default_factory=dict)  # nodes it may SIGKILL
    # Where to restart a killed node: the registry URL and data dir of a cluster the demo
    # started itself; None for the embedded cluster or one the user started.
    restart_at: tuple[str, Path] | None = None
    restarted: list[ManagedProcess] = field(default_factory=list)


async def run_demo(options: DemoOptions, console: Console | None = None) -> bool:
    """Run the five parts; True when every check passed."""
    out = console or Console()
    config = load_config(options.config_dir)
    source = options.workdir / "aws_s3_bucket"
    if not (source / ".complete").exists():
        shutil.rmtree(source, ignore_errors=True)
        with out.status(f"generating a {format_bytes(options.size)} dataset in {source} ..."):
            await asyncio.to_thread(generate_dataset, source / "data", options.size)
        (source / ".complete").write_text("")
    if options.clouds:
        return await _cloud_demo(out, options, config, source / "data")
    data_dir = options.workdir / ("cluster-mode" if options.cluster_mode else "embedded")
    nodes = _Nodes()
    if options.registry_url is not None:
        data_dir = options.data_dir
        registry = await connect_cluster(options.registry_url,
                                         resolve_token(None, data_dir), config.cluster,
                                         data_dir=data_dir)
        nodes.pids = _known_pids(data_dir)
        try:
            return await _parts(out, options, config, registry, source / "data", nodes)
        finally:
            await registry.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    if options.cluster_mode:
        count = len(config.cluster.node_specs())
        with out.status(f"starting the registry and {count} node processes ..."):
            state = await cluster_up(data_dir, options.config_dir, config, registry_port=0,
                                     node_base_port=0)
        nodes.pids = {p["name"]: p["pid"] for p in state["processes"]}
        nodes.restart_at = (state["registry"], data_dir)
        registry = await connect_cluster(state["registry"], resolve_token(None, data_dir),
                                         config.cluster, data_dir=data_dir)
    else:
        registry = create_local_cluster(data_dir, config=config.cluster,
                                        storage=config.storage)
    try:
        return await _parts(out, options, config, registry, source / "data", nodes)
    finally:
        await registry.close()
        if options.cluster_mode:
            await asyncio.to_thread(stop_processes, nodes.restarted, STOP_GRACE_S)
            await asyncio.to_thread(cluster_down, data_dir)


async def _cloud_demo(out: Console, options: DemoOptions, config: PipelineConfig,
                      dataset: Path) -> bool:
    """The five parts with the source and every replica in (emulated) buckets."""
    data_dir = options.workdir / "clouds"
    shutil.rmtree(data_dir, ignore_errors=True)
    async with cloud_stage(out, options.workdir, dataset, config) as stage:
        registry = create_local_cluster(data_dir, config=stage.config.cluster,
                                        storage=stage.config.storage)
        try:
            return await _parts(out, options, stage.config, registry, dataset, _Nodes(),
                                source_url=stage.source_url, restore_url=stage.restore_url)
        finally:
            await registry.close()


async def _parts(out: Console, options: DemoOptions, config: PipelineConfig,
                 registry: Cluster, local: Path, nodes: _Nodes, *,
                 source_url: str | None = None, restore_url: str | None = None) -> bool:
    """The five parts; the source is `local`, or the bucket at source_url holding a copy
    of it (restore_url: a bucket to restore into as well as a folder)."""
    source = source_url or str(local)
    mode = ("the running cluster at " + options.registry_url if options.registry_url else
            "S3, GCS and Azure Blob emulators" if source_url else
            "real processes over HTTP" if options.cluster_mode else "embedded cluster")
    out.print(Rule(f"Multi-Cloud Data Pipeline Orchestrator Demo ({mode})"))

    out.print("\n[bold]1. Cluster status[/bold]")
    out.print(node_table(await registry.report(), f"{len(registry.nodes)} nodes, "
                                                  f"{len(registry.clouds())} clouds"))

    orchestrator = PipelineOrchestrator(registry, config=config)
    try:
        out.print(f"\n[bold]2. Running the pipeline ({format_bytes(_tree_size(local))} "
                  f"test dataset from {source})[/bold]")
        first = await run_with_progress(orchestrator, {"batch_id": "demo-1",
                                                       "data_source": source})
        _require(first)

        out.print("\n[bold]3. Results[/bold]")
        print_summary(out, first)
        _print_stages(out, first)

        out.print("\n[bold]4. Failure recovery[/bold]")
        second, victim = await _failure_run(out, orchestrator, registry, source, options,
                                            nodes)
        _require(second)
        print_summary(out, second)
        if victim is not None and second.metrics["storage"]["under_replicated"]:
            await _rejoin(out, orchestrator, registry, victim, options, nodes)

        out.print("\n[bold]5. Final statistics[/bold]")
        out.print(node_table(await registry.report(), "nodes after the failure"))
        return await _prove(out, orchestrator, local, options.workdir, restore_url)
    finally:
        await orchestrator.close()


async def _failure_run(out: Console, orchestrator: PipelineOrchestrator,
                       registry: Cluster, source: str, options: DemoOptions,
                       nodes: _Nodes) -> tuple[PipelineResult, WorkerNode | None]:
    """The second batch, with a node failing at FAIL_AT_PERCENT; the result and the node."""
    dist = orchestrator.config.distribution
    victim, spare = _choose_victim(registry, orchestrator.config, options.victim)
    if victim is None:
        out.print(f"  skipped: taking a node away would leave fewer healthy nodes than "
                  f"write_quorum ({dist.write_quorum}); start more nodes to see this part")
        return await run_with_progress(orchestrator, {"batch_id": "demo-2",
                                                      "data_source": source}), None
    if not spare:
        left = len(registry.healthy_nodes()) - 1
        out.print(f"  without {victim.id}, {left} node(s) are left for {dist.replication_factor} "
                  f"replicas: fewer than the replication factor, not fewer than the write "
                  f"quorum ({dist.write_quorum}), so the batch goes on and every chunk short of "
                  f"{dist.replication_factor} is hinted until the node is back")
    failed_at: list[float] = []

    def fail(orch: LiveView) -> None:
        if failed_at or orch.progress_percent < FAIL_AT_PERCENT:
            return
        failed_at.append(time.time())
        if victim.id in nodes.pids:
            os.kill(nodes.pids[victim.id], signal.SIGKILL)
            out.print(f"  [red]killed {victim.id} (pid {nodes.pids[victim.id]}) with SIGKILL "
                      f"at {orch.progress_percent:.0f}%[/red]")
        else:
            out.print(f"  [red]marking {victim.id} unhealthy at {orch.progress_percent:.0f}%[/red]")
            victim.status = "unhealthy"

    noticed: list[float] = []

    def watch(node: Any, old: NodeStatus, reason: str) -> None:
        if node.id == victim.id and node.status is NodeStatus.UNHEALTHY and failed_at:
            noticed.append(time.time())
            out.print(f"  failure detected: {node.id} is unhealthy ({reason})")

    unsubscribe = registry.subscribe(watch)
    remove = orchestrator.add_progress_listener(fail)
    try:
        result = await run_with_progress(orchestrator, {"batch_id": "demo-2",
                                                        "data_source": source})
    finally:
        remove()
        unsubscribe()
    storage = result.metrics.get("storage", {})
    if failed_at and noticed:
        out.print(f"  detected {noticed[0] - failed_at[0]:.2f}s after the failure")
    repaired = [e for e in result.metrics.get("events", []) if e["kind"] == "repair_done"]
    if failed_at and repaired and storage.get("under_replicated") == 0:
        out.print(f"  every chunk back at {dist.replication_factor} "
                  f"replicas {repaired[-1]['at'] - failed_at[0]:.2f}s after the failure")
    out.print(f"  run finished: {result.status}; node failures handled: "
              f"{result.metrics.get('node_failures_handled', 0)}; replicas re-created by "
              f"repair: {storage.get('replicas_repaired', 0)}; under-replicated chunks: "
              f"{storage.get('under_replicated', '?')}")
    return result, victim if failed_at else None


async def _rejoin(out: Console, orchestrator: PipelineOrchestrator, registry: Cluster,
                  victim: WorkerNode, options: DemoOptions, nodes: _Nodes) -> None:
    """Bring the failed node back and replay the hints: every chunk back at the factor."""
    rf = orchestrator.config.distribution.replication_factor
    manifest = orchestrator.storage_manager.manifest
    hinted = await asyncio.to_thread(manifest.hints)
    out.print(f"  hints kept for {len(hinted)} chunk(s) (chunk id, the node that should hold "
              f"it, or * for any node)")
    if victim.id not in nodes.pids:  # the embedded cluster: the node was only marked down
        out.print(f"  [green]{victim.id} is back[/green]")
        victim.status = "healthy"
        back = True
    elif nodes.restart_at is not None:  # a node process the demo started: start it again
        url, data_dir = nodes.restart_at
        process = start_node(data_dir, options.config_dir, victim.id, victim.cloud,
                             victim.region, url)
        nodes.restarted.append(process)
        out.print(f"  restarting {victim.id} with its data (pid {process.pid}) ...")
        back = await _back(registry, victim.id, options.rejoin_timeout_s)
    else:  # the user's own terminal: only the user can start it again
        out.print(f"  [bold]start {victim.id} again in its terminal:[/bold] "
                  f"CLOUD_PROVIDER={victim.cloud} multicloud node --id {victim.id} "
                  f"(waiting up to {options.rejoin_timeout_s:.0f}s; the hints are replayed "
                  f"as soon as it is back)")
        back = await _back(registry, victim.id, options.rejoin_timeout_s)
    if not back:
        cluster = f" --cluster {options.registry_url}" if options.registry_url else ""
        out.print(f"  {victim.id} is not back: the hints stay in the manifest. Start it (or "
                  f"any new node) and run `multicloud repair{cluster}` to bring every chunk "
                  f"back to {rf} replicas")
        return
    report = await orchestrator.repairer.replay_hints()
    ids = await asyncio.to_thread(manifest.chunk_ids, "demo-2")
    holders = await asyncio.to_thread(manifest.replicas, ids)
    whole = sum(1 for c in ids
                if sum(1 for n in holders[c] if n in registry.nodes
                       and registry.nodes[n].healthy) >= rf)
    left = await asyncio.to_thread(manifest.hints)
    # A node that comes back with its disk already holds what it had before it failed
    # (here all of demo-1, which demo-2 shares): only what it missed is copied.
    kept = (f" (the rest were still on {victim.id}'s disk)"
            if report.replicas_created < len(hinted) else "")
    out.print(f"  hints replayed: {report.hints_replayed} hint(s) done, "
              f"{report.replicas_created} replica(s) written{kept}, {len(left)} chunk(s) still "
              f"hinted; chunks of demo-2 at {rf} healthy replicas: {whole}/{len(ids)}")


async def _back(registry: Cluster, node_id: str, timeout_s: float) -> bool:
    """Wait until node_id is healthy again and answers; False after timeout_s."""
    back = asyncio.Event()

    def watch(changed: WorkerNode, old: NodeStatus, reason: str) -> None:
        if changed.id == node_id and changed.healthy:
            back.set()

    unsubscribe = registry.subscribe(watch)
    try:
        async with asyncio.timeout(timeout_s):
            node = registry.nodes.get(node_id)
            if node is None or not node.healthy:
                await back.wait()
            # A node process registers (and so turns healthy) a moment before it listens:
            # hints replayed to it then would fail, so wait until it answers.
            while True:
                try:
                    await registry.client.ping(registry.nodes[node_id])
                    return True
                except MulticloudError:
                    await asyncio.sleep(PING_AGAIN_S)
    except TimeoutError:
        return False
    finally:
        unsubscribe()


async def _prove(out: Console, orchestrator: PipelineOrchestrator, source: Path,
                 workdir: Path, restore_url: str | None = None) -> bool:
    ok = True
    for batch in ("demo-1", "demo-2"):
        report = await orchestrator.verify_batch(batch)
        unavailable = [p for p in report.problems if p.problem == "unavailable"]
        real = [p for p in report.problems if p.problem != "unavailable"]
        out.print(f"  verify {batch}: {report.replicas_ok}/{report.replicas_checked} replicas "
                  f"ok, {len(unavailable)} on the failed node, {len(real)} missing or corrupt")
        ok = ok and not real
    dest = workdir / "restored"
    shutil.rmtree(dest, ignore_errors=True)
    restored = await orchestrator.restore_batch("demo-2", dest)
    same = await asyncio.to_thread(_same_tree, source, dest)
    out.print(f"  restore demo-2: {restored.files_restored} files, "
              f"{format_bytes(restored.bytes_restored)}, byte-identical to the source: "
              f"{'[green]yes[/green]' if same else '[red]NO[/red]'}")
    if restore_url is not None:
        into = await orchestrator.restore_batch("demo-2", restore_url)
        matches = await asyncio.to_thread(bucket_matches, restore_url, source)
        out.print(f"  restore demo-2 into {restore_url}: {into.files_restored} objects, "
                  f"{format_bytes(into.bytes_restored)}, byte-identical to the source: "
                  f"{'[green]yes[/green]' if matches else '[red]NO[/red]'}")
        same = same and matches
    return ok and same


def _choose_victim(registry: Cluster, config: PipelineConfig,
                   preferred: str) -> tuple[WorkerNode | None, bool]:
    """A node the batch can lose, and whether the full policy still holds without it.

    First a node whose loss leaves replication_factor nodes over min_clouds clouds (repair
    re-creates its replicas elsewhere at once); else one whose loss leaves write_quorum
    nodes, in every cloud if possible (the batch commits at quorum, hinted); else None.
    """
    dist = config.distribution
    healthy = registry.healthy_nodes()
    clouds = {n.cloud for n in healthy}
    candidates = sorted(healthy, key=lambda n: (n.id != preferred, n.id))

    def rest(node: WorkerNode) -> list[WorkerNode]:
        return [n for n in healthy if n is not node]

    for node in candidates:
        left = rest(node)
        if len(left) >= dist.replication_factor and \
                len({n.cloud for n in left}) >= dist.min_clouds:
            return node, True
    quorate = [n for n in candidates if len(rest(n)) >= dist.write_quorum]
    spread = [n for n in quorate if {m.cloud for m in rest(n)} == clouds]
    return ((spread or quorate)[0], False) if quorate else (None, False)


def _known_pids(data_dir: Path) -> dict[str, int]:
    """Pids of nodes started with this data dir, from their ready files."""
    pids = {}
    for ready in (data_dir / "run").glob("*.json"):
        try:
            info = json.loads(ready.read_text())
            pids[str(info["name"])] = int(info["pid"])
        except (OSError, ValueError, KeyError):
            continue
    return pids


def _print_stages(out: Console, result: PipelineResult) -> None:
    breakdown: dict[str, float] = result.metrics.get("stage_breakdown_s", {})
    total = sum(breakdown.values()) or 1.0
    table = Table(title="stage busy time (stages overlap)")
    table.add_column("stage")
    table.add_column("busy", justify="right")
    table.add_column("share", justify="right")
    for stage, seconds in breakdown.items():
        table.add_row(stage, f"{seconds:.2f} s", f"{100 * seconds / total:.0f}%")
    out.print(table)


def _require(result: PipelineResult) -> None:
    if result.status != "success":
        raise MulticloudError(f"demo batch {result.batch_id} failed: {result.error}")


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _same_tree(a: Path, b: Path) -> bool:
    compare = filecmp.dircmp(a, b)
    if compare.left_only or compare.right_only or compare.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, compare.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(a / d, b / d) for d in compare.common_dirs)
