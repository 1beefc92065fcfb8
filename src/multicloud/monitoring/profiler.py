"""The performance profiler: run a batch N times, find the bottleneck stage, recommend config.

The four stages overlap (chunks stream through all of them at once), so a stage's time is
its busy time: the wall-clock time during which at least one chunk was in it. A stage's
share is its busy time over the *summed* busy time of all four, not over the run's
duration; a stage above 30% is a bottleneck, as in the user's request. A stage starved by
a slow upstream stage also accrues busy time (its chunks trickle in), so the largest share
is the one to act on first.

Every recommendation names a config key, its current and suggested value, the measured
numbers that call for it and the effect to expect. `storage.fsync` is a safety setting and
is never recommended off. `compare_configs` measures whether a recommendation paid off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import yaml

from multicloud.cluster.local import create_local_cluster
from multicloud.config import PipelineConfig, default_yaml, file_name, load_config
from multicloud.errors import ConfigError, MulticloudError
from multicloud.monitoring.metrics import STAGES
from multicloud.pipeline.orchestrator import PipelineOrchestrator
from multicloud.pipeline.sources import infer_source_cloud
from multicloud.types import PipelineResult

log = logging.getLogger(__name__)

MB = 1_000_000
BOTTLENECK_SHARE = 0.30  # the request's threshold: a stage over 30% of the busy time
SECTIONS = ("ingestion", "processing", "distribution", "storage", "cluster")
ConfigValue = int | float | bool | str
RunCallback = Callable[[int, int, PipelineResult], None]  # (run number, of runs, result)


class StageShare(TypedDict):
    """One stage in the breakdown."""

    mean_s: float  # mean busy seconds per run
    share: float  # of the summed busy time of all stages, 0-1


@dataclass(frozen=True, slots=True)
class Bottleneck:
    """A stage over the threshold (the request's dict keys, as fields)."""

    stage: str
    duration: float  # mean busy seconds per run
    percentage: float  # share of the summed busy time, 0-100


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A config change (or, when suggested == current, a note) tied to a measurement."""

    stage: str  # the bottleneck it addresses
    section: str  # config section / file: "processing" -> processing_config.yml
    key: str  # dotted within the section: "compression.level"
    current: ConfigValue
    suggested: ConfigValue
    why: str  # the measured numbers that call for it
    expected_effect: str

    @property
    def changes_config(self) -> bool:
        """False for a note that keeps the value (e.g. storage.fsync stays on)."""
        return self.suggested != self.current

    @property
    def dotted_key(self) -> str:
        """`section.key`, e.g. `processing.compression.level`."""
        return f"{self.section}.{self.key}"


@dataclass(slots=True)
class RunRecord:
    """What the profiler keeps of one run."""

    batch_id: str
    status: str
    duration_s: float
    bytes: int
    chunks: int
    breakdown: dict[str, float]  # stage -> busy seconds
    timeline: list[tuple[float, int]]  # (seconds since start, committed bytes)
    metrics: dict[str, Any] = field(default_factory=dict)  # result.metrics, when known
    source_cloud: str | None = None

    @property
    def throughput_mb_s(self) -> float:
        """Source MB per second of wall-clock time."""
        return self.bytes / MB / self.duration_s if self.duration_s > 0 else 0.0


class PerformanceProfiler:
    """Profile pipeline performance to identify bottlenecks (the request's class)."""

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
        """Profile the orchestrator's last run (the request's method); returns the report.

        Use this or `record_run` for a run, not both: each adds the run once.
        """
        breakdown = orchestrator.metrics.get_stage_breakdown()
        status = orchestrator.pipeline_status.value
        self.records.append(RunRecord(
            orchestrator.current_batch or "", "success" if status == "completed" else status,
            orchestrator.elapsed_seconds, orchestrator.committed_bytes,
            orchestrator.committed_chunks, {s: breakdown.get(s, 0.0) for s in STAGES},
            list(orchestrator.timeline)))
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
        m = _Measures.of(self, config or self.config)
        found: list[Recommendation] = []
        for bottleneck in self.bottlenecks:
            found.extend(_RULES[bottleneck.stage](m, bottleneck))
        return _merge(found)

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
            change = (f"{_show(rec.current)} → {_show(rec.suggested)}" if rec.changes_config
                      else f"keep {_show(rec.current)}")
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


# -- recommendation rules ------------------------------------------------------------------

@dataclass(frozen=True)
class _Measures:
    """The config and the mean measurements the rules work from."""

    config: PipelineConfig
    cores: int
    duration_s: float
    busy: dict[str, float]
    chunks: float
    raw_bytes: float
    blob_bytes: float  # processed (stored) bytes per replica
    processing_p50_s: float
    network_wait_s: float  # emulated link seconds x time_scale
    replica_writes: float
    replica_failures: float
    slowest_link: tuple[str, float] | None  # (link, smoothed s/MiB)
    source_nodes: int

    @classmethod
    def of(cls, profiler: PerformanceProfiler, config: PipelineConfig) -> _Measures:
        runs = profiler.runs

        def mean(*path: str) -> float:
            values = []
            for run in runs:
                value: Any = run.metrics
                for part in path:
                    value = value.get(part, {}) if isinstance(value, dict) else {}
                if isinstance(value, int | float):
                    values.append(float(value))
            return statistics.fmean(values) if values else 0.0

        links: dict[str, float] = {}
        for run in runs:
            for link, est in run.metrics.get("distribution", {}).get("timeouts", {}).items():
                if est.get("samples", 0) > 0:
                    links[link] = max(links.get(link, 0.0), float(est["srtt_s_per_mib"]))
        cloud = next((r.source_cloud for r in reversed(runs) if r.source_cloud),
                     config.cluster.default_source_cloud)
        specs = config.cluster.node_specs()
        return cls(
            config=config, cores=profiler.cores,
            duration_s=statistics.fmean(r.duration_s for r in runs),
            busy={s: v["mean_s"] for s, v in profiler.stage_breakdown().items()},
            chunks=statistics.fmean(r.chunks for r in runs),
            raw_bytes=statistics.fmean(r.bytes for r in runs),
            blob_bytes=mean("distribution", "bytes"),
            processing_p50_s=mean("processing", "latency_p50_s"),
            network_wait_s=mean("distribution", "emulated_network_seconds")
            * config.cluster.time_scale,
            replica_writes=mean("distribution", "replica_writes"),
            replica_failures=mean("distribution", "replica_failures"),
            slowest_link=max(links.items(), key=lambda kv: kv[1]) if links else None,
            source_nodes=sum(s.cloud == cloud for s in specs) or len(specs) or 1,
        )

    def busy_text(self, stage: str) -> str:
        """e.g. 'processing was busy 3.00 s per run, 97% of the 3.10 s run'."""
        busy, dur = self.busy[stage], self.duration_s
        of_wall = f", {busy / dur:.0%} of the {dur:.2f} s run" if dur > 0 else ""
        return f"{stage} was busy {busy:.2f} s per run{of_wall}"


def _processing(m: _Measures, b: Bottleneck) -> list[Recommendation]:
    p, ing = m.config.processing, m.config.ingestion
    found = []
    chunk_kib = m.raw_bytes / max(m.chunks, 1) / 1024
    per_slot = (f"; a {chunk_kib:.0f} KiB chunk spent {m.processing_p50_s * 1000:.0f} ms "
                "(p50) in processing, queueing for a worker slot included"
                if m.processing_p50_s > 0 else "")
    seen = f"{m.busy_text('processing')} ({b.percentage:.0f}% of busy time){per_slot}"
    if "compress" in p.transforms and p.compression.level > 1:
        ratio = (f"; blobs were {m.blob_bytes / m.raw_bytes:.0%} of the raw bytes"
                 if m.raw_bytes and m.blob_bytes else "")
        found.append(Recommendation(
            "processing", "processing", "compression.level", p.compression.level, 1,
            f"zstd level {p.compression.level} runs on every chunk: {seen}{ratio}.",
            f"zstd level 1 compresses many times faster than level {p.compression.level} "
            "(an order of magnitude at 19), so most of processing's compression time goes; "
            "blobs get somewhat larger (more bytes stored and moved)."))
    slots = p.max_workers_per_node * m.source_nodes
    workers = min(2 * p.max_workers_per_node, 4 * m.cores, 256)
    if workers > p.max_workers_per_node:
        new_slots = workers * m.source_nodes
        if slots >= m.cores:
            effect = (f"little if the transforms are CPU-bound: the {slots} slots already "
                      f"cover the {m.cores} cores an embedded cluster's nodes share; it helps "
                      "on real nodes with idle cores, or when slots wait on I/O")
        else:
            effect = (f"up to {new_slots / slots:.1f}x processing throughput: {slots} slots "
                      f"leave cores of the {m.cores} idle")
        found.append(Recommendation(
            "processing", "processing", "max_workers_per_node", p.max_workers_per_node, workers,
            f"{seen}; {m.source_nodes} node(s) in the source cloud x "
            f"{p.max_workers_per_node} worker(s) = {slots} slots.",
            f"{new_slots} slots process chunks at once; {effect}."))
        slots = new_slots
    if slots > ing.max_inflight_chunks:
        found.append(_inflight(m, "processing", slots,
                               f"only {ing.max_inflight_chunks} chunks are between read and "
                               f"commit at once, fewer than the {slots} processing slots"))
    return found


def _distribution(m: _Measures, b: Bottleneck) -> list[Recommendation]:
    d, ing = m.config.distribution, m.config.ingestion
    limit, inflight = d.max_concurrent_distributions, ing.max_inflight_chunks
    network_bound = m.busy["distribution"] > 0 and m.network_wait_s >= 0.5 * m.busy[
        "distribution"]
    link = (f"; slowest link {m.slowest_link[0]} at {m.slowest_link[1]:.3f} s/MiB (smoothed)"
            if m.slowest_link else "")
    failures = (f"; {m.replica_failures:.0f} replica write(s) failed per run"
                if m.replica_failures else "")
    where = (f"the links: {m.network_wait_s:.2f} s of emulated transfer time per run at "
             f"time_scale {m.config.cluster.time_scale:g}{link}" if network_bound else
             f"disk: {m.replica_writes:.0f} replica writes per run, each written and "
             "fsynced before its ack, with little emulated network time")
    seen = f"{m.busy_text('distribution')} ({b.percentage:.0f}% of busy time), waiting on " \
           f"{where}{failures}"
    found = []
    if limit < inflight:
        new = min(limit + max(10, limit // 2), inflight)
        found.append(Recommendation(
            "distribution", "distribution", "max_concurrent_distributions", limit, new,
            f"{seen}; {limit} chunks may distribute at once while {inflight} are in flight.",
            f"up to {new / limit:.1f}x as many quorum writes overlap; the time each waits on "
            "its link or disk is spent in parallel instead of in a queue."))
        effective = new
    else:
        new_inflight = 2 * inflight
        found.append(_inflight(m, "distribution", new_inflight,
                               f"{seen}; max_concurrent_distributions ({limit}) is not the "
                               f"limit: at most max_inflight_chunks ({inflight}) chunks are "
                               "between read and commit"))
        if new_inflight > limit:
            found.append(Recommendation(
                "distribution", "distribution", "max_concurrent_distributions", limit,
                new_inflight, f"{new_inflight} chunks in flight need as many distribution "
                "slots.", "keeps the larger max_inflight_chunks from queueing here."))
        effective = new_inflight
    if network_bound and ing.chunk_size_mb >= 8 and m.chunks < 4 * effective:
        new_size = ing.chunk_size_mb / 2
        found.append(Recommendation(
            "distribution", "ingestion", "chunk_size_mb", ing.chunk_size_mb, new_size,
            f"{seen}; only {m.chunks:.0f} chunks per run for {effective} concurrent writes, "
            "so the pipeline spends much of the run filling and draining.",
            "twice the chunks, so the links stay busy at the start and end of a run; memory "
            "(max_inflight_chunks x chunk_size_mb) shrinks by half."))
    if not network_bound:
        found.extend(_fsync_note(m, "distribution", seen))
    return found


def _ingestion(m: _Measures, b: Bottleneck) -> list[Recommendation]:
    ing = m.config.ingestion
    seen = (f"{m.busy_text('ingestion')} ({b.percentage:.0f}% of busy time) reading and "
            f"SHA-256 hashing with read_ahead {ing.read_ahead} on {m.cores} cores")
    new = min(2 * ing.read_ahead, m.cores)
    if new <= ing.read_ahead:
        return [Recommendation(
            "ingestion", "ingestion", "read_ahead", ing.read_ahead, ing.read_ahead,
            f"{seen}: read_ahead already covers every core, so the source's disk (or bucket) "
            "is the limit.", "none from config; a faster source volume would help.")]
    found = [Recommendation(
        "ingestion", "ingestion", "read_ahead", ing.read_ahead, new, f"{seen}.",
        f"{new} chunks read and hashed at once, up to {new / ing.read_ahead:.1f}x ingestion "
        "throughput while the source disk keeps up.")]
    if 2 * new > ing.max_inflight_chunks:
        found.append(_inflight(m, "ingestion", 2 * new,
                               f"reads hold an in-flight slot: with read_ahead {new} and "
                               f"max_inflight_chunks {ing.max_inflight_chunks}, few chunks "
                               "would be left for the stages downstream"))
    return found


def _storage(m: _Measures, b: Bottleneck) -> list[Recommendation]:
    ing = m.config.ingestion
    seen = (f"{m.busy_text('storage')} ({b.percentage:.0f}% of busy time) committing "
            f"{m.chunks:.0f} chunks per run to the manifest")
    return [
        Recommendation(
            "storage", "ingestion", "chunk_size_mb", ing.chunk_size_mb, ing.chunk_size_mb * 2,
            f"{seen}; manifest work grows with the number of chunks, not bytes.",
            "half the chunks and manifest rows per run; memory (max_inflight_chunks x "
            "chunk_size_mb) doubles."),
        *_fsync_note(m, "storage", seen),
    ]


def _inflight(m: _Measures, stage: str, wanted: int, why: str) -> Recommendation:
    ing = m.config.ingestion
    return Recommendation(
        stage, "ingestion", "max_inflight_chunks", ing.max_inflight_chunks, wanted, f"{why}.",
        f"{wanted} chunks move through the pipeline at once; memory bound goes from "
        f"{ing.max_inflight_chunks * ing.chunk_size_mb:g} to {wanted * ing.chunk_size_mb:g} "
        "MiB (max_inflight_chunks x chunk_size_mb).")


def _fsync_note(m: _Measures, stage: str, seen: str) -> list[Recommendation]:
    if not m.config.storage.fsync:
        return []  # the report says that fsync is off; turning it on is not a speedup
    cost = ("Replica writes fsync each object before acknowledging it; that disk cost is "
            "part of the time measured." if stage == "distribution" else
            "Manifest commits are SQLite transactions synced to disk (synchronous=FULL); "
            "the objects' own fsyncs are counted under distribution.")
    return [Recommendation(
        stage, "storage", "fsync", True, True, f"{seen}. {cost}",
        "none: fsync is a safety setting and stays on. Without it a replica is acknowledged "
        "before it is durable and a power loss can lose a chunk that counted toward quorum.")]


_RULES: dict[str, Callable[[_Measures, Bottleneck], list[Recommendation]]] = {
    "ingestion": _ingestion, "processing": _processing,
    "distribution": _distribution, "storage": _storage,
}


def _merge(recs: Iterable[Recommendation]) -> list[Recommendation]:
    """One recommendation per key, in first-seen order, keeping the largest change."""
    merged: dict[str, Recommendation] = {}
    for rec in recs:
        had = merged.get(rec.dotted_key)
        if had is None:
            merged[rec.dotted_key] = rec
        elif _size(rec) > _size(had):
            merged[rec.dotted_key] = replace(rec, stage=had.stage,
                                             why=f"{had.why} For {rec.stage}: {rec.why}")
    return list(merged.values())


def _size(rec: Recommendation) -> float:
    """How far a numeric recommendation moves its key (0 for anything else)."""
    new, old = rec.suggested, rec.current
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (new, old))
    return abs(float(new) - float(old)) if numeric else 0.0


def _show(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


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


# -- applying recommendations ---------------------------------------------------------------

def apply_recommendations(config_dir_in: str | Path | None, recommendations:
                          Iterable[Recommendation], out_dir: str | Path) -> Path:
    """Write a complete config dir: the input's files (or defaults) with the changes made.

    Values are edited in place so the comments survive; the result is checked with
    `load_config` and must hold every suggested value before anything is written.
    """
    out = Path(out_dir)
    if config_dir_in is not None and out.resolve() == Path(config_dir_in).resolve():
        raise ConfigError(f"--apply {out} is the input config dir; write the recommended "
                          "config to a new dir so that both can be compared")
    load_config(config_dir_in)  # a broken input fails here, with the file and key named
    changes = [r for r in recommendations if r.changes_config]
    texts = {}
    for section in SECTIONS:
        source = Path(config_dir_in) / file_name(section) if config_dir_in else None
        text = source.read_text() if source and source.exists() else default_yaml(section)
        for rec in (r for r in changes if r.section == section):
            text = _set_value(text, rec.key, rec.suggested, rec.current)
        texts[file_name(section)] = text
    with tempfile.TemporaryDirectory() as scratch:  # check before writing anything
        for name, text in texts.items():
            (Path(scratch) / name).write_text(text)
        loaded = load_config(scratch)
    for rec in changes:
        value: Any = getattr(loaded, rec.section)
        for part in rec.key.split("."):
            value = getattr(value, part)
        if value != rec.suggested:
            raise ConfigError(f"{file_name(rec.section)}: {rec.key} is {value!r} after "
                              f"applying, expected {rec.suggested!r}")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text)
    return out


def _set_value(text: str, key: str, value: ConfigValue, was: ConfigValue) -> str:
    """Set a (dotted) key in YAML text: edit its line, else rewrite the whole mapping."""
    want = yaml.safe_load(text) or {}
    node = want
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    lines = text.splitlines()
    line, start, parent_indent = None, 0, -1
    for part in [*parents, leaf]:
        line, child_indent = None, None
        for i in range(start, len(lines)):
            stripped = lines[i].lstrip()
            if not stripped or stripped.startswith("#"):
                continue
            indent = len(lines[i]) - len(stripped)
            if indent <= parent_indent:
                break  # past the end of the parent mapping
            child_indent = indent if child_indent is None else child_indent
            if indent == child_indent and stripped.partition(":")[0].strip() == part:
                line = i
                break
        if line is None:
            break
        start, parent_indent = line + 1, child_indent or 0
    rendered = yaml.safe_dump(value).removesuffix("...\n").strip()
    if line is not None:
        old = lines[line]
        comment = old.partition(":")[2].partition("#")[2].strip()
        lines[line] = (f"{old[:len(old) - len(old.lstrip())]}{leaf}: {rendered}  # was "
                       f"{_show(was).strip('`')} (multicloud profile)"
                       + (f"; {comment}" if comment else ""))
    elif not parents:  # a top-level key the file leaves to its default
        lines.append(f"{leaf}: {rendered}  # added by multicloud profile (default "
                     f"{_show(was).strip('`')})")
    edited = "\n".join(lines) + "\n"
    return edited if yaml.safe_load(edited) == want else yaml.safe_dump(want, sort_keys=False)


# -- running ---------------------------------------------------------------------------------

@dataclass(slots=True)
class ProfileOutcome:
    """What `run_profile` produced."""

    profiler: PerformanceProfiler
    report_path: Path
    charts: list[Path]
    recommendations: list[Recommendation]
    applied_dir: Path | None = None


@dataclass(slots=True)
class ConfigStats:
    """One side of a comparison."""

    config_dir: Path
    durations_s: list[float]
    throughputs_mb_s: list[float]
    stage_busy_s: dict[str, float]

    @property
    def mean_duration_s(self) -> float:
        """Mean wall-clock seconds per run."""
        return statistics.fmean(self.durations_s)

    @property
    def mean_throughput_mb_s(self) -> float:
        """Mean MB/s per run."""
        return statistics.fmean(self.throughputs_mb_s)


@dataclass(slots=True)
class Comparison:
    """The measured difference between two configs on the same source."""

    old: ConfigStats
    new: ConfigStats
    report_path: Path

    @property
    def ratio(self) -> float:
        """Old mean duration over new: above 1 means the new config is faster."""
        return self.old.mean_duration_s / self.new.mean_duration_s

    def to_markdown(self) -> str:
        """The comparison as a markdown table with a verdict."""
        o, n = self.old, self.new
        verdict = (f"{self.ratio:.2f}x faster" if self.ratio >= 1
                   else f"{1 / self.ratio:.2f}x slower")
        rows = [("Mean duration (s)", o.mean_duration_s, n.mean_duration_s),
                ("Mean throughput (MB/s)", o.mean_throughput_mb_s, n.mean_throughput_mb_s)]
        rows += [(f"{s.title()} busy (s)", o.stage_busy_s[s], n.stage_busy_s[s]) for s in STAGES]
        lines = [f"# Config comparison ({len(o.durations_s)} runs each, alternating)", "",
                 f"New config `{n.config_dir}` is **{verdict}** than `{o.config_dir}` "
                 f"(mean duration {o.mean_duration_s:.2f} s → {n.mean_duration_s:.2f} s).",
                 "", "| | old | new | new / old |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {a:.2f} | {b:.2f} | {b / a if a else float('nan'):.2f} |"
                  for name, a, b in rows]
        lines += ["", "Durations (s): old " + ", ".join(f"{d:.2f}" for d in o.durations_s)
                  + "; new " + ", ".join(f"{d:.2f}" for d in n.durations_s) + "."]
        return "\n".join(lines) + "\n"


async def run_profile(source: str | Path, runs: int = 5, config_dir: str | Path | None = None,
                      out_dir: str | Path = "profile-out", data_dir: str | Path | None = None,
                      nodes_per_cloud: dict[str, int] | None = None,
                      apply_dir: str | Path | None = None, *,
                      on_run: RunCallback | None = None, charts: bool = True,
                      ) -> ProfileOutcome:
    """Run the pipeline `runs` times, each on a fresh embedded cluster, and write the report.

    Writes `report.md` and (unless charts is False) the PNG charts into out_dir, and with
    apply_dir the recommended config. Each run's cluster lives under data_dir (default:
    out_dir) and is removed after the run. on_run(i, runs, result) follows each run.
    """
    if runs < 1:
        raise MulticloudError(f"runs must be 1 or more, got {runs}")
    config = load_config(config_dir)
    out = Path(out_dir)
    analysed = _with_nodes(config, nodes_per_cloud)
    profiler = PerformanceProfiler(analysed)
    cloud = infer_source_cloud(source, config.cluster.default_source_cloud)
    for i in range(1, runs + 1):
        result = await _one_run(source, config, Path(data_dir or out), nodes_per_cloud)
        profiler.record_run(result, source_cloud=cloud)
        if on_run is not None:
            on_run(i, runs, result)
    return await asyncio.to_thread(_write_outcome, profiler, out, config_dir, apply_dir, charts)


async def compare_configs(source: str | Path, old_dir: str | Path | None,
                          new_dir: str | Path | None, runs: int = 3,
                          out_dir: str | Path = "profile-out",
                          data_dir: str | Path | None = None,
                          nodes_per_cloud: dict[str, int] | None = None, *,
                          on_run: RunCallback | None = None) -> Comparison:
    """Run both configs `runs` times on the same source and write `comparison.md`.

    Runs alternate (old, new, new, old, ...) on a fresh cluster each, so that warm-up
    and drift fall on both sides alike.
    """
    if runs < 1:
        raise MulticloudError(f"runs must be 1 or more, got {runs}")
    configs = {"old": load_config(old_dir), "new": load_config(new_dir)}
    profilers = {side: PerformanceProfiler(c) for side, c in configs.items()}
    out = Path(out_dir)
    done = 0
    for i in range(runs):
        for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
            result = await _one_run(source, configs[side], Path(data_dir or out),
                                    nodes_per_cloud)
            profilers[side].record_run(result)
            done += 1
            if on_run is not None:
                on_run(done, 2 * runs, result)

    def stats(side: str, config_dir: str | Path | None) -> ConfigStats:
        recs = profilers[side].runs
        busy = profilers[side].stage_breakdown()
        return ConfigStats(Path(config_dir) if config_dir else Path("(defaults)"),
                           [r.duration_s for r in recs], [r.throughput_mb_s for r in recs],
                           {s: v["mean_s"] for s, v in busy.items()})

    comparison = Comparison(stats("old", old_dir), stats("new", new_dir),
                            out / "comparison.md")
    await asyncio.to_thread(_write_text, comparison.report_path, comparison.to_markdown())
    return comparison


def _write_outcome(profiler: PerformanceProfiler, out: Path, config_dir: str | Path | None,
                   apply_dir: str | Path | None, with_charts: bool) -> ProfileOutcome:
    report = _write_text(out / "report.md", profiler.generate_report())
    charts = profiler.write_charts(out) if with_charts else []
    recs = profiler.recommendations()
    applied = (apply_recommendations(config_dir, recs, apply_dir)
               if apply_dir is not None else None)
    return ProfileOutcome(profiler, report, charts, recs, applied)


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _with_nodes(config: PipelineConfig, nodes_per_cloud: dict[str, int] | None,
                ) -> PipelineConfig:
    if nodes_per_cloud is None:
        return config
    return config.replace(cluster={"nodes_per_cloud": dict(nodes_per_cloud), "nodes": []})


async def _one_run(source: str | Path, config: PipelineConfig, root: Path,
                   nodes_per_cloud: dict[str, int] | None) -> PipelineResult:
    """One batch on a fresh embedded cluster under root, removed afterwards."""
    batch_id = f"profile-{uuid.uuid4().hex[:12]}"
    cluster_dir = root / f".{batch_id}"
    try:
        registry = create_local_cluster(cluster_dir, nodes_per_cloud, config=config.cluster,
                                        storage=config.storage)
        orchestrator = PipelineOrchestrator(registry, config=config)
        try:
            result = await orchestrator.run_pipeline({"data_source": str(source),
                                                      "batch_id": batch_id})
        finally:
            await orchestrator.close()
            await registry.close()
    finally:
        await asyncio.to_thread(shutil.rmtree, cluster_dir, True)
    if result.status != "success":
        raise MulticloudError(f"profiling run {batch_id} failed: {result.error}; a failing "
                              "pipeline cannot be profiled, fix the run first")
    log.info("profiling run %s: %.2f s", batch_id, result.duration_seconds)
    return result
