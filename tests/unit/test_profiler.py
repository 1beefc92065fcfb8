"""The profiler's analysis on synthetic results: breakdown, bottlenecks, recommendations,
the report, the charts, and the config it writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from multicloud import ConfigError, PipelineConfig, PipelineResult, load_config
from multicloud.core.config import default_yaml, file_name
from multicloud.ui.profile_rules import Recommendation
from multicloud.ui.profile_runs import Comparison, ConfigStats, apply_recommendations
from multicloud.ui.profiler import PerformanceProfiler

MB = 1_000_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["ingestion", "processing", "distribution", "storage", "cluster"]


def defaults() -> PipelineConfig:
    """The shipped defaults, with the 4 chunks in flight these figures were worked out for."""
    return load_config(None).replace(ingestion={"max_inflight_chunks": 4})


def make_result(busy: dict[str, float], *, duration: float = 10.0, nbytes: int = 100 * MB,
                chunks: int = 100, batch_id: str = "b1", status: str = "success",
                network_s: float = 0.0, p50: float = 0.05,
                **metrics: Any) -> PipelineResult:
    """A PipelineResult shaped like the orchestrator's, with the given busy seconds."""
    summary: dict[str, Any] = {
        stage: {"busy_seconds": busy.get(stage, 0.0), "bytes": nbytes}
        for stage in ("ingestion", "processing", "distribution", "storage")}
    summary["processing"]["latency_p50_s"] = p50
    summary["distribution"].update(
        bytes=nbytes // 2, emulated_network_seconds=network_s, replica_writes=3 * chunks,
        replica_failures=0,
        timeouts={"aws/us-east-1->gcp/us-central1": {"srtt_s_per_mib": 0.2, "samples": 9.0},
                  "aws/us-east-1->aws/us-west-2": {"srtt_s_per_mib": 0.05, "samples": 9.0}})
    summary["storage"].update(
        by_node={"aws-node-1": {"chunk_count": 60, "replicas": 60, "bytes": 30 * MB},
                 "gcp-node-1": {"chunk_count": 40, "replicas": 40, "bytes": 20 * MB}},
        by_cloud={"aws": {"chunk_count": 60, "replicas": 60, "bytes": 30 * MB},
                  "gcp": {"chunk_count": 40, "replicas": 40, "bytes": 20 * MB}})
    summary["stage_breakdown_s"] = dict(busy)
    summary["timeline"] = [[duration * i / 10, nbytes * i // 10] for i in range(1, 11)]
    summary["duration_seconds"] = duration
    summary.update(metrics)
    return PipelineResult(status=status, batch_id=batch_id, duration_seconds=duration,
                          chunks_processed=chunks, bytes_processed=nbytes, files=3,
                          metrics=summary)


def profiled(*results: PipelineResult, config: PipelineConfig | None = None,
             cores: int = 2) -> PerformanceProfiler:
    profiler = PerformanceProfiler(config or defaults(), cores=cores)
    for result in results:
        profiler.record_run(result, source_cloud="aws")
    return profiler


def by_key(recs: list[Recommendation]) -> dict[str, Recommendation]:
    return {r.dotted_key: r for r in recs}


PROCESSING_HEAVY = {"ingestion": 1.0, "processing": 8.0, "distribution": 2.0, "storage": 0.5}
DISTRIBUTION_HEAVY = {"ingestion": 1.0, "processing": 1.5, "distribution": 9.0, "storage": 0.2}


# -- breakdown and bottlenecks ----------------------------------------------------------------

def test_breakdown_is_mean_busy_time_and_share_of_the_summed_busy_time() -> None:
    profiler = profiled(make_result({"ingestion": 1, "processing": 6, "distribution": 2,
                                     "storage": 1}),
                        make_result({"ingestion": 3, "processing": 10, "distribution": 6,
                                     "storage": 1}))
    breakdown = profiler.stage_breakdown()
    assert list(breakdown) == ["ingestion", "processing", "distribution", "storage"]
    assert breakdown["processing"]["mean_s"] == pytest.approx(8.0)
    assert breakdown["processing"]["share"] == pytest.approx(8 / 15)
    assert sum(v["share"] for v in breakdown.values()) == pytest.approx(1.0)


def test_bottlenecks_are_the_stages_over_30_percent_largest_first() -> None:
    profiler = profiled(make_result({"ingestion": 1, "processing": 4, "distribution": 3.5,
                                     "storage": 1.5}))
    flagged = profiler.bottlenecks
    assert [b.stage for b in flagged] == ["processing", "distribution"]
    assert flagged[0].duration == pytest.approx(4.0)
    assert flagged[0].percentage == pytest.approx(40.0)


def test_exactly_30_percent_is_not_a_bottleneck() -> None:
    profiler = profiled(make_result({"ingestion": 3, "processing": 3, "distribution": 3,
                                     "storage": 1}))
    assert profiler.bottlenecks == []
    assert profiler.recommendations() == []


def test_failed_runs_are_left_out_of_the_analysis() -> None:
    profiler = profiled(make_result(PROCESSING_HEAVY),
                        make_result(DISTRIBUTION_HEAVY, status="failed", batch_id="bad"))
    assert len(profiler.records) == 2
    assert [r.batch_id for r in profiler.runs] == ["b1"]
    assert profiler.bottlenecks[0].stage == "processing"
    assert "1 failed run(s) left out" in profiler.generate_report()


# -- recommendations --------------------------------------------------------------------------

def slow_processing_config() -> PipelineConfig:
    return defaults().replace(processing={"max_workers_per_node": 1,
                                                 "compression": {"level": 19}})


def test_processing_bottleneck_recommends_compression_level_workers_and_inflight() -> None:
    recs = by_key(profiled(make_result(PROCESSING_HEAVY), config=slow_processing_config(),
                           cores=16).recommendations())
    level = recs["processing.compression.level"]
    assert (level.current, level.suggested, level.section) == (19, 1, "processing")
    assert "processing was busy 8.00 s per run, 80% of the 10.00 s run" in level.why
    assert "blobs were 50% of the raw bytes" in level.why
    assert "typically an order of magnitude faster than level 19" in level.expected_effect
    workers = recs["processing.max_workers_per_node"]
    assert (workers.current, workers.suggested) == (1, 2)
    assert "3 node(s) in the source cloud x 1 worker(s) = 3 slots for 16 cores" in workers.why
    assert "up to 2.0x processing throughput" in workers.expected_effect
    # 3 aws nodes x 2 workers = 6 slots, but only 4 chunks may be in flight.
    inflight = recs["ingestion.max_inflight_chunks"]
    assert (inflight.current, inflight.suggested) == (4, 6)
    assert "memory bound goes from 400 to 600 MiB" in inflight.expected_effect
    assert all(r.stage == "processing" for r in recs.values())


def test_no_more_workers_when_the_slots_already_cover_the_cores() -> None:
    # The profile ran on an embedded cluster: its 3 nodes share this machine's 2 cores.
    recs = by_key(profiled(make_result(PROCESSING_HEAVY), config=slow_processing_config(),
                           cores=2).recommendations())
    workers = recs["processing.max_workers_per_node"]
    assert not workers.changes_config
    assert "3 slots for 2 cores" in workers.why
    assert "more workers would queue for the same cores" in workers.expected_effect
    assert "ingestion.max_inflight_chunks" not in recs  # 2 busy slots < 4 in flight
    assert recs["processing.compression.level"].suggested == 1  # the lever that is left


def test_workers_double_while_cores_idle_and_inflight_at_most_doubles() -> None:
    config = defaults().replace(processing={"max_workers_per_node": 2})
    recs = by_key(profiled(make_result(PROCESSING_HEAVY), config=config,
                           cores=64).recommendations())
    assert "processing.compression.level" not in recs  # already 1
    assert recs["processing.max_workers_per_node"].suggested == 4
    assert recs["ingestion.max_inflight_chunks"].suggested == 8  # 12 slots, capped at 2 x 4


def test_distribution_bottleneck_raises_inflight_when_the_distribution_limit_is_not_binding(
) -> None:
    recs = by_key(profiled(make_result(DISTRIBUTION_HEAVY)).recommendations())
    inflight = recs["ingestion.max_inflight_chunks"]
    assert (inflight.current, inflight.suggested) == (4, 8)
    assert "max_concurrent_distributions (15) is not the limit" in inflight.why
    assert "distribution.max_concurrent_distributions" not in recs  # 8 <= 15


def test_distribution_bottleneck_raises_the_limit_15_to_25_like_the_request() -> None:
    config = defaults().replace(ingestion={"max_inflight_chunks": 32})
    recs = by_key(profiled(make_result(DISTRIBUTION_HEAVY), config=config).recommendations())
    limit = recs["distribution.max_concurrent_distributions"]
    assert (limit.current, limit.suggested, limit.section) == (15, 25, "distribution")
    assert "15 chunks may distribute at once while 32 are in flight" in limit.why


def test_distribution_limit_is_capped_at_the_chunks_in_flight() -> None:
    config = defaults().replace(ingestion={"max_inflight_chunks": 8},
                                       distribution={"max_concurrent_distributions": 1})
    recs = by_key(profiled(make_result(DISTRIBUTION_HEAVY), config=config).recommendations())
    assert recs["distribution.max_concurrent_distributions"].suggested == 8


def test_slow_links_with_few_big_chunks_halve_the_chunk_size_100_to_50() -> None:
    config = defaults().replace(cluster={"time_scale": 1.0})
    recs = by_key(profiled(make_result(DISTRIBUTION_HEAVY, chunks=11, network_s=20.0),
                           config=config).recommendations())
    size = recs["ingestion.chunk_size_mb"]
    assert (size.current, size.suggested) == (100, 50)
    assert "20.00 s of emulated transfer time per run at time_scale 1" in size.why
    assert "slowest link aws/us-east-1->gcp/us-central1, smoothed transfer time 0.200 s" \
        in size.why
    assert "storage.fsync" not in recs  # the links, not the disk, are the cost


def test_slow_links_with_many_chunks_keep_the_chunk_size() -> None:
    config = defaults().replace(cluster={"time_scale": 1.0})
    recs = by_key(profiled(make_result(DISTRIBUTION_HEAVY, chunks=500, network_s=20.0),
                           config=config).recommendations())
    assert "ingestion.chunk_size_mb" not in recs


def test_network_time_counts_only_when_the_emulation_waits() -> None:
    # time_scale 0 accounts the link time but never waits for it: the cost is the disk.
    recs = by_key(profiled(make_result(DISTRIBUTION_HEAVY, chunks=11,
                                       network_s=20.0)).recommendations())
    assert "ingestion.chunk_size_mb" not in recs
    note = recs["storage.fsync"]
    assert not note.changes_config
    assert note.current is True
    assert note.suggested is True
    assert "fsync is a safety setting and stays on" in note.expected_effect


def test_ingestion_bottleneck_raises_read_ahead_up_to_the_cores() -> None:
    busy = {"ingestion": 9.0, "processing": 1.0, "distribution": 1.0, "storage": 0.2}
    recs = by_key(profiled(make_result(busy), cores=8).recommendations())
    assert (recs["ingestion.read_ahead"].current, recs["ingestion.read_ahead"].suggested) == \
        (2, 4)
    assert recs["ingestion.max_inflight_chunks"].suggested == 8
    capped = by_key(profiled(make_result(busy), cores=2).recommendations())
    assert not capped["ingestion.read_ahead"].changes_config
    assert "compete for the same cores" in capped["ingestion.read_ahead"].why


def test_storage_bottleneck_doubles_the_chunk_size_and_keeps_fsync() -> None:
    busy = {"ingestion": 1.0, "processing": 1.0, "distribution": 1.0, "storage": 6.0}
    recs = by_key(profiled(make_result(busy)).recommendations())
    assert recs["ingestion.chunk_size_mb"].suggested == 200
    assert recs["storage.fsync"].suggested is True
    assert "SQLite" in recs["storage.fsync"].why


@pytest.mark.parametrize("fsync", [True, False])
@pytest.mark.parametrize("stage", ["ingestion", "processing", "distribution", "storage"])
def test_fsync_is_never_recommended_off(stage: str, fsync: bool) -> None:
    busy = {"ingestion": 1.0, "processing": 1.0, "distribution": 1.0, "storage": 1.0,
            stage: 10.0}
    config = defaults().replace(storage={"fsync": fsync})
    for rec in profiled(make_result(busy), config=config).recommendations():
        if rec.key == "fsync":
            assert rec.suggested is True


def test_one_recommendation_per_key_keeps_the_larger_change() -> None:
    busy = {"ingestion": 0.1, "processing": 5.0, "distribution": 5.0, "storage": 0.1}
    recs = profiled(make_result(busy), config=slow_processing_config(),
                    cores=16).recommendations()
    keys = [r.dotted_key for r in recs]
    assert len(keys) == len(set(keys))
    inflight = by_key(recs)["ingestion.max_inflight_chunks"]
    assert inflight.suggested == 8  # distribution's 2 x 4 beats processing's 6 slots
    assert inflight.stage == "processing"
    assert "For distribution:" in inflight.why


# -- report -----------------------------------------------------------------------------------

def test_report_follows_the_requests_format() -> None:
    profiler = profiled(make_result(PROCESSING_HEAVY, batch_id="run-a"),
                        make_result(PROCESSING_HEAVY, batch_id="run-b", duration=12.0),
                        config=slow_processing_config())
    report = profiler.generate_report()
    assert report.startswith("# Performance Analysis (2 runs)\n")
    assert "## Stage Breakdown" in report
    assert re.search(r"^Processing: +70% \(8\.0s avg\) ⚠️ BOTTLENECK$", report, re.M)
    assert re.search(r"^Ingestion: +9% \(1\.0s avg\)$", report, re.M)
    assert re.search(r"^Storage: +4% \(0\.50s avg\)$", report, re.M)
    assert report.count("⚠️ BOTTLENECK") == 1
    assert "shares are of the summed busy time" in report
    recs = report.split("## Recommendations")[1].split("## Runs")[0]
    assert re.search(r"^1\. \*\*`processing\.compression\.level`: `19` → `1`\*\* "
                     r"\(`processing_config\.yml`", recs, re.M)
    assert re.search(r"^2\. \*\*`processing\.max_workers_per_node`: keep `1`\*\*", recs,
                     re.M)
    assert recs.count("Expected effect:") == 2
    assert "| 1 | run-a | 10.00 | 10.00 | 100 | 100.0 |" in report
    assert "| 2 | run-b | 12.00 | 8.33 | 100 | 100.0 |" in report


def test_report_without_runs_or_bottleneck() -> None:
    assert "No successful run" in PerformanceProfiler().generate_report()
    balanced = profiled(make_result({"ingestion": 1, "processing": 1, "distribution": 1,
                                     "storage": 1}))
    report = balanced.generate_report()
    assert report.startswith("# Performance Analysis (1 run)\n")
    assert "None: no stage is over the threshold." in report
    assert "BOTTLENECK" not in report


def test_report_warns_when_fsync_is_off() -> None:
    config = defaults().replace(storage={"fsync": False})
    assert "`storage.fsync` is off" in profiled(make_result(DISTRIBUTION_HEAVY),
                                                config=config).generate_report()


def test_comparison_markdown_states_the_measured_ratio(tmp_path: Path) -> None:
    busy = {"ingestion": 1.0, "processing": 4.0, "distribution": 2.0, "storage": 0.1}
    old = ConfigStats(Path("old"), [4.0, 6.0], [20.0, 15.0], busy)
    new = ConfigStats(Path("new"), [2.0, 3.0], [40.0, 30.0], {**busy, "processing": 1.0})
    comparison = Comparison(old, new, tmp_path / "comparison.md")
    assert comparison.ratio == pytest.approx(2.0)
    text = comparison.to_markdown()
    assert "**2.00x faster**" in text
    assert "| Mean duration (s) | 5.00 | 2.50 | 0.50 |" in text
    assert "| Processing busy (s) | 4.00 | 1.00 | 0.25 |" in text
    assert "**2.00x slower**" in Comparison(new, old, tmp_path / "c.md").to_markdown()


# -- charts -----------------------------------------------------------------------------------

def test_charts_are_pngs(tmp_path: Path) -> None:
    profiler = profiled(make_result(PROCESSING_HEAVY), make_result(DISTRIBUTION_HEAVY))
    paths = profiler.write_charts(tmp_path / "charts")
    assert [p.name for p in paths] == ["stage_breakdown.png", "throughput.png",
                                       "bytes_per_node.png", "bytes_per_cloud.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_charts_without_runs_still_render(tmp_path: Path) -> None:
    for path in PerformanceProfiler().write_charts(tmp_path):
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_importing_the_profiler_does_not_import_matplotlib() -> None:
    code = ("import sys, multicloud.ui.profiler; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- applying ---------------------------------------------------------------------------------

def rec(section: str, key: str, current: Any, suggested: Any) -> Recommendation:
    return Recommendation("processing", section, key, current, suggested, "why", "effect")


def test_apply_writes_a_complete_valid_config_from_the_defaults(tmp_path: Path) -> None:
    out = apply_recommendations(None, [
        rec("processing", "max_workers_per_node", 4, 8),
        rec("processing", "compression.level", 1, 3),
        rec("ingestion", "chunk_size_mb", 100, 50),
        rec("storage", "fsync", True, True),  # a note: nothing to change
    ], tmp_path / "applied")
    assert sorted(p.name for p in out.iterdir()) == sorted(file_name(s) for s in SECTIONS)
    config = load_config(out)
    assert config.processing.max_workers_per_node == 8
    assert config.processing.compression.level == 3
    assert config.ingestion.chunk_size_mb == 50
    assert config.storage.fsync is True
    assert config.distribution == defaults().distribution
    processing = (out / "processing_config.yml").read_text()
    assert "max_workers_per_node: 8  # was 4 (multicloud profile)" in processing
    assert "  level: 3  # was 1 (multicloud profile); zstd level" in processing
    assert "# Processing: the transform chain" in processing  # comments survive
    assert (out / "storage_config.yml").read_text() == default_yaml("storage")


def test_apply_starts_from_the_input_dir(tmp_path: Path) -> None:
    src = tmp_path / "cfg"
    src.mkdir()
    (src / "ingestion_config.yml").write_text("chunk_size_mb: 0.0625\n")
    (src / "processing_config.yml").write_text(
        "max_workers_per_node: 1\ncompression: {level: 19}   # flow style\n")
    (src / "cluster_config.yml").write_text("nodes_per_cloud: {aws: 1, gcp: 3}\n")
    out = apply_recommendations(src, [
        rec("ingestion", "max_inflight_chunks", 4, 6),
        rec("processing", "compression.level", 19, 1),
    ], tmp_path / "applied")
    config = load_config(out)
    assert config.ingestion.chunk_size_mb == 0.0625
    assert config.ingestion.max_inflight_chunks == 6
    assert config.processing.max_workers_per_node == 1
    assert config.processing.compression.level == 1
    assert config.cluster.nodes_per_cloud == {"aws": 1, "gcp": 3}
    assert "max_inflight_chunks: 6  # added by multicloud profile (default 4)" in \
        (out / "ingestion_config.yml").read_text()
    assert yaml.safe_load((out / "processing_config.yml").read_text())["compression"] == \
        {"level": 1}


def test_apply_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="new dir"):
        apply_recommendations(tmp_path, [rec("ingestion", "read_ahead", 2, 4)], tmp_path)


def test_apply_rejects_an_invalid_value_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_workers_per_node"):
        apply_recommendations(None, [rec("processing", "max_workers_per_node", 4, 0)],
                              tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_apply_rejects_a_broken_input_dir(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "ingestion_config.yml").write_text("chunk_size_mb: [\n")
    with pytest.raises(ConfigError, match=r"ingestion_config\.yml"):
        apply_recommendations(tmp_path / "cfg", [], tmp_path / "out")


def test_applied_recommendations_round_trip(tmp_path: Path) -> None:
    config = slow_processing_config()
    profiler = profiled(make_result(PROCESSING_HEAVY), config=config)
    out = apply_recommendations(None, profiler.recommendations(), tmp_path / "applied")
    applied = load_config(out)
    changes = [r for r in profiler.recommendations() if r.changes_config]
    assert changes
    for r in changes:
        value: Any = getattr(applied, r.section)
        for part in r.key.split("."):
            value = getattr(value, part)
        assert value == r.suggested
