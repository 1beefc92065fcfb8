"""Honest benchmarks, measured side by side in one run on this machine.

1. Ingestion of one 1 GiB file against a bare read + SHA-256 loop over the same file.
2. End to end (gen-data, 6 nodes, RF 3, time_scale 0) against the disk floor (three
   `cp -r` copies + `sync`) and `rclone copy --checksum` to three folders (+ `sync`), and
   the pipeline's CPU seconds (user + sys).
3. Peak RSS of the pipeline for 1 GiB and 4 GiB of input.
4. Observability (dashboard, JSON log, /metrics) on against off.
5. Processing latency of 100 KiB chunks (p50, p99).
6. Cluster mode (`multicloud cluster up`: a registry and six node processes over HTTP)
   against the embedded cluster, runs alternating, pipeline duration.
7. With --before REV: the embedded pipeline of git revision REV (a worktree, run on this
   venv) against this one, runs alternating.
8. Object stores (--no-clouds skips): the dataset from an S3-emulator bucket to replicas on
   the S3, GCS and Azure Blob emulators, against `rclone copy --checksum` to the same three
   (benchmarks/cloud_bench.py).
9. Small files (--small-files 0 skips; benchmarks/small_files_bench.py): 10,000 files of
   1 KiB against `rclone copy --checksum` x 3, their size on disk and directories, and
   verify and restore of 20,000 in ms per file; then the 1 GiB dataset again as a second
   batch (nothing is sent twice).
10. Control plane at scale (--control-chunks 0 skips): placement decisions, manifest commits
   and registry heartbeats for 1,000 simulated nodes in 4 clouds and a million chunks, no
   data (benchmarks/control_plane_bench.py, in a child).

Writes bench-out/report.md and bench-out/results.json. Usage:
    python benchmarks/run_benchmarks.py [--size 1GiB] [--big 4GiB] [--out bench-out]
                                        [--cluster-runs 3] [--before REV] [--no-clouds]
                                        [--small-files 10000] [--control-chunks 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_bench import cloud_section, table_rows
from control_plane_bench import control_plane_section
from control_plane_bench import table_rows as control_plane_rows
from small_files_bench import render_lines, second_batch_section, small_files_section

from multicloud import (
    DataIngestionEngine,
    IngestionConfig,
    ProcessingConfig,
    ProcessingWorkerPool,
    create_local_cluster,
)
from multicloud.core.units import format_bytes, parse_size
from multicloud.datagen import generate_dataset
from multicloud.pipeline.metrics import PipelineMetrics, percentile

MIB = 1024 * 1024
CLI = [sys.executable, "-m", "multicloud.ui.cli"]


def drop_caches() -> None:
    """Flush dirty pages so one measurement does not pay for the previous one's writes."""
    subprocess.run(["sync"], check=True)


def timed(cmd: list[str], **kwargs: Any) -> float:
    """Wall seconds of a command (raises if it fails)."""
    started = time.perf_counter()
    subprocess.run(cmd, check=True, **kwargs)
    return time.perf_counter() - started


def warm(path: Path) -> None:
    """Read a tree once so every contender starts with it in the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with file.open("rb") as handle:
            while handle.read(16 * MIB):
                pass


def bare_read_hash(path: Path, chunk: int) -> float:
    """The floor for ingestion: read chunk-sized pieces and SHA-256 each, one thread."""
    started = time.perf_counter()
    with path.open("rb") as handle:
        while data := handle.read(chunk):
            hashlib.sha256(data).hexdigest()
    return time.perf_counter() - started


async def ingest(path: Path, chunk_mb: float) -> float:
    engine = DataIngestionEngine(None, IngestionConfig(chunk_size_mb=chunk_mb))
    started = time.perf_counter()
    await engine.ingest_batch(path)
    return time.perf_counter() - started


def pipeline_seconds(cli: list[str], source: Path, data_dir: Path, batch_id: str,
                     *extra: str, env: dict[str, str] | None = None) -> float:
    """`multicloud run` in a child; the pipeline's own duration (start-up excluded)."""
    done = subprocess.run([*cli, "run", "--source", str(source), "--data-dir", str(data_dir),
                           "--batch-id", batch_id, "--config-dir", "/nonexistent", "--json",
                           *extra], capture_output=True, text=True, env=env)
    result = json.loads(done.stdout or "{}")
    if done.returncode != 0 or result.get("status") != "success":
        raise SystemExit(f"pipeline failed: {result.get('error') or done.stderr[-2000:]}")
    return float(result["duration_seconds"])


