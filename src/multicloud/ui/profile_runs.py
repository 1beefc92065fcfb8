"""Profiling runs: N runs of a batch on fresh embedded clusters, applying a recommended
config, and comparing two configs on the same data.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from multicloud.cluster.local import create_local_cluster
from multicloud.core.config import PipelineConfig, default_yaml, file_name, load_config
from multicloud.core.errors import ConfigError, ProfileError
from multicloud.core.types import PipelineResult
from multicloud.pipeline.metrics import STAGES
from multicloud.pipeline.sources import infer_source_cloud
from multicloud.run.orchestrator import PipelineOrchestrator
from multicloud.ui.profile_rules import (
    SECTIONS,
    ConfigValue,
    Recommendation,
    RunCallback,
    show_value,
)
from multicloud.ui.profiler import PerformanceProfiler

log = logging.getLogger(__name__)

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
                       f"{show_value(was).strip('`')} (multicloud profile)"
                       + (f"; {comment}" if comment else ""))
    elif not parents:  # a top-level key the file leaves to its default
        lines.append(f"{leaf}: {rendered}  # added by multicloud profile (default "
                     f"{show_value(was).strip('`')})")
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
        raise ProfileError(f"runs must be 1 or more, got {runs}")
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
        raise ProfileError(f"runs must be 1 or more, got {runs}")
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
        try:
            orchestrator = PipelineOrchestrator(registry, config=config)
            try:
                result = await orchestrator.run_pipeline({"data_source": str(source),
                                                          "batch_id": batch_id})
            finally:
                await orchestrator.close()
        finally:
            await registry.close()
    finally:
        await asyncio.to_thread(shutil.rmtree, cluster_dir, True)
    if result.status != "success":
        raise ProfileError(f"profiling run {batch_id} failed: {result.error}; a failing "
                              "pipeline cannot be profiled, fix the run first")
    log.info("profiling run %s: %.2f s", batch_id, result.duration_seconds)
    return result

