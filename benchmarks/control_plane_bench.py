"""Control plane at scale: placement, manifest commits and registry heartbeats, no data.

A cluster of simulated nodes (default 1,000 in four clouds, three regions each, mixed
capacities) and a million chunk ids. No byte moves, so what is timed is the control plane
alone, through the product's own code paths:

- placement: `NetworkAwarePlacement.select_target_nodes` for every chunk id, called as
  `DistributionCoordinator` calls it (RF 3, at least write_quorum, the blob's size), from a
  node of the chunk's source cloud (the four clouds take turns);
- manifest commits: `StorageManager.commit` then `flush(force=False)` for each chunk, as the
  orchestrator's chunk flow does, into a fresh SQLite manifest (a flush is one
  synchronous=FULL transaction). Each chunk has three verified replicas on nodes a cheap
  hash of its id picks (placement is timed apart). A batch of --run-chunks chunks, then a
  batch of --chunks, each with its first and last 10% timed by the wall clock and by CPU
  time, and the bytes it wrote per chunk (/proc/self/io: a cost the noise of a shared
  machine does not blur);
- registry: `RegistryState.register` for every node (a join), `RegistryState.heartbeat`
  (what POST /v1/nodes/{id}/heartbeat runs) for rounds of every node, the failure
  detector's `sweep`, and `MembershipWatcher.apply` of the node list (an orchestrator's
  poll); then heartbeats over HTTP on loopback, `RegistryClient` to `RegistryServer` (both
  in this process, so the figure is a floor);
- memory: the commit path's Python heap growth per chunk (tracemalloc, in a batch of its
  own, with the sites that grow most), RSS growth per chunk over the big batch, peak RSS.

Linearity: the first --run-chunks placements against all --chunks, and the two batches
against each other: ten times the chunks should take about ten times as long.

Usage:
    python benchmarks/control_plane_bench.py [--nodes 1000] [--chunks 1000000]
        [--run-chunks 100000] [--quick] [--json PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multicloud.control.membership import MembershipWatcher, RegistryClient
from multicloud.control.registry import NodeRegistry, WorkerNode
from multicloud.control.registry_server import RegistryServer, RegistryState
from multicloud.core.config import (
    CloudPricing,
    ClusterConfig,
    DistributionConfig,
    NodeSpec,
)
from multicloud.core.types import BlobInfo, Chunk, DistributedChunk, ReplicaAck
from multicloud.core.units import format_bytes
from multicloud.pipeline.manifest import Manifest
from multicloud.pipeline.placement import NetworkAwarePlacement
from multicloud.pipeline.storage import StorageManager

CLOUDS = {
    "aws": ["us-east-1", "us-west-2", "eu-west-1"],
    "gcp": ["us-central1", "us-east1", "europe-west1"],
    "azure": ["eastus", "westus2", "westeurope"],
    "oci": ["us-ashburn-1", "us-phoenix-1", "eu-frankfurt-1"],
}
# The shipped config prices aws, gcp and azure only; a cloud needs a price to be one (OCI's
# list price for egress to the internet).
OCI_PRICING = CloudPricing(internet_usd_per_gb=0.0085, inter_region_usd_per_gb=0.0085)
CAPACITIES_GB = (500.0, 1000.0, 2000.0)  # mixed disks: the weighted hashing has work to do
CHUNK_BYTES = 100 * 1024 * 1024  # the default chunk_size_mb
BLOB_BYTES = 40 * 1024 * 1024  # what a compressed chunk might come to
CHUNKS_PER_FILE = 8
BATCH_ID = "control-plane-bench"
TOKEN = "control-plane-bench"

DEFAULTS = {"nodes": 1000, "chunks": 1_000_000, "run_chunks": 100_000, "memory_chunks": 20_000,
            "heartbeat_rounds": 100, "http_rounds": 2}
QUICK = {"nodes": 100, "chunks": 10_000, "run_chunks": 1_000, "memory_chunks": 1_000,
         "heartbeat_rounds": 5, "http_rounds": 1}


# -- measuring ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """Where a run stands: wall clock, CPU time of every thread, bytes written so far."""

    wall: float
    cpu: float
    written: int | None  # None where /proc/self/io is not there (not Linux)

    @classmethod
    def now(cls) -> Sample:
        """A sample taken now."""
        return cls(time.perf_counter(), time.process_time(), _bytes_written())


def _bytes_written() -> int | None:
    # wchar: every byte handed to write(2) and friends by any thread of this process,
    # page cache or not, so it counts what SQLite writes to its WAL and database.
    try:
        with open("/proc/self/io", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    """Resident set size now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def tenths(total: int) -> list[int]:
    """The item counts at which each tenth of a run of total items ends."""
    if total < 10:
        raise SystemExit(f"a run needs at least 10 items to be cut in tenths, got {total}")
    return [total * k // 10 for k in range(1, 11)]


def run_figures(total: int, samples: list[Sample]) -> dict[str, Any]:
    """Rates of a run cut in tenths (samples: the start, then the end of each tenth)."""
    bounds = [0, *tenths(total)]
    first = (bounds[1] - bounds[0], samples[0], samples[1])
    last = (bounds[10] - bounds[9], samples[9], samples[10])

    def rate(n: int, a: Sample, b: Sample, cpu: bool = False) -> float:
        seconds = (b.cpu - a.cpu) if cpu else (b.wall - a.wall)
        return n / max(seconds, 1e-9)

    figures: dict[str, Any] = {
        "items": total,
        "seconds": samples[10].wall - samples[0].wall,
        "cpu_seconds": samples[10].cpu - samples[0].cpu,
        "per_s": rate(total, samples[0], samples[10]),
        "first_10pct_per_s": rate(*first),
        "last_10pct_per_s": rate(*last),
        "first_10pct_cpu_per_s": rate(*first, cpu=True),
        "last_10pct_cpu_per_s": rate(*last, cpu=True),
        # Each tenth on its own: where a run levels off, or keeps slowing down.
        "tenths_per_s": [rate(bounds[k + 1] - bounds[k], samples[k], samples[k + 1])
                         for k in range(10)],
        "tenths_cpu_per_s": [rate(bounds[k + 1] - bounds[k], samples[k], samples[k + 1],
                                  cpu=True) for k in range(10)],
    }
    figures["last_over_first"] = figures["last_10pct_per_s"] / figures["first_10pct_per_s"]
    figures["last_over_first_cpu"] = (figures["last_10pct_cpu_per_s"]
                                      / figures["first_10pct_cpu_per_s"])
    if all(s.written is not None for s in samples):
        def per_item(n: int, a: Sample, b: Sample) -> float:
            assert a.written is not None
            assert b.written is not None
            return (b.written - a.written) / n
        figures["first_10pct_bytes_written_per_item"] = per_item(*first)
        figures["last_10pct_bytes_written_per_item"] = per_item(*last)
        figures["tenths_bytes_written_per_item"] = [
            per_item(bounds[k + 1] - bounds[k], samples[k], samples[k + 1]) for k in range(10)]
    return figures


# Blocking file-system calls in the coroutines below go through these: the benchmark runs
# one task at a time, so nothing waits on them but the run itself.
def fresh_dir(path: Path) -> None:
    """An empty directory at path."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def dir_bytes(path: Path) -> int:
    """The bytes of the files in a directory (the manifest, its WAL)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def chunk_id(i: int) -> str:
    """The i-th simulated chunk id: a SHA-256, as ingestion makes them."""
    return hashlib.sha256(i.to_bytes(8, "big")).hexdigest()


# -- the simulated cluster ---------------------------------------------------------------

def cluster_config() -> ClusterConfig:
    """The four clouds and their regions (the nodes are made apart, see node_specs)."""
    base = ClusterConfig()
    return ClusterConfig(nodes_per_cloud={}, regions=CLOUDS,
                         clouds={**base.clouds, "oci": OCI_PRICING})


def node_specs(count: int) -> list[NodeSpec]:
    """count nodes dealt round the clouds, their regions and the disk sizes in turn."""
    specs = []
    clouds = list(CLOUDS)
    for i in range(count):
        cloud = clouds[i % len(clouds)]
        k = i // len(clouds)
        regions = CLOUDS[cloud]
        specs.append(NodeSpec(id=f"{cloud}-node-{k + 1}", cloud=cloud,
                              region=regions[k % len(regions)],
                              capacity_gb=CAPACITIES_GB[k % len(CAPACITIES_GB)]))
    return specs


def node_registry(config: ClusterConfig, specs: list[NodeSpec]) -> NodeRegistry:
    """The control plane's view of the nodes: no store, no transport."""
    return NodeRegistry(config, [WorkerNode(spec) for spec in specs])


# -- placement ---------------------------------------------------------------------------

def bench_placement(registry: NodeRegistry, chunks: int, prefix: int) -> dict[str, Any]:
    """select_target_nodes for chunks chunk ids, as distribution asks for them."""
    placement = NetworkAwarePlacement(registry, None, DistributionConfig())
    config = placement.config
    sources = {cloud: [n.id for n in registry.healthy_nodes(cloud)] for cloud in CLOUDS}
    clouds = [c for c in CLOUDS if sources[c]]
    cloud_of = {n.id: n.cloud for n in registry.nodes.values()}
    replicas: Counter[str] = Counter()
    short = 0
    bounds = tenths(chunks)
    samples = [Sample.now()]
    prefix_s = prefix_cpu = None
    tenth = 0
    for i in range(chunks):
        cloud = clouds[i % len(clouds)]
        here = sources[cloud]
        targets = placement.select_target_nodes(
            chunk_id(i), here[(i // len(clouds)) % len(here)], config.replication_factor,
            at_least=config.write_quorum, size_bytes=BLOB_BYTES)
        replicas.update(targets)
        if len({cloud_of[t] for t in targets}) < config.min_clouds:
            short += 1
        done = i + 1
        if done == prefix:
            prefix_s = time.perf_counter() - samples[0].wall
            prefix_cpu = time.process_time() - samples[0].cpu
        if done == bounds[tenth]:
            samples.append(Sample.now())
            tenth += 1
    figures = run_figures(chunks, samples)
    # Within a cloud, replicas per GB of capacity of the busiest node against the cloud's
    # mean: weighted rendezvous hashing should keep this near 1. (Between clouds the shares
    # differ by design: the source cloud first, then the nearest and cheapest.)
    loads: dict[str, list[float]] = {}
    for node in registry.nodes.values():
        loads.setdefault(node.cloud, []).append(replicas[node.id] / (node.capacity_bytes / 1e9))
    total = sum(replicas.values())
    figures.update({
        "cloud_share": {c: sum(replicas[n] for n in cloud_of if cloud_of[n] == c) / total
                        for c in loads},
        "busiest_node_over_cloud_mean": max(max(v) / (sum(v) / len(v)) for v in loads.values()),
        "decision_us": figures["seconds"] / chunks * 1e6,
        "prefix_items": prefix, "prefix_seconds": prefix_s,
        "whole_over_prefix": figures["seconds"] / prefix_s if prefix_s else None,
        "prefix_cpu_seconds": prefix_cpu,
        "whole_over_prefix_cpu": figures["cpu_seconds"] / prefix_cpu if prefix_cpu else None,
        "short_of_min_clouds": short,
    })
    return figures


# -- manifest commits --------------------------------------------------------------------

def replica_nodes(cid: str, node_ids: list[str]) -> list[str]:
    """Three distinct nodes for a chunk, spread by its id (not placement: timed apart)."""
    n = len(node_ids)
    first = int(cid[:12], 16) % n
    step = max(1, n // 3)
    return [node_ids[(first + k * step) % n] for k in range(min(3, n))]


async def commit_batch(workdir: Path, registry: NodeRegistry, chunks: int, *,
                       first: int = 0, batch_id: str = BATCH_ID, fresh: bool = True,
                       keep: bool = False, trace: bool = False) -> dict[str, Any]:
    """A batch of chunks (ids first, first + 1, ...) committed through StorageManager into
    a fresh manifest, or with fresh=False into the one workdir holds (kept by keep=True).

    With trace, the Python heap the commit path keeps per chunk is measured instead (its
    timings are then tracemalloc's, not the product's).
    """
    if fresh:
        fresh_dir(workdir)
    node_ids = sorted(registry.nodes)
    clouds = list(CLOUDS)
    manifest = Manifest(workdir / "manifest.db")
    storage = StorageManager(registry, manifest=manifest, distribution=DistributionConfig())
    try:
        manifest.begin_batch(batch_id, f"/bench/{batch_id}", clouds[0],
                             fingerprint=f"{batch_id}:1")
        storage.begin(batch_id)
        if trace:
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
        rss_before = _rss_bytes()
        bounds = tenths(chunks)
        samples = [Sample.now()]
        tenth = 0
        for i in range(first, first + chunks):
            cid = chunk_id(i)
            index = i % CHUNKS_PER_FILE
            chunk = Chunk(chunk_id=cid, file=f"logs/part-{i // CHUNKS_PER_FILE:08d}.jsonl",
                          index=index, offset=index * CHUNK_BYTES, size_bytes=CHUNK_BYTES,
                          source_cloud=clouds[i % len(clouds)])
            blob = BlobInfo(chunk_id=cid, raw_size=CHUNK_BYTES, blob_size=BLOB_BYTES,
                            blob_checksum=cid[:32], codec="zstd")
            targets = replica_nodes(cid, node_ids)
            acks = [ReplicaAck(t, cid, blob.blob_checksum, BLOB_BYTES, 0.0) for t in targets]
            storage.commit(DistributedChunk(chunk, blob, targets[0], acks))
            await storage.flush(force=False)
            if i + 1 - first == bounds[tenth]:
                if tenth == 9:
                    await storage.flush()  # the last commits are durable before the clock stops
                samples.append(Sample.now())
                tenth += 1
        rss_after = _rss_bytes()
        if trace:
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            growth = after.compare_to(before, "lineno")
            grown = sum(s.size_diff for s in growth)
            return {"chunks": chunks, "heap_bytes_per_chunk": grown / chunks,
                    "top_sites": [{"site": str(s.traceback), "bytes_per_chunk":
                                   s.size_diff / chunks} for s in growth[:3]]}
        if manifest.blob(chunk_id(first + chunks - 1)) is None:
            raise SystemExit("the manifest lost the last chunk of the batch")
        figures = run_figures(chunks, samples)
        on_disk = dir_bytes(workdir)
        figures.update({"rss_growth_per_chunk": (rss_after - rss_before) / chunks,
                        "on_disk_bytes_per_chunk": on_disk / (first + chunks)})
        return figures
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        storage.close()
        manifest.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


# -- registry ------------------------------------------------------------------------------

async def bench_registry(workdir: Path, config: ClusterConfig, specs: list[NodeSpec],
                         rounds: int, http_rounds: int) -> dict[str, Any]:
    """Joins, heartbeats, sweeps and polls of the registry service, for every node."""
    fresh_dir(workdir)
    state = RegistryState(workdir, config.service)
    half = len(specs) // 2
    marks = [time.perf_counter()]
    for i, spec in enumerate(specs):
        state.register({"id": spec.id, "cloud": spec.cloud, "region": spec.region,
                        "url": f"http://10.{i // 250 % 256}.{i % 250}.1:7410",
                        "capacity_bytes": int(spec.capacity_gb * 1024**3)})
        if i + 1 in (half, len(specs)):
            marks.append(time.perf_counter())
    joins = {"first_half_per_s": half / (marks[1] - marks[0]),
             "second_half_per_s": (len(specs) - half) / (marks[2] - marks[1])}
    joins["second_over_first"] = joins["second_half_per_s"] / joins["first_half_per_s"]

    total = rounds * len(specs)
    bounds = tenths(total)
    samples = [Sample.now()]
    done = tenth = 0
    for r in range(rounds):
        payload = {"chunks": r, "bytes": r * BLOB_BYTES, "inflight": r % 4}
        for spec in specs:
            if state.heartbeat(spec.id, payload) is None:
                raise SystemExit(f"the registry forgot {spec.id}")
            done += 1
            if done == bounds[tenth]:
                samples.append(Sample.now())
                tenth += 1
    heartbeats = run_figures(total, samples)

    repeats = 20
    started = time.perf_counter()
    for _ in range(repeats):
        state.sweep()
    sweep_ms = (time.perf_counter() - started) / repeats * 1000
    started = time.perf_counter()
    for _ in range(repeats):
        views = state.views()
    views_ms = (time.perf_counter() - started) / repeats * 1000

    # An orchestrator's side: the first poll adds every node, the later ones only check.
    watched = NodeRegistry(config, [])
    watcher = MembershipWatcher(watched, "http://127.0.0.1:9", TOKEN, 1.0)
    try:
        watcher.apply(views)
        started = time.perf_counter()
        for _ in range(repeats):
            watcher.apply(views)
        apply_ms = (time.perf_counter() - started) / repeats * 1000
    finally:
        await watcher.stop()
    if len(watched.healthy_nodes()) != len(specs):
        raise SystemExit("the membership poll did not bring every node in")

    # Over HTTP: the server loads the membership the joins above wrote.
    server = RegistryServer(workdir, TOKEN, config.service, "127.0.0.1", 0)
    url = await server.start()
    client = RegistryClient(url, TOKEN)
    gate = asyncio.Semaphore(32)  # heartbeats in flight at once, as many nodes would send

    async def beat(node_id: str) -> None:
        async with gate:
            if not await client.heartbeat(node_id, {"chunks": 1, "bytes": BLOB_BYTES}, 30.0):
                raise SystemExit(f"the registry over HTTP does not know {node_id}")

    try:
        started = time.perf_counter()
        await asyncio.gather(*(beat(s.id) for _ in range(http_rounds) for s in specs))
        http_s = time.perf_counter() - started
    finally:
        await client.close()
        await server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"nodes": len(specs), "joins": joins, "heartbeats": heartbeats,
            "sweep_ms": sweep_ms, "views_ms": views_ms, "poll_apply_ms": apply_ms,
            "http_heartbeats": http_rounds * len(specs),
            "http_heartbeats_per_s": http_rounds * len(specs) / http_s}


# -- the whole run -------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in order: registry, placement, the two batches, memory."""
    workdir: Path = args.workdir
    config = cluster_config()
    specs = node_specs(args.nodes)
    registry = node_registry(config, specs)
    run_chunks = min(args.run_chunks, args.chunks)
    results: dict[str, Any] = {
        "nodes": args.nodes, "clouds": {c: sum(s.cloud == c for s in specs) for c in CLOUDS},
        "regions": sum(len(r) for r in CLOUDS.values()), "chunks": args.chunks,
        "run_chunks": run_chunks, "cpus": os.cpu_count(), "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    print(f"registry: {args.nodes} joins, {args.heartbeat_rounds} rounds of heartbeats ...",
          flush=True)
    results["registry"] = await bench_registry(workdir / "registry", config, specs,
                                               args.heartbeat_rounds, args.http_rounds)
    print(f"placement: {args.chunks:,} decisions ...", flush=True)
    results["placement"] = bench_placement(registry, args.chunks, run_chunks)
    print(f"manifest: a batch of {run_chunks:,} chunks ...", flush=True)
    results["manifest_run"] = await commit_batch(workdir / "manifest", registry, run_chunks)
    print(f"manifest: a batch of {args.chunks:,} chunks ...", flush=True)
    results["manifest_big"] = await commit_batch(workdir / "manifest", registry, args.chunks,
                                                 keep=True)
    # A fresh manifest's first tens of thousands of chunks go into small B-trees, and cost
    # less: the same batch into the big manifest shows the run without that warm-up.
    print(f"manifest: a batch of {run_chunks:,} chunks into that manifest ...", flush=True)
    results["manifest_warm"] = await commit_batch(workdir / "manifest", registry, run_chunks,
                                                  first=args.chunks, batch_id=f"{BATCH_ID}-2",
                                                  fresh=False)
    big, small = results["manifest_big"], results["manifest_run"]
    results["manifest_big_over_run"] = big["seconds"] / small["seconds"]
    results["manifest_big_over_run_cpu"] = big["cpu_seconds"] / small["cpu_seconds"]
    memory_chunks = min(args.memory_chunks, args.chunks)
    print(f"memory: a batch of {memory_chunks:,} chunks under tracemalloc ...", flush=True)
    results["memory"] = await commit_batch(workdir / "manifest", registry, memory_chunks,
                                           trace=True)
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return results


# -- report --------------------------------------------------------------------------------

def _rate(x: float) -> str:
    return f"{x:,.0f}/s"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _written(f: dict[str, Any]) -> str:
    if "first_10pct_bytes_written_per_item" not in f:
        return ""
    return (f"; written {format_bytes(round(f['first_10pct_bytes_written_per_item']))} / "
            f"{format_bytes(round(f['last_10pct_bytes_written_per_item']))} per chunk")


def _run_rows(label: str, f: dict[str, Any]) -> list[str]:
    return [
        f"| {label}: commits/s | {_rate(f['per_s'])} ({f['seconds']:.1f} s) |",
        f"| {label}: first / last 10%, wall | {_rate(f['first_10pct_per_s'])} / "
        f"{_rate(f['last_10pct_per_s'])} (last/first {_ratio(f['last_over_first'])}) |",
        f"| {label}: first / last 10%, CPU | {_rate(f['first_10pct_cpu_per_s'])} / "
        f"{_rate(f['last_10pct_cpu_per_s'])} (last/first {_ratio(f['last_over_first_cpu'])})"
        f"{_written(f)} |",
    ]


def table_rows(r: dict[str, Any]) -> list[str]:
    """Rows for a markdown table (| measurement | figure |); run_benchmarks uses them too."""
    if "error" in r:
        return [f"| control plane | failed: {r['error']} |"]
    pl, reg, mem = r["placement"], r["registry"], r["memory"]
    hb, joins = reg["heartbeats"], reg["joins"]
    run_n, big_n = f"{r['run_chunks']:,}", f"{r['chunks']:,}"
    linear = r["chunks"] / r["run_chunks"]
    clouds = ", ".join(f"{c} {n}" for c, n in r["clouds"].items())
    return [
        f"| control plane: cluster | {r['nodes']:,} simulated nodes ({clouds}), "
        f"{r['regions']} regions; {r['cpus']} cores, Python {r['python']}, "
        f"SQLite {r['sqlite']} |",
        f"| placement (RF 3), {big_n} chunk ids: decisions/s | {_rate(pl['per_s'])} "
        f"({pl['decision_us']:.0f} us each, {pl['seconds']:.1f} s) |",
        f"| placement: first / last 10% | {_rate(pl['first_10pct_per_s'])} / "
        f"{_rate(pl['last_10pct_per_s'])} (last/first {_ratio(pl['last_over_first'])}) |",
        f"| placement: {run_n} vs {big_n} chunks (linear: x{linear:.0f}) | wall "
        f"{pl['prefix_seconds']:.1f} s vs {pl['seconds']:.1f} s "
        f"(x{_ratio(pl['whole_over_prefix'])}); CPU {pl['prefix_cpu_seconds']:.1f} s vs "
        f"{pl['cpu_seconds']:.1f} s (x{_ratio(pl['whole_over_prefix_cpu'])}) |",
        f"| placement: short of min_clouds; replicas by cloud; busiest node / its cloud's "
        f"mean (replicas per GB) | {pl['short_of_min_clouds']}; "
        + ", ".join(f"{c} {share:.0%}" for c, share in pl["cloud_share"].items())
        + f"; {pl['busiest_node_over_cloud_mean']:.2f} |",
        *_run_rows(f"manifest, batch of {run_n}", r["manifest_run"]),
        *_run_rows(f"manifest, batch of {big_n}", r["manifest_big"]),
        *_run_rows(f"manifest, batch of {run_n} into that manifest", r["manifest_warm"]),
        f"| manifest: {run_n} vs {big_n} chunks, fresh manifests (linear: x{linear:.0f}) | "
        f"wall {r['manifest_run']['seconds']:.1f} s vs {r['manifest_big']['seconds']:.1f} s "
        f"(x{_ratio(r['manifest_big_over_run'])}); CPU "
        f"{r['manifest_run']['cpu_seconds']:.1f} s vs {r['manifest_big']['cpu_seconds']:.1f} s"
        f" (x{_ratio(r['manifest_big_over_run_cpu'])}) |",
        f"| manifest: on disk per chunk; RSS growth per chunk ({big_n}) | "
        f"{format_bytes(round(r['manifest_big']['on_disk_bytes_per_chunk']))}; "
        f"{format_bytes(round(r['manifest_big']['rss_growth_per_chunk']))} |",
        f"| commit path: Python heap kept per chunk (tracemalloc, {mem['chunks']:,} chunks; "
        f"top sites by where it was allocated) | "
        f"{format_bytes(round(mem['heap_bytes_per_chunk']))}: "
        + "; ".join(f"{_site(s['site'])} {format_bytes(round(s['bytes_per_chunk']))}"
                    for s in mem["top_sites"]) + " |",
        f"| peak RSS | {format_bytes(r['peak_rss_bytes'])} |",
        f"| registry: joins/s, first / second half of {reg['nodes']:,} | "
        f"{_rate(joins['first_half_per_s'])} / {_rate(joins['second_half_per_s'])} "
        f"(second/first {_ratio(joins['second_over_first'])}) |",
        f"| registry: heartbeats/s ({hb['items']:,}, in-process) | {_rate(hb['per_s'])}; "
        f"first / last 10% {_rate(hb['first_10pct_per_s'])} / {_rate(hb['last_10pct_per_s'])}"
        f" (last/first {_ratio(hb['last_over_first'])}) |",
        f"| registry: heartbeats/s over HTTP ({reg['http_heartbeats']:,}, loopback, client "
        f"and server in one process) | {_rate(reg['http_heartbeats_per_s'])} |",
        f"| registry: failure-detector sweep; node list; orchestrator poll applied "
        f"({reg['nodes']:,} nodes) | {reg['sweep_ms']:.2f} ms; {reg['views_ms']:.2f} ms; "
        f"{reg['poll_apply_ms']:.2f} ms |",
    ]


def _site(site: str) -> str:
    """"…/multicloud/pipeline/storage.py:123" -> "storage.py:123"."""
    return Path(site).name


def render(r: dict[str, Any]) -> str:
    """The report as markdown."""
    return "\n".join(["# Control plane at scale", "", "| measurement | figure |", "|---|---|",
                      *table_rows(r)]) + "\n"


def control_plane_section(out: Path, chunks: int | None = None) -> dict[str, Any]:
    """For run_benchmarks: run this benchmark in a child (its own peak RSS) and return its
    figures, or {"error": ...} (the other sections' figures are kept either way)."""
    json_path = out / "control-plane.json"
    cmd = [sys.executable, str(Path(__file__)), "--json", str(json_path),
           "--workdir", str(out / "control-plane")]
    if chunks is not None:
        cmd += ["--chunks", str(chunks), "--run-chunks", str(max(10, chunks // 10))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                else f"exit code {done.returncode}"}
    result: dict[str, Any] = json.loads(json_path.read_text())
    print(render(result), end="", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, help=f"simulated nodes ({DEFAULTS['nodes']:,})")
    parser.add_argument("--chunks", type=int,
                        help=f"chunk ids placed, and the big batch ({DEFAULTS['chunks']:,})")
    parser.add_argument("--run-chunks", type=int,
                        help=f"the batch cut in tenths ({DEFAULTS['run_chunks']:,})")
    parser.add_argument("--memory-chunks", type=int,
                        help=f"the batch under tracemalloc ({DEFAULTS['memory_chunks']:,})")
    parser.add_argument("--heartbeat-rounds", type=int,
                        help=f"heartbeats of every node ({DEFAULTS['heartbeat_rounds']})")
    parser.add_argument("--http-rounds", type=int,
                        help=f"of them over HTTP ({DEFAULTS['http_rounds']})")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, seconds: " + ", ".join(
                            f"{k.replace('_', '-')} {v:,}" for k, v in QUICK.items()))
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures")
    parser.add_argument("--workdir", type=Path,
                        help="where the manifests and the registry's file go (a temp dir)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.nodes < 3:
        parser.error("--nodes must be at least 3 (RF 3)")
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = Path(tempfile.mkdtemp(prefix="control-plane-"))
    try:
        results = asyncio.run(run(args))
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(render(results), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
