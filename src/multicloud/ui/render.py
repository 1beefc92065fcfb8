"""Terminal rendering shared by the CLI and the demo: progress bars, summaries, tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from multicloud.core.types import PipelineResult
from multicloud.core.units import format_bytes
from multicloud.run.live import LiveView
from multicloud.run.orchestrator import PipelineOrchestrator


async def run_with_progress(orchestrator: PipelineOrchestrator,
                             batch_config: dict[str, Any]) -> PipelineResult:
    """Run a batch with a progress bar per stage on stderr (cleared when it ends)."""
    console = Console(stderr=True)
    stages = ("ingestion", "processing", "distribution", "storage")
    with Progress(TextColumn("{task.description:<13}"), BarColumn(),
                  TextColumn("{task.percentage:>5.1f}%"),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        tasks: dict[str, TaskID] = {
            s: progress.add_task(s, total=1, detail="") for s in stages}

        def refresh(_: LiveView | None = None) -> None:
            snap = orchestrator.live.snapshot()
            total = max(snap.total_bytes, 1)
            for stage, done in snap.stage_bytes.items():
                progress.update(tasks[stage], total=total, completed=min(done, total),
                                detail=f"{snap.throughput_mb_s:.1f} MB/s")

        remove = orchestrator.add_progress_listener(refresh)
        try:
            result = await orchestrator.run_pipeline(batch_config)
        finally:
            remove()
        refresh()
    return result


def print_summary(console: Console, result: PipelineResult) -> None:
    """The summary table of a successful run (a failed one is the caller's one-line error)."""
    m = result.metrics
    if result.status != "success":
        return
    dist, storage = m["distribution"], m["storage"]
    table = Table(title=f"batch {result.batch_id}: success", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    mb_s = result.bytes_processed / 1e6 / max(result.duration_seconds, 1e-9)
    rows = [
        ("files / chunks", f"{result.files} / {result.chunks_processed}"),
        ("bytes", format_bytes(result.bytes_processed)),
        ("duration", f"{result.duration_seconds:.2f} s"),
        ("throughput", f"{mb_s:.1f} MB/s"),
        ("replicas by cloud", ", ".join(
            f"{cloud}: {u['replicas']} ({format_bytes(u['bytes'])})"
            for cloud, u in storage["by_cloud"].items())),
        ("cross-cloud transfers", f"{dist['cross_cloud_transfers']} "
                                  f"({format_bytes(dist['cross_cloud_bytes'])})"),
        ("egress cost", f"${dist['egress_cost_usd']:.4f}"),
        ("replica success rate", f"{dist['replica_success_rate']:.4f}"),
        ("under-replicated", str(storage["under_replicated"])),
        ("failures handled", str(m["node_failures_handled"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def node_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Nodes by cloud: health, chunks and bytes stored."""
    table = Table(title=title)
    for column in ("node", "cloud", "region", "status", "chunks", "stored"):
        table.add_column(column)
    for row in sorted(rows, key=lambda r: (r["cloud"], r["id"])):
        colour = "green" if row["status"] == "healthy" else "red"
        table.add_row(row["id"], row["cloud"], row["region"],
                      f"[{colour}]{row['status']}[/{colour}]", str(row["chunks"]),
                      format_bytes(row["bytes"]))
    return table
