"""Terminal rendering shared by the CLI and the demo: progress bars, summaries, tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from multicloud.core.types import PipelineResult
from multicloud.core.units import display_path, format_bytes
from multicloud.run.live import LiveView
from multicloud.run.orchestrator import PipelineOrchestrator

QUARANTINED_SHOWN = 3  # quarantined files named in the summary; the rest are counted


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
        ("quarantined files", quarantined_text(m["processing"].get("quarantined_files", []))),
    ]
    skipped = m.get("ingestion", {}).get("skipped_entries") or []
    if skipped:
        rows.append(("skipped (not data)", _skipped_text(skipped)))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    short = storage.get("under_replicated", 0)
    if short:
        # A quorum write succeeded short of the replication factor (a node was down):
        # worth a line of its own, not only a number in the table.
        console.print(f"[yellow]warning: {short} chunk(s) have fewer healthy replicas than "
                      f"the replication factor; their hints are kept, and repair brings them "
                      f"back when a node returns or joins (or run `multicloud repair`)[/yellow]")


_SKIPPED_SHOWN = 5


def _skipped_text(skipped: list[dict[str, Any]]) -> str:
    """The entries a run left out (FIFOs, sockets, ...), names escaped for the terminal."""
    # Names come from the data: escaped for the terminal, and "[" in them is not markup.
    shown = ", ".join(escape(f"{display_path(str(e.get('file', '?')))} ({e.get('kind', '?')})")
                      for e in skipped[:_SKIPPED_SHOWN])
    more = len(skipped) - _SKIPPED_SHOWN
    return f"{len(skipped)}: {shown}" + (f" and {more} more" if more > 0 else "")


def quarantined_text(files: list[dict[str, Any]], shown: int = QUARANTINED_SHOWN) -> str:
    """How many files were stored with records that do not parse, the first few with their
    first bad line and why, one a line (`processing.quarantined_files` of a summary)."""
    lines = [str(len(files))]
    for entry in files[:shown]:
        where = f"line {entry['line']}"
        if "chunk" in entry:  # the line's number within its chunk: the file's was not known
            where += f" of chunk {entry['chunk']}"
        # File names and reasons come from the data: "[" in them is not rich markup.
        lines.append(escape(display_path(f"{entry['file']}: {where}: {entry['reason']}")))
    if len(files) > shown:
        lines.append(f"... and {len(files) - shown} more")
    return "\n".join(lines)


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
