"""What the profiler recommends and why: one rule per bottleneck stage.

Every recommendation names a config key, its current and suggested value, the measured
numbers that call for it and the effect to expect. `storage.fsync` is a safety setting and
is never recommended off.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

from multicloud.core.config import PipelineConfig
from multicloud.core.types import PipelineResult

log = logging.getLogger(__name__)

MB = 1_000_000
BOTTLENECK_SHARE = 0.30  # a stage over 30% of the summed busy time is a bottleneck
SECTIONS = ("ingestion", "processing", "distribution", "storage", "cluster")
ConfigValue = int | float | bool | str
RunCallback = Callable[[int, int, PipelineResult], None]  # (run number, of runs, result)



class StageShare(TypedDict):
    """One stage in the breakdown."""

    mean_s: float  # mean busy seconds per run
    share: float  # of the summed busy time of all stages, 0-1


@dataclass(frozen=True, slots=True)
class Bottleneck:
    """A stage over the threshold: its name, busy seconds and share."""

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



# -- recommendation rules ------------------------------------------------------------------

@dataclass(frozen=True)
class Measures:
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
    def of(cls, runs: list[RunRecord], cores: int, busy: dict[str, float],
           config: PipelineConfig) -> Measures:
        """The means over runs (busy: each stage's mean busy seconds)."""

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
            config=config, cores=cores,
            duration_s=statistics.fmean(r.duration_s for r in runs),
            busy=busy,
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


def _processing(m: Measures, b: Bottleneck) -> list[Recommendation]:
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
        speed = ("typically an order of magnitude" if p.compression.level >= 10 else
                 "typically 1.5-3x")
        found.append(Recommendation(
            "processing", "processing", "compression.level", p.compression.level, 1,
            f"zstd level {p.compression.level} runs on every chunk: {seen}{ratio}.",
            f"zstd level 1 compresses {speed} faster than level {p.compression.level}, so "
            "most of processing's compression time goes; blobs get somewhat larger (more "
            "bytes stored and moved)."))
    # All nodes of the embedded cluster the profile ran on share this machine's cores, so
    # slots beyond the cores only queue for them: more workers are advised while cores idle.
    workers, slots = p.max_workers_per_node, p.max_workers_per_node * m.source_nodes
    setup = (f"{seen}; {m.source_nodes} node(s) in the source cloud x {workers} worker(s) "
             f"= {slots} slots for {m.cores} cores")
    if slots < m.cores and workers < 256:
        new = min(2 * workers, 256)
        gain = min(new * m.source_nodes, m.cores) / slots
        found.append(Recommendation(
            "processing", "processing", "max_workers_per_node", workers, new, f"{setup}.",
            f"{new * m.source_nodes} slots process chunks at once, up to {gain:.1f}x "
            "processing throughput on the idle cores."))
        slots = new * m.source_nodes
    else:
        found.append(Recommendation(
            "processing", "processing", "max_workers_per_node", workers, workers,
            f"{setup}: the slots already cover the cores the embedded cluster's nodes share.",
            "none here: more workers would queue for the same cores. On real nodes with "
            "idle cores of their own, doubling it raises processing throughput."))
    busy_slots = min(slots, m.cores)
    if busy_slots > ing.max_inflight_chunks:
        found.extend(_inflight(m, "processing", busy_slots,
                               f"only {ing.max_inflight_chunks} chunks are between read and "
                               f"commit at once, fewer than the {busy_slots} processing slots "
                               "that have a core"))
    return found


def _distribution(m: Measures, b: Bottleneck) -> list[Recommendation]:
    d, ing = m.config.distribution, m.config.ingestion
    limit, inflight = d.max_concurrent_distributions, ing.max_inflight_chunks
    network_bound = m.busy["distribution"] > 0 and m.network_wait_s >= 0.5 * m.busy[
        "distribution"]
    link = (f"; slowest link {m.slowest_link[0]}, smoothed transfer time "
            f"{m.slowest_link[1]:.3f} s per MiB (transfers under 1 MiB count as 1 MiB)"
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
        found.extend(_inflight(m, "distribution", new_inflight,
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


def _ingestion(m: Measures, b: Bottleneck) -> list[Recommendation]:
    ing = m.config.ingestion
    seen = (f"{m.busy_text('ingestion')} ({b.percentage:.0f}% of busy time) reading and "
            f"SHA-256 hashing with read_ahead {ing.read_ahead} on {m.cores} cores")
    new = min(2 * ing.read_ahead, m.cores)
    if new <= ing.read_ahead:
        return [Recommendation(
            "ingestion", "ingestion", "read_ahead", ing.read_ahead, ing.read_ahead,
            f"{seen}: read_ahead already matches the cores, so more reads at once would "
            "compete for the same cores (hashing) and the same source disk.",
            "none from config; faster cores or a faster source volume would help.")]
    found = [Recommendation(
        "ingestion", "ingestion", "read_ahead", ing.read_ahead, new, f"{seen}.",
        f"{new} chunks read and hashed at once, up to {new / ing.read_ahead:.1f}x ingestion "
        "throughput while the source disk keeps up.")]
    if 2 * new > ing.max_inflight_chunks:
        found.extend(_inflight(m, "ingestion", 2 * new,
                               f"reads hold an in-flight slot: with read_ahead {new} and "
                               f"max_inflight_chunks {ing.max_inflight_chunks}, few chunks "
                               "would be left for the stages downstream"))
    return found


def _storage(m: Measures, b: Bottleneck) -> list[Recommendation]:
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


def _inflight(m: Measures, stage: str, wanted: int, why: str) -> list[Recommendation]:
    """Raise max_inflight_chunks toward wanted, at most doubling it (it bounds memory)."""
    ing = m.config.ingestion
    new = min(wanted, 2 * ing.max_inflight_chunks)
    if new <= ing.max_inflight_chunks:
        return []
    return [Recommendation(
        stage, "ingestion", "max_inflight_chunks", ing.max_inflight_chunks, new, f"{why}.",
        f"{new} chunks move through the pipeline at once; the memory bound goes from "
        f"{ing.max_inflight_chunks * ing.chunk_size_mb:g} to {new * ing.chunk_size_mb:g} "
        "MiB (max_inflight_chunks x chunk_size_mb).")]


def _fsync_note(m: Measures, stage: str, seen: str) -> list[Recommendation]:
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


RULES: dict[str, Callable[[Measures, Bottleneck], list[Recommendation]]] = {
    "ingestion": _ingestion, "processing": _processing,
    "distribution": _distribution, "storage": _storage,
}


def merge_recommendations(recs: Iterable[Recommendation]) -> list[Recommendation]:
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


def show_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