def cluster_against_embedded(source: Path, out: Path, runs: int) -> dict[str, Any]:
    """Alternate embedded runs (a fresh data dir each) and runs on a cluster of processes.

    The cluster stays up, as a user's does; after each of its runs the batch is deleted and
    gc'd (not timed), so the next run finds the cluster empty: a cluster that holds the
    data already sends none of it again. One warm-up run of each comes first (page cache,
    first imports in the new processes); it is reported, not averaged.
    """
    data = out / "cluster-mode"
    shutil.rmtree(data, ignore_errors=True)
    up = subprocess.run([*CLI, "cluster", "up", "--data-dir", str(data), "--config-dir",
                         "/nonexistent", "--registry-port", "0", "--node-base-port", "0",
                         "--json"], capture_output=True, text=True, check=True)
    registry = json.loads(up.stdout)["registry"]
    on_cluster = ["--data-dir", str(data), "--config-dir", "/nonexistent", "--cluster",
                  registry]
    embedded: list[float] = []
    cluster: list[float] = []
    try:
        for i in range(runs + 1):
            shutil.rmtree(out / "embedded", ignore_errors=True)
            drop_caches()
            embedded.append(pipeline_seconds(CLI, source, out / "embedded", f"e{i}"))
            drop_caches()
            cluster.append(pipeline_seconds(CLI, source, data, f"c{i}", "--cluster", registry))
            # No other run uses this cluster: gc need not keep young objects for one.
            for command in (["delete", f"c{i}"], ["gc", "--grace", "0"]):
                subprocess.run([*CLI, *command, *on_cluster], check=True, capture_output=True)
            print(f"  embedded {embedded[-1]:.2f}s, cluster {cluster[-1]:.2f}s", flush=True)
    finally:
        subprocess.run([*CLI, "cluster", "down", "--data-dir", str(data)], check=True,
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(out / "embedded", ignore_errors=True)
    mean_e, mean_c = sum(embedded[1:]) / runs, sum(cluster[1:]) / runs
    return {"embedded_s": embedded[1:], "cluster_s": cluster[1:],
            "warmup_embedded_s": embedded[0], "warmup_cluster_s": cluster[0],
            "cluster_throughput_over_embedded": mean_e / mean_c}


def embedded_against_revision(source: Path, out: Path, rev: str, runs: int) -> dict[str, Any]:
    """Alternate the embedded pipeline of git revision rev with this one's, on one dataset."""
    worktree = out / "before-worktree"
    subprocess.run(["git", "worktree", "remove", "--force", str(worktree)],
                   capture_output=True)
    subprocess.run(["git", "worktree", "add", "--force", "--detach", str(worktree), rev],
                   check=True, capture_output=True)
    # The module path of the CLI moved with the layers; run whichever the revision has.
    old_cli = "multicloud.ui.cli" if (worktree / "src/multicloud/ui/cli.py").exists() \
        else "multicloud.cli"
    env = {**os.environ, "PYTHONPATH": str(worktree / "src")}
    before: list[float] = []
    after: list[float] = []
    try:
        for i in range(runs + 1):
            for sink, cli, run_env in ((before, [sys.executable, "-m", old_cli], env),
                                       (after, CLI, None)):
                shutil.rmtree(out / "embedded", ignore_errors=True)
                drop_caches()
                sink.append(pipeline_seconds(cli, source, out / "embedded", f"r{i}",
                                             env=run_env))
            print(f"  before {before[-1]:.2f}s, after {after[-1]:.2f}s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)],
                       capture_output=True)
        shutil.rmtree(out / "embedded", ignore_errors=True)
    return {"rev": rev, "before_s": before[1:], "after_s": after[1:],
            "warmup_before_s": before[0], "warmup_after_s": after[0],
            "after_throughput_over_before": (sum(before[1:]) / runs) / (sum(after[1:]) / runs)}


def run_pipeline(source: Path, data_dir: Path) -> tuple[float, int, dict[str, Any]]:
    """Run the CLI in a child; returns (wall seconds incl. sync, its peak RSS bytes, result
    with the child's CPU seconds added as result["cpu_s"])."""
    shutil.rmtree(data_dir, ignore_errors=True)
    drop_caches()
    stdout = data_dir.with_suffix(".json")
    started = time.perf_counter()
    with stdout.open("w") as sink:
        child = subprocess.Popen([*CLI, "run", "--source", str(source), "--data-dir",
                                  str(data_dir), "--batch-id", "bench", "--json"], stdout=sink)
        _, status, usage = os.wait4(child.pid, 0)
    subprocess.run(["sync"], check=True)  # the same durability the cp floor is held to
    wall = time.perf_counter() - started
    result = json.loads(stdout.read_text())
    if os.waitstatus_to_exitcode(status) != 0 or result["status"] != "success":
        raise SystemExit(f"pipeline failed: {result.get('error')}")
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["cpu_user_s"], result["cpu_sys_s"] = usage.ru_utime, usage.ru_stime
    return wall, usage.ru_maxrss * 1024, result


def three_copies(out: Path, name: str, command: Callable[[Path], list[str]]) -> float:
    """Wall seconds to make three copies with command(dest), then sync (the same durability
    the pipeline is held to); the copies are removed afterwards."""
    dests = [out / f"{name}-{i}" for i in range(3)]
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
    drop_caches()
    started = time.perf_counter()
    for d in dests:
        subprocess.run(command(d), check=True, capture_output=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - started
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
    return wall


def copy_floor(source: Path, out: Path) -> float:
    """The disk floor: three `cp -r` + sync."""
    return three_copies(out, "cp", lambda d: ["cp", "-r", str(source), str(d)])


def rclone_copy(source: Path, out: Path) -> float | None:
    """What people use today: three `rclone copy --checksum` + sync (None without rclone)."""
    if shutil.which("rclone") is None:
        return None
    return three_copies(out, "rclone", lambda d: ["rclone", "copy", "--checksum", "--config",
                                                  "/dev/null", str(source), str(d)])


async def processing_latency(out: Path, count: int = 100,
                             size: int = 100 * 1024) -> dict[str, float]:
    registry = create_local_cluster(out / "latency-cluster", {"aws": 3, "gcp": 3})
    try:
        metrics = PipelineMetrics()
        pool = ProcessingWorkerPool(registry, ProcessingConfig(), metrics)
        engine = DataIngestionEngine(registry, IngestionConfig(chunk_size_mb=size / MIB))
        lines = b"".join(b'{"n": %d, "msg": "request served", "ok": true}\n' % i
                         for i in range(count * size // 40))
        chunks = await engine.chunk_file("latency.jsonl", lines[: count * size])
        started = time.perf_counter()
        await pool.process_chunks(chunks)
        wall = time.perf_counter() - started
        latencies = metrics.stages["processing"].latencies
        return {"chunks": len(chunks), "p50_ms": percentile(latencies, 50) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000,
                "avg_ms_per_chunk": wall / len(chunks) * 1000}
    finally:
        await registry.close()
        shutil.rmtree(out / "latency-cluster", ignore_errors=True)


async def observed_run(source: Path, data_dir: Path, observe: bool) -> float:
    """One in-process run; with observe, the dashboard, the JSON log and /metrics are on
    (the dashboard drawn at 4 Hz into a terminal-like console, /metrics scraped twice a
    second). Returns the run's duration."""
    import io

    import aiohttp
    from rich.console import Console

    from multicloud import PipelineOrchestrator
    from multicloud.ui.dashboard import run_with_dashboard
    from multicloud.ui.logger import PipelineLogger
    from multicloud.ui.prometheus import MetricsServer

    shutil.rmtree(data_dir, ignore_errors=True)
    registry = create_local_cluster(data_dir, {"aws": 3, "gcp": 3})
    orch = PipelineOrchestrator(registry, config_dir=None)
    batch = {"batch_id": "obs", "data_source": str(source)}
    try:
        if not observe:
            result = await orch.run_pipeline(batch)
            return result.duration_seconds
        logger = PipelineLogger(data_dir / "pipeline.log")
        logger.attach(orch)
        server = MetricsServer(orch.live)
        url = await server.start()
        done = asyncio.Event()

        async def scrape() -> None:
            async with aiohttp.ClientSession() as session:
                while not done.is_set():
                    async with session.get(f"{url}/metrics") as resp:
                        await resp.read()
                    await asyncio.sleep(0.5)

        scraper = asyncio.create_task(scrape())
        console = Console(file=io.StringIO(), force_terminal=True, width=120)
        try:
            result = await run_with_dashboard(orch, batch, console)
        finally:
            done.set()
            await scraper
            await server.stop()
            logger.close()
        return result.duration_seconds
    finally:
        await orch.close()
        await registry.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def dataset(out: Path, name: str, size: int) -> Path:
    root = out / name
    marker = root / ".complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        generate_dataset(root / "aws_s3_bucket", size, seed=1)
        marker.write_text(str(size))
    return root / "aws_s3_bucket"


def one_file(out: Path, size: int) -> Path:
    path = out / "one-file.bin"
    if not path.exists() or path.stat().st_size != size:
        with path.open("wb") as handle:
            for _ in range(size // (64 * MIB)):
                handle.write(os.urandom(64 * MIB))
            handle.write(os.urandom(size % (64 * MIB)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--big", default="4GiB", help="second size for the RSS check ('' skips)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--obs-runs", type=int, default=3,
                        help="runs with observability on and off, each (0 skips)")
    parser.add_argument("--cluster-runs", type=int, default=3,
                        help="runs of cluster mode and of embedded, each (0 skips)")
    parser.add_argument("--before", metavar="REV",
                        help="also compare the embedded pipeline with git revision REV")
    parser.add_argument("--clouds", action=argparse.BooleanOptionalAction, default=True,
                        help="object stores on emulators: multicloud against rclone")
    parser.add_argument("--small-files", type=int, default=10_000,
                        help="files of 1 KiB for the small-files section (0 skips)")
    parser.add_argument("--control-chunks", type=int, default=1_000_000,
                        help="control plane at scale: chunk ids placed and committed (0 skips)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    results: dict[str, Any] = {"size": size, "cpus": os.cpu_count()}

    # 1. ingestion against read + SHA-256
    single = one_file(out, size)
    warm(single)
    bare = min(bare_read_hash(single, 100 * MIB) for _ in range(2))
    ours = min(asyncio.run(ingest(single, 100)) for _ in range(2))
    results["ingestion"] = {"bare_mb_s": size / MIB / bare, "engine_mb_s": size / MIB / ours,
                            "ratio": bare / ours}
    print(f"ingestion: bare {size / MIB / bare:.0f} MiB/s, engine {size / MIB / ours:.0f} "
          f"MiB/s, ratio {bare / ours:.2f}", flush=True)

    # 2. end to end against cp and rclone
    source = dataset(out, "data-small", size)
    warm(source)
    wall, rss, result = run_pipeline(source, out / "cluster")
    cp_wall = copy_floor(source, out)
    rclone_wall = rclone_copy(source, out)
    written = sum(c["bytes"] for c in result["metrics"]["storage"]["by_cloud"].values())
    results["end_to_end"] = {
        "pipeline_s": wall, "pipeline_mb_s": size / MIB / wall, "cp_floor_s": cp_wall,
        "rclone_s": rclone_wall, "pipeline_over_cp": wall / cp_wall,
        "pipeline_over_rclone": wall / rclone_wall if rclone_wall else None,
        "replica_bytes_written": written,
        "stage_breakdown_s": result["metrics"]["stage_breakdown_s"],
        "peak_rss_bytes": rss,
        "cpu_s": result["cpu_s"], "cpu_user_s": result["cpu_user_s"],
        "cpu_sys_s": result["cpu_sys_s"], "cpu_s_per_gib": result["cpu_s"] / (size / 2**30),
    }
    print(f"end to end: pipeline {wall:.2f}s, cp floor {cp_wall:.2f}s, rclone "
          f"{rclone_wall if rclone_wall is None else round(rclone_wall, 2)}s, peak RSS "
          f"{format_bytes(rss)}", flush=True)
    shutil.rmtree(out / "cluster", ignore_errors=True)

    # 3. RSS stays flat with 4x the input
    if args.big:
        big = parse_size(args.big)
        big_source = dataset(out, "data-big", big)
        big_wall, big_rss, _ = run_pipeline(big_source, out / "cluster-big")
        results["rss"] = {"small_bytes": rss, "big_bytes": big_rss, "big_size": big,
                          "big_pipeline_s": big_wall}
        print(f"peak RSS: {format_bytes(rss)} for {format_bytes(size)}, {format_bytes(big_rss)}"
              f" for {format_bytes(big)}", flush=True)
        shutil.rmtree(out / "cluster-big", ignore_errors=True)

    # 4. observability on against off, alternating so drift hits both
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.obs_runs):
        drop_caches()
        off.append(asyncio.run(observed_run(source, out / "obs", observe=False)))
        drop_caches()
        on.append(asyncio.run(observed_run(source, out / "obs", observe=True)))
    if off:
        results["observability"] = {"off_s": off, "on_s": on,
                                    "on_over_off": (sum(on) / len(on)) / (sum(off) / len(off))}
        print(f"observability: off {off}, on {on}", flush=True)

    # 5. processing latency for 100 KiB chunks
    results["processing_latency"] = asyncio.run(processing_latency(out))
    print(f"processing 100 KiB chunks: {results['processing_latency']}", flush=True)

    # 6. cluster mode against embedded
    if args.cluster_runs:
        print("cluster mode against embedded:", flush=True)
        results["cluster_mode"] = cluster_against_embedded(source, out, args.cluster_runs)

    # 7. this revision against an earlier one
    if args.before:
        print(f"embedded, {args.before} against this revision:", flush=True)
        results["before_after"] = embedded_against_revision(source, out, args.before,
                                                            max(args.cluster_runs, 1))

    # 8. object stores: multicloud against rclone, S3 source to S3 + GCS + Azure emulators
    if args.clouds:
        print("object stores (emulators), multicloud against rclone:", flush=True)
        results["clouds"] = cloud_section(source, out)

    # 9. many small files, and the same data again as a new batch
    if args.small_files:
        print("small files:", flush=True)
        results["small_files"] = small_files_section(out, args.small_files)
    print("the same data again as a new batch:", flush=True)
    results["second_batch"] = second_batch_section(source, out)

    # 10. the control plane at scale: simulated nodes, no data
    if args.control_chunks:
        print("control plane at scale (simulated nodes, no data):", flush=True)
        results["control_plane"] = control_plane_section(out, args.control_chunks)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render(results))
    print(render(results))


def render(r: dict[str, Any]) -> str:
    e2e, ing, lat = r["end_to_end"], r["ingestion"], r["processing_latency"]
    lines = [
        f"# Benchmarks ({format_bytes(r['size'])}, {r['cpus']} cores)", "",
        "| measurement | figure |", "|---|---|",
        f"| ingestion, bare read + SHA-256 | {ing['bare_mb_s']:.0f} MiB/s |",
        f"| ingestion, DataIngestionEngine | {ing['engine_mb_s']:.0f} MiB/s "
        f"({ing['ratio']:.2f} of bare) |",
        f"| end to end, pipeline (RF 3, 6 nodes, + sync) | {e2e['pipeline_s']:.2f} s "
        f"({e2e['pipeline_mb_s']:.0f} MiB/s) |",
        f"| disk floor, 3 x cp -r + sync | {e2e['cp_floor_s']:.2f} s |",
        f"| rclone copy --checksum x 3 + sync | "
        f"{'n/a' if e2e['rclone_s'] is None else format(e2e['rclone_s'], '.2f') + ' s'} |",
        f"| pipeline / cp floor | {e2e['pipeline_over_cp']:.2f} |",
        f"| pipeline / rclone | {_ratio(e2e['pipeline_over_rclone'])} |",
        f"| pipeline CPU (user + sys) | {e2e['cpu_s']:.2f} s ({e2e['cpu_user_s']:.2f} + "
        f"{e2e['cpu_sys_s']:.2f}), {e2e['cpu_s_per_gib']:.2f} s per GiB |",
        f"| replica bytes written (compressed) | {format_bytes(e2e['replica_bytes_written'])} |",
        f"| peak RSS | {format_bytes(e2e['peak_rss_bytes'])} |",
    ]
    if "rss" in r:
        lines.append(f"| peak RSS, {format_bytes(r['rss']['big_size'])} input | "
                     f"{format_bytes(r['rss']['big_bytes'])} |")
    if "observability" in r:
        obs = r["observability"]
        lines.append(f"| observability on / off (dashboard, log, /metrics) | "
                     f"{sum(obs['on_s']) / len(obs['on_s']):.2f} s / "
                     f"{sum(obs['off_s']) / len(obs['off_s']):.2f} s "
                     f"({obs['on_over_off']:.3f}) |")
    lines.append(f"| processing 100 KiB chunks, p50 / p99 | {lat['p50_ms']:.1f} / "
                 f"{lat['p99_ms']:.1f} ms |")
    if "cluster_mode" in r:
        cm = r["cluster_mode"]
        lines.append(f"| cluster mode / embedded, pipeline s | {_runs(cm['cluster_s'])} / "
                     f"{_runs(cm['embedded_s'])}: cluster at "
                     f"{cm['cluster_throughput_over_embedded']:.2f} of embedded throughput |")
    if "before_after" in r:
        ba = r["before_after"]
        lines.append(f"| embedded, {ba['rev'][:10]} / this revision, pipeline s | "
                     f"{_runs(ba['before_s'])} / {_runs(ba['after_s'])}: this revision at "
                     f"{ba['after_throughput_over_before']:.2f} of the earlier throughput |")
    lines.extend(render_lines(r))
    if "clouds" in r:
        lines.extend(table_rows(r["clouds"]))
    if "control_plane" in r:
        lines.extend(control_plane_rows(r["control_plane"]))
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


if __name__ == "__main__":
    main()
