"""The performance profiler: run a batch N times, find the bottleneck stage, recommend config.

The four stages overlap (chunks stream through all of them at once), so a stage's time is
its busy time: the wall-clock time during which at least one chunk was in it. A stage's
share is its busy time over the *summed* busy time of all four, not over the run's
duration; a stage above 30% of it is a bottleneck. A stage starved by
a slow upstream stage also accrues busy time (its chunks trickle in), so the largest share
is the one to act on first.

Every recommendation names a config key, its current and suggested value, the measured
numbers that call for it and the effect to expect. `storage.fsync` is a safety setting and
is never recommended off. `compare_configs` measures whether a recommendation paid off.
"""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Any

from multicloud.core.config import PipelineConfig, file_name, load_config
from multicloud.core.types import PipelineResult
from multicloud.pipeline.metrics import STAGES
from multicloud.run.orchestrator import PipelineOrchestrator
from multicloud.ui.profile_rules import (
    BOTTLENECK_SHARE,
    MB,
    RULES,
    Bottleneck,
    Measures,
    Recommendation,
    RunRecord,
    StageShare,
    merge_recommendations,
    show_value,
)

log = logging.getLogger(__name__)


class PerformanceProfiler:
    """Profile pipeline performance to identify bottlenecks."""

    def __init__(self, config: PipelineConfig | None = None, *, cores: int | None = None,
                 threshold: float = BOTTLENECK_SHARE) -> None:
        self.config = config or load_config(None)
        self.cores = cores or os.cpu_count() or 1
        self.threshold = threshold
        self.records: list[RunRecord] = []

    # -- collecting ------------------------------------------------------------------------

    def record_run(self, result: PipelineResult, source_cloud: str | None = None) -> None:
        """Add a finished run; failed runs are kept but left out of the analysis."""
        metrics = result.metrics
        breakdown = metrics.get("stage_breakdown_s") or {
            s: float(metrics.get(s, {}).get("busy_seconds", 0.0)) for s in STAGES}
        timeline = [(float(t), int(b)) for t, b in metrics.get("timeline", [])]
        self.records.append(RunRecord(
            result.batch_id, result.status, result.duration_seconds, result.bytes_processed,
            result.chunks_processed, {s: float(breakdown.get(s, 0.0)) for s in STAGES},
            timeline, metrics, source_cloud))

    def profile_pipeline_run(self, orchestrator: PipelineOrchestrator) -> str:
        """Profile the orchestrator's last run; returns the report.

        Use this or `record_run` for a run, not both: each adds the run once.
        """
        snap = orchestrator.live.snapshot()
        status = snap.status.value
        self.records.append(RunRecord(
            snap.batch_id or "", "success" if status == "completed" else status,
            snap.elapsed_seconds, snap.committed_bytes, snap.committed_chunks,
            {s: snap.stage_breakdown.get(s, 0.0) for s in STAGES},
            list(orchestrator.live.timeline)))
        return self.generate_report()

    @property
    def runs(self) -> list[RunRecord]:
        """The successful runs: the ones analysed."""
        return [r for r in self.records if r.status == "success"]

    # -- analysis --------------------------------------------------------------------------

    def stage_breakdown(self) -> dict[str, StageShare]:
        """Stage -> mean busy seconds and share of the summed busy time (stages overlap)."""
        runs = self.runs
        means = {s: statistics.fmean(r.breakdown[s] for r in runs) if runs else 0.0
                 for s in STAGES}
        total = sum(means.values())
        return {s: StageShare(mean_s=m, share=m / total if total > 0 else 0.0)
                for s, m in means.items()}

    @property
    def bottlenecks(self) -> list[Bottleneck]:
        """Stages over the threshold share, largest first."""
        found = [Bottleneck(s, v["mean_s"], 100 * v["share"])
                 for s, v in self.stage_breakdown().items() if v["share"] > self.threshold]
        return sorted(found, key=lambda b: -b.percentage)

    def recommendations(self, config: PipelineConfig | None = None) -> list[Recommendation]:
        """Config changes for the bottleneck stages, largest share first, one per key."""
        if not self.runs:
            return []
        busy = {s: v["mean_s"] for s, v in self.stage_breakdown().items()}
        m = Measures.of(self.runs, self.cores, busy, config or self.config)
        found: list[Recommendation] = []
        for bottleneck in self.bottlenecks:
            found.extend(RULES[bottleneck.stage](m, bottleneck))
        return merge_recommendations(found)

    # -- output ----------------------------------------------------------------------------

    def generate_report(self, config: PipelineConfig | None = None) -> str:
        """The markdown report: breakdown, bottlenecks, recommendations and the runs."""
        runs, failed = self.runs, len(self.records) - len(self.runs)
        lines = [f"# Performance Analysis ({len(runs)} run{'' if len(runs) == 1 else 's'})", ""]
        if failed:
            lines += [f"{failed} failed run(s) left out of the analysis.", ""]
        if not runs:
            return "\n".join([*lines, "No successful run to analyse."]) + "\n"
        durations = [r.duration_s for r in runs]
        lines += [f"Mean duration {statistics.fmean(durations):.2f} s "
                  f"(min {min(durations):.2f}, max {max(durations):.2f}), mean throughput "
                  f"{statistics.fmean(r.throughput_mb_s for r in runs):.2f} MB/s.", "",
                  "## Stage Breakdown", "",
                  "Busy time per stage: the time at least one chunk was in it. The stages "
                  "overlap, so the shares are of the summed busy time, not of the run's "
                  f"duration; a stage over {self.threshold:.0%} is a bottleneck.", "", "```text"]
        flagged = {b.stage for b in self.bottlenecks}
        for stage, v in self.stage_breakdown().items():
            mean = f"{v['mean_s']:.1f}" if v["mean_s"] >= 1 else f"{v['mean_s']:.2f}"
            mark = " ⚠️ BOTTLENECK" if stage in flagged else ""
            lines.append(f"{stage.title() + ':':<14}{100 * v['share']:>3.0f}% ({mean}s avg){mark}")
        lines += ["```", "", "## Recommendations", ""]
        recs = self.recommendations(config)
        if not recs:
            lines.append("None: no stage is over the threshold." if not flagged else
                         "None: the settings that address the bottleneck are at their limits.")
        for i, rec in enumerate(recs, 1):
            change = (f"{show_value(rec.current)} → {show_value(rec.suggested)}"
                      if rec.changes_config else f"keep {show_value(rec.current)}")
            lines += [f"{i}. **`{rec.dotted_key}`: {change}** (`{file_name(rec.section)}`, "
                      f"{rec.stage}). {rec.why}", f"   Expected effect: {rec.expected_effect}"]
        if not (config or self.config).storage.fsync:
            lines += ["", "Note: `storage.fsync` is off in this config, so these runs are "
                      "faster than durable ones would be."]
        lines += ["", "## Runs", "", "| # | Batch | Duration (s) | Throughput (MB/s) | Chunks "
                  "| Data (MB) |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {i} | {r.batch_id} | {r.duration_s:.2f} | {r.throughput_mb_s:.2f} | "
                  f"{r.chunks} | {r.bytes / MB:.1f} |" for i, r in enumerate(runs, 1)]
        return "\n".join(lines) + "\n"

    def write_charts(self, out_dir: str | Path) -> list[Path]:
        """Write stage_breakdown, throughput, bytes_per_node and bytes_per_cloud PNGs."""
        # matplotlib is imported here so that importing the profiler stays cheap; the
        # object API with the Agg canvas never touches pyplot's global state.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        runs, flagged, breakdown = self.runs, {b.stage for b in self.bottlenecks}, \
            self.stage_breakdown()
        storage: dict[str, Any] = next(
            (r.metrics["storage"] for r in reversed(runs)
             if r.metrics.get("storage", {}).get("by_node")), {})
        written: list[Path] = []

        def axes(title: str, ylabel: str) -> Any:
            fig = Figure(figsize=(7, 4), layout="tight")
            FigureCanvasAgg(fig)
            return fig.add_subplot(title=title, ylabel=ylabel)

        def save(ax: Any, name: str) -> None:
            written.append(out / name)
            ax.figure.savefig(written[-1], dpi=100)

        ax = axes(f"Mean busy time per stage, share of the summed busy time ({len(runs)} "
                  f"run{'' if len(runs) == 1 else 's'})", "seconds")
        bars = ax.bar([s.title() for s in breakdown], [v["mean_s"] for v in breakdown.values()],
                      color=["tab:red" if s in flagged else "tab:blue" for s in breakdown])
        ax.bar_label(bars, labels=[f"{v['share']:.0%}" for v in breakdown.values()])
        save(ax, "stage_breakdown.png")

        ax = axes("Throughput over time", "MB/s committed")
        ax.set_xlabel("seconds since start")
        for i, run in enumerate(runs, 1):
            ax.plot(*_rates(run.timeline), label=f"run {i}")
        if runs:
            ax.legend(fontsize="small")
        save(ax, "throughput.png")

        for place in ("node", "cloud"):
            ax = axes(f"Bytes stored by {place} (last run)", "MB")
            entries = storage.get(f"by_{place}", {})
            ax.bar(list(entries), [e["bytes"] / MB for e in entries.values()])
            ax.tick_params(axis="x", labelrotation=30)
            save(ax, f"bytes_per_{place}.png")
        return written



def _rates(timeline: list[tuple[float, int]], bins: int = 20) -> tuple[list[float], list[float]]:
    """MB/s committed in equal time bins, from a (seconds, committed bytes) timeline."""
    import numpy as np

    if not timeline or timeline[-1][0] <= 0:
        return [], []
    times = np.array([0.0] + [t for t, _ in timeline])
    done = np.array([0.0] + [float(b) for _, b in timeline])
    edges = np.linspace(0.0, times[-1], bins + 1)
    rates = np.diff(np.interp(edges, times, done)) / np.diff(edges) / MB
    return list((edges[:-1] + edges[1:]) / 2), list(rates)


