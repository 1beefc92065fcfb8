"""The five-minute demo, on the embedded cluster or real processes.

1. Cluster status  2. The pipeline on a 1 GiB dataset  3. Results  4. Failure recovery:
a second batch during which a node fails (marked unhealthy in the embedded cluster; killed
with SIGKILL in cluster mode), finishing anyway, with the lost replicas re-created
5. Final statistics, a verify of every replica and a byte-exact restore check.
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from multicloud.cluster.launcher import cluster_down, cluster_up
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
from multicloud.ui.render import node_table, print_summary, run_with_progress

FAIL_AT_PERCENT = 40.0


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
    data_dir = options.workdir / ("cluster-mode" if options.cluster_mode else "embedded")
    pids: dict[str, int] = {}
    if options.registry_url is not None:
        data_dir = options.data_dir
        registry = await connect_cluster(options.registry_url,
                                         resolve_token(None, data_dir), config.cluster,
                                         data_dir=data_dir)
        pids = _known_pids(data_dir)
        try:
            return await _parts(out, options, config, registry, source / "data", pids)
        finally:
            await registry.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    if options.cluster_mode:
        with out.status("starting the registry and 6 node processes ..."):
            state = await cluster_up(data_dir, options.config_dir, config, registry_port=0,
                                     node_base_port=0)
        pids = {p["name"]: p["pid"] for p in state["processes"]}
        registry = await connect_cluster(state["registry"], resolve_token(None, data_dir),
                                         config.cluster, data_dir=data_dir)
    else:
        registry = create_local_cluster(data_dir, config=config.cluster,
                                        storage=config.storage)
    try:
        return await _parts(out, options, config, registry, source / "data", pids)
    finally:
        await registry.close()
        if options.cluster_mode:
            await asyncio.to_thread(cluster_down, data_dir)


async def _parts(out: Console, options: DemoOptions, config: PipelineConfig,
                 registry: Cluster, source: Path, pids: dict[str, int]) -> bool:
    mode = ("the running cluster at " + options.registry_url if options.registry_url else
            "real processes over HTTP" if options.cluster_mode else "embedded cluster")
    out.print(Rule(f"Multi-Cloud Data Pipeline Orchestrator Demo ({mode})"))

    out.print("\n[bold]1. Cluster status[/bold]")
    out.print(node_table(await registry.report(), f"{len(registry.nodes)} nodes, "
                                                  f"{len(registry.clouds())} clouds"))

    orchestrator = PipelineOrchestrator(registry, config=config)
    try:
        out.print(f"\n[bold]2. Running the pipeline ({format_bytes(_tree_size(source))} "
                  f"test dataset)[/bold]")
        first = await run_with_progress(orchestrator, {"batch_id": "demo-1",
                                                       "data_source": str(source)})
        _require(first)

        out.print("\n[bold]3. Results[/bold]")
        print_summary(out, first)
        _print_stages(out, first)

        out.print("\n[bold]4. Failure recovery[/bold]")
        second = await _failure_run(out, orchestrator, registry, source, options, pids)
        _require(second)
        print_summary(out, second)

        out.print("\n[bold]5. Final statistics[/bold]")
        out.print(node_table(await registry.report(), "nodes after the failure"))
        return await _prove(out, orchestrator, source, options.workdir)
    finally:
        await orchestrator.close()


async def _failure_run(out: Console, orchestrator: PipelineOrchestrator,
                       registry: Cluster, source: Path, options: DemoOptions,
                       pids: dict[str, int]) -> PipelineResult:
    victim = _choose_victim(registry, orchestrator.config, options.victim)
    if victim is None:
        out.print("  skipped: taking a node away would leave fewer healthy nodes or clouds "
                  "than the replication policy needs; start more nodes to see this part")
        return await run_with_progress(orchestrator, {"batch_id": "demo-2",
                                                      "data_source": str(source)})
    failed_at: list[float] = []

    def fail(orch: LiveView) -> None:
        if failed_at or orch.progress_percent < FAIL_AT_PERCENT:
            return
        failed_at.append(time.time())
        if victim.id in pids:
            os.kill(pids[victim.id], signal.SIGKILL)
            out.print(f"  [red]killed {victim.id} (pid {pids[victim.id]}) with SIGKILL at "
                      f"{orch.progress_percent:.0f}%[/red]")
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
                                                        "data_source": str(source)})
    finally:
        remove()
        unsubscribe()
    storage = result.metrics.get("storage", {})
    if failed_at and noticed:
        out.print(f"  detected {noticed[0] - failed_at[0]:.2f}s after the failure")
    repaired = [e for e in result.metrics.get("events", []) if e["kind"] == "repair_done"]
    if failed_at and repaired and storage.get("under_replicated") == 0:
        out.print(f"  every chunk back at {orchestrator.config.distribution.replication_factor} "
                  f"replicas {repaired[-1]['at'] - failed_at[0]:.2f}s after the failure")
    out.print(f"  run finished: {result.status}; node failures handled: "
              f"{result.metrics.get('node_failures_handled', 0)}; replicas re-created by "
              f"repair: {storage.get('replicas_repaired', 0)}; under-replicated chunks: "
              f"{storage.get('under_replicated', '?')}")
    return result


async def _prove(out: Console, orchestrator: PipelineOrchestrator, source: Path,
                 workdir: Path) -> bool:
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
    return ok and same


def _choose_victim(registry: Cluster, config: PipelineConfig,
                   preferred: str) -> WorkerNode | None:
    """A node whose loss still leaves enough nodes and clouds for the policy."""
    dist = config.distribution
    healthy = registry.healthy_nodes()
    candidates = sorted(healthy, key=lambda n: (n.id != preferred, n.id))
    for node in candidates:
        rest = [n for n in healthy if n is not node]
        if len(rest) >= dist.replication_factor and \
                len({n.cloud for n in rest}) >= dist.min_clouds:
            return node
    return None


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
