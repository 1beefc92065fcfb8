"""The `multicloud` command line: the only place that talks to the terminal.

Every error the library raises on purpose is shown as one line (`error: ...`) with exit
code 2; nothing prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from multicloud.cluster.local import create_local_cluster
from multicloud.comm.cluster import Cluster
from multicloud.core.auth import TOKEN_ENV, resolve_token
from multicloud.core.config import PipelineConfig, load_config
from multicloud.core.errors import MulticloudError, UsageError
from multicloud.core.host import limit_malloc_arenas
from multicloud.core.types import PipelineResult
from multicloud.core.units import display_path, format_bytes, parse_size
from multicloud.pipeline.maintenance import GC_GRACE_S, MaintenanceReport
from multicloud.pipeline.storage import MANIFEST_FILE
from multicloud.run.orchestrator import PipelineOrchestrator
from multicloud.ui.render import node_table, print_summary, run_with_progress
from multicloud.ui.simulate import add_simulate_parser, run_simulate

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_LOG_FILE = "logs/pipeline.log"  # as multicloud.ui.logger
DEFAULT_DATA_DIR = ".multicloud"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="multicloud",
        description="Move batches of data across clouds and keep every byte durable.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("gen-data", help="write a realistic, deterministic dataset")
    gen.add_argument("dest", type=Path, help="directory to create")
    gen.add_argument("--size", default="1GiB", help="total size, e.g. 500MiB, 1GiB")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(handler=cmd_gen_data)

    def common(p: argparse.ArgumentParser, cluster: bool = True) -> None:
        p.add_argument("--config-dir", type=Path, default=Path("config"),
                       help="YAML config dir (missing files mean defaults)")
        p.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR),
                       help="where the manifest (and the embedded cluster's nodes) live")
        if cluster:
            p.add_argument("--cluster", metavar="URL",
                           help="registry URL of a running cluster (default: embedded)")
        p.add_argument("--token-file", type=Path,
                       help=f"cluster token (default: ${TOKEN_ENV}, else DATA_DIR/token)")

    run = sub.add_parser("run", help="run the pipeline on a source directory, file or bucket")
    run.add_argument("--source", required=True,
                     help="directory, file, or bucket URL (s3://, gs://, az://, https://"
                          "ACCOUNT.blob.core.windows.net/...)")
    run.add_argument("--batch-id", help="batch id (default: batch-<timestamp>)")
    run.add_argument("--source-cloud", help="cloud the source lives in (default: from path)")
    run.add_argument("--force-cross-cloud", action="store_true",
                     help="guarantee a replica outside the source cloud")
    run.add_argument("--replace", action="store_true",
                     help="let --batch-id name this content even if it named other content")
    run.add_argument("--follow-symlinks", action="store_true",
                     help="store what symlinks point to (files, and directories walked) "
                          "instead of the links themselves")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--no-dashboard", action="store_true",
                     help="plain progress bars instead of the live dashboard")
    run.add_argument("--log-file", type=Path, default=Path(DEFAULT_LOG_FILE),
                     help="JSON-lines event log (default: logs/pipeline.log)")
    run.add_argument("--metrics-port", type=int, default=0,
                     help="serve /metrics and /status here (default: any free port)")
    common(run)
    run.set_defaults(handler=cmd_run)

    prof = sub.add_parser("profile", help="run a batch N times, find the bottleneck, "
                                          "recommend config")
    prof.add_argument("--source", required=True, help="directory or file to run")
    prof.add_argument("--runs", type=int, default=5)
    prof.add_argument("--out", type=Path, default=Path("profile-out"),
                      help="where report.md and the charts go")
    prof.add_argument("--config-dir", type=Path, default=Path("config"))
    prof.add_argument("--apply", dest="apply_dir", type=Path, metavar="DIR",
                      help="also write the recommended config to DIR")
    prof.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                      help="run two config dirs on the source and show the difference")
    prof.add_argument("--nodes", help="nodes per cloud, e.g. aws=3,gcp=3")
    prof.add_argument("--no-charts", action="store_true")
    prof.set_defaults(handler=cmd_profile)

    status = sub.add_parser("status", help="live view of the cluster and its current batch")
    status.add_argument("--watch", action="store_true", help="keep refreshing until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    status.add_argument("--json", action="store_true")
    common(status)
    status.set_defaults(handler=cmd_status)

    restore = sub.add_parser("restore", help="rebuild a batch's files byte-exact")
    restore.add_argument("batch_id")
    restore.add_argument("--to", dest="dest", required=True,
                         help="destination folder, or bucket URL (s3://bucket/prefix/, ...)")
    restore.add_argument("--json", action="store_true")
    common(restore)
    restore.set_defaults(handler=cmd_restore)

    verify = sub.add_parser("verify", help="check every replica of a batch")
    verify.add_argument("batch_id")
    verify.add_argument("--json", action="store_true")
    common(verify)
    verify.set_defaults(handler=cmd_verify)

    batches = sub.add_parser("batches", help="list the batches the manifest knows")
    batches.add_argument("--json", action="store_true")
    common(batches)
    batches.set_defaults(handler=cmd_batches)

    delete = sub.add_parser("delete", help="remove a batch from the catalogue (gc frees "
                                          "its bytes)")
    delete.add_argument("batch_id")
    common(delete)
    delete.set_defaults(handler=cmd_delete)

    recover = sub.add_parser("recover", help="rebuild the local catalogue from the nodes")
    recover.add_argument("--json", action="store_true")
    common(recover)
    recover.set_defaults(handler=cmd_recover)

    repair = sub.add_parser("repair", help="scrub replicas and bring every chunk back to "
                                          "the replication factor")
    repair.add_argument("batch_id", nargs="?", help="the batch to repair")
    repair.add_argument("--all", action="store_true", help="every completed batch")
    repair.add_argument("--json", action="store_true")
    common(repair)
    repair.set_defaults(handler=cmd_repair)

    gc = sub.add_parser("gc", help="remove objects no batch references, and replicas "
                                  "above the replication factor")
    gc.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    gc.add_argument("--grace", type=float, default=GC_GRACE_S, metavar="SECONDS",
                    help="while a run is live, keep objects younger than this "
                         f"(default {GC_GRACE_S:.0f})")
    gc.add_argument("--json", action="store_true")
    common(gc)
    gc.set_defaults(handler=cmd_gc)

    demo = sub.add_parser("demo", help="the five-minute demo: status, run, results, "
                                       "failure recovery, statistics")
    demo.add_argument("--cluster-mode", action="store_true",
                      help="real registry and node processes (a node is SIGKILLed mid-run)")
    demo.add_argument("--clouds", action="store_true",
                      help="source and replicas in S3, GCS and Azure Blob buckets (loopback "
                           "emulators the demo starts and stops)")
    demo.add_argument("--size", default="1GiB", help="dataset size (default 1GiB)")
    demo.add_argument("--workdir", type=Path, default=Path("demo-data"))
    demo.add_argument("--config-dir", type=Path, default=Path("config"))
    demo.add_argument("--cluster", metavar="URL",
                      help="use a running cluster (see docs/setup.md) instead of starting one")
    demo.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR),
                      help="with --cluster: where its token is and the manifest goes")
    demo.set_defaults(handler=cmd_demo)

    reg = sub.add_parser("registry", help="run the node registry service (cluster mode)")
    reg.add_argument("--host", help="bind address (default: loopback, from cluster_config.yml)")
    reg.add_argument("--port", type=int, help="port (default 7400; 0 picks a free one)")
    common(reg, cluster=False)
    reg.set_defaults(handler=cmd_registry)

    node = sub.add_parser("node", help="run a worker node (cluster mode)")
    node.add_argument("--cloud", default=os.environ.get("CLOUD_PROVIDER"),
                      help="cloud of this node (default: $CLOUD_PROVIDER)")
    node.add_argument("--region", help="region (default: the cloud's first region)")
    node.add_argument("--id", dest="node_id", help="node id (default: the registry names it)")
    node.add_argument("--host", help="bind address (default: loopback)")
    node.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    node.add_argument("--registry", default="http://127.0.0.1:7400", help="registry URL")
    node.add_argument("--allow-faults", action="store_true",
                      help="take fault-injection requests (crash, partition...): tests only")
    common(node, cluster=False)
    node.set_defaults(handler=cmd_node)

    cluster = sub.add_parser("cluster", help="inspect the cluster")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    status = cluster_sub.add_parser("status", help="nodes by cloud, health, chunks stored")
    status.add_argument("--json", action="store_true")
    common(status)
    status.set_defaults(handler=cmd_cluster_status)
    up = cluster_sub.add_parser("up", help="start the registry and the config's nodes")
    up.add_argument("--registry-port", type=int, help="default from cluster_config.yml; 0: any")
    up.add_argument("--node-base-port", type=int, help="first node port; 0: any free ports")
    up.add_argument("--json", action="store_true")
    common(up, cluster=False)
    up.set_defaults(handler=cmd_cluster_up)
    down = cluster_sub.add_parser("down", help="stop what `cluster up` started")
    common(down, cluster=False)
    down.set_defaults(handler=cmd_cluster_down)
    add_simulate_parser(sub, cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    limit_malloc_arenas()  # before any thread: see its docstring
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("multicloud").setLevel(logging.CRITICAL)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except MulticloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        # The library maps the OS errors it expects; one it did not (a full disk under a
        # file the CLI itself writes, say) still ends in one line, not a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


async def _open(args: argparse.Namespace,
                read_only: bool = False) -> tuple[PipelineConfig, Cluster]:
    """The config, and the cluster: embedded under the data dir, or running at --cluster.

    read_only: the command only reads, so the embedded cluster's membership is not changed.
    """
    from multicloud.cluster.remote import connect_cluster

    config = load_config(args.config_dir)
    if getattr(args, "cluster", None):
        token = resolve_token(args.token_file, args.data_dir)
        registry = await connect_cluster(args.cluster, token, config.cluster,
                                         data_dir=args.data_dir)
        return config, registry
    registry = create_local_cluster(args.data_dir, config=config.cluster, storage=config.storage,
                                    join=not read_only)
    return config, registry


async def _open_catalogue(args: argparse.Namespace, batch_id: str | None = None, *,
                          unreadable_ok: bool = False,
                          ) -> tuple[Cluster, PipelineOrchestrator]:
    """The cluster and an orchestrator on its catalogue, for commands that read batches.

    The local manifest is a cache: when it is missing (a fresh machine, a lost disk), or
    does not know the batch asked for, it is rebuilt from the catalogue on the nodes.
    """
    embedded = not getattr(args, "cluster", None)
    if (embedded and not (args.data_dir / MANIFEST_FILE).exists()
            and not (args.data_dir / "cluster.json").exists()):
        raise UsageError(f"no pipeline has run with data dir {args.data_dir} yet: "
                         f"run `multicloud run --source DIR --data-dir {args.data_dir}` first")
    config, registry = await _open(args, read_only=True)
    orchestrator = PipelineOrchestrator(registry, config=config)
    try:
        report = await orchestrator.knows(batch_id, unreadable_ok=unreadable_ok)
        if report is not None and report.batches:
            print(f"rebuilt the catalogue from the cluster: {len(report.batches)} "
                  f"batch(es)", file=sys.stderr)
    except BaseException:
        await orchestrator.close()
        await registry.close()
        raise
    return registry, orchestrator


async def _close(registry: Cluster, orchestrator: PipelineOrchestrator) -> None:
    await orchestrator.close()
    await registry.close()


async def cmd_demo(args: argparse.Namespace) -> int:
    """multicloud demo."""
    from multicloud.ui.demo import DemoOptions, run_demo

    if args.clouds and (args.cluster_mode or args.cluster):
        raise UsageError("--clouds runs on the embedded cluster: leave out --cluster-mode "
                         "and --cluster")
    options = DemoOptions(workdir=args.workdir, config_dir=args.config_dir,
                          size=parse_size(args.size), cluster_mode=args.cluster_mode,
                          registry_url=args.cluster, data_dir=args.data_dir,
                          clouds=args.clouds)
    ok = await run_demo(options)
    return EXIT_OK if ok else EXIT_FAILED


async def cmd_registry(args: argparse.Namespace) -> int:
    """multicloud registry: serve membership and failure detection until stopped."""
    from multicloud.cluster.anti_entropy import AntiEntropy
    from multicloud.control.registry_server import RegistryServer
    from multicloud.core.runfiles import wait_for_signal, write_ready_file

    config = load_config(args.config_dir)
    service = config.cluster.service
    token = resolve_token(args.token_file, args.data_dir, create=True)
    server = RegistryServer(args.data_dir, token, service, host=args.host or service.host,
                            port=service.registry_port if args.port is None else args.port)
    url = await server.start()
    ready = write_ready_file(args.data_dir, "registry", url)
    print(f"registry listening on {url} (token in {args.data_dir / 'token'}, ready file "
          f"{ready})", flush=True)
    repairs = asyncio.create_task(AntiEntropy(url, token, config, args.data_dir).run_forever(),
                                  name="anti-entropy")
    try:
        await wait_for_signal()
    finally:
        repairs.cancel()
        await asyncio.gather(repairs, return_exceptions=True)
        await server.stop()
    return EXIT_OK


async def cmd_node(args: argparse.Namespace) -> int:
    """multicloud node: serve chunks and processing until stopped (SIGTERM drains)."""
    from multicloud.cluster.node_server import NodeServer
    from multicloud.core.runfiles import wait_for_signal, write_ready_file

    config = load_config(args.config_dir)
    if not args.cloud:
        raise UsageError("a node needs a cloud: pass --cloud aws or set CLOUD_PROVIDER")
    regions = config.cluster.regions.get(args.cloud)
    region = args.region or (regions[0] if regions else None)
    if region is None:
        raise UsageError(f"cloud {args.cloud!r} has no regions in cluster_config.yml "
                         f"(known: {', '.join(sorted(config.cluster.regions))}); pass --region")
    service = config.cluster.service
    token = resolve_token(args.token_file, args.data_dir)
    server = NodeServer(args.data_dir, token, args.cloud, region, node_id=args.node_id,
                        registry_url=args.registry, service=service,
                        host=args.host or service.host, port=args.port,
                        capacity_bytes=int(config.cluster.node_capacity_gb * 1024**3),
                        fsync=config.storage.fsync, allow_faults=args.allow_faults,
                        cluster=config.cluster)  # its store: node_stores / nodes[].store
    try:
        url = await server.start()
        write_ready_file(args.data_dir, server.node_id or "node", url)
        print(f"node {server.node_id} ({args.cloud}/{region}) serving on {url}", flush=True)
        await wait_for_signal()
    finally:
        await server.stop()
    return EXIT_OK


async def cmd_gen_data(args: argparse.Namespace) -> int:
    """multicloud gen-data DIR --size 1GiB."""
    from multicloud.datagen import generate_dataset

    size = parse_size(args.size)
    console = Console(stderr=True)
    with console.status(f"writing {format_bytes(size)} to {args.dest} ..."):
        summary = await asyncio.to_thread(generate_dataset, args.dest, size, args.seed)
    console.print(f"wrote {summary.files} files, {format_bytes(summary.total_bytes)} "
                  f"to {summary.root}")
    return EXIT_OK


async def cmd_run(args: argparse.Namespace) -> int:
    """multicloud run --source DIR|FILE|BUCKET-URL."""
    from multicloud.core.runfiles import write_ready_file
    from multicloud.ui.dashboard import run_with_dashboard, should_use_dashboard
    from multicloud.ui.logger import PipelineLogger
    from multicloud.ui.prometheus import MetricsServer

    config, registry = await _open(args)
    orchestrator = PipelineOrchestrator(registry, config=config)
    batch_config: dict[str, Any] = {"data_source": args.source,
                                    "force_cross_cloud": args.force_cross_cloud}
    if args.batch_id:
        batch_config["batch_id"] = args.batch_id
    if args.replace:
        batch_config["replace"] = True
    if args.source_cloud:
        batch_config["source_cloud"] = args.source_cloud
    batch_config["follow_symlinks"] = args.follow_symlinks
    logger = PipelineLogger(args.log_file)
    logger.attach(orchestrator)
    token = resolve_token(args.token_file, args.data_dir) if args.cluster else None
    server = MetricsServer(orchestrator.live, host=config.cluster.service.host,
                           port=args.metrics_port, token=token)
    console = Console(stderr=True)
    ready: Path | None = None
    try:
        url = await server.start()
        ready = write_ready_file(args.data_dir, "orchestrator", url)
        if args.json or not console.is_terminal:
            work = orchestrator.run_pipeline(batch_config)
        elif args.no_dashboard or args.verbose or not should_use_dashboard(console):
            work = run_with_progress(orchestrator, batch_config)
        else:
            work = run_with_dashboard(orchestrator, batch_config, console)
        stopped_by = await _until_signal(work)
        if isinstance(stopped_by, signal.Signals):
            print(f"interrupted ({stopped_by.name}): batch {orchestrator.current_batch} "
                  f"marked interrupted; run the same command to resume it", file=sys.stderr)
            return 128 + stopped_by.value
        result = stopped_by
    finally:
        if ready is not None:
            ready.unlink(missing_ok=True)
        await server.stop()
        logger.close()
        await orchestrator.close()
        await registry.close()
    if result.metrics.get("already_done"):
        print(f"batch {result.batch_id} is already complete with this content: nothing to "
              f"do (restore it with `multicloud restore {result.batch_id} --to DIR`)")
        return EXIT_OK
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_summary(Console(), result)
    if result.status != "success":
        if not args.json:
            print(f"error: {result.error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


async def _until_signal(work: Coroutine[Any, Any, PipelineResult],
                        ) -> PipelineResult | signal.Signals:
    """Run work; SIGINT or SIGTERM cancel it (the run then drains, records what it
    committed and marks the batch interrupted) and are returned instead of its result."""
    task = asyncio.ensure_future(work)
    received: list[signal.Signals] = []
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        if not received:
            received.append(sig)
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await task
    except asyncio.CancelledError:
        if received and task.cancelled():
            return received[0]
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def cmd_profile(args: argparse.Namespace) -> int:
    """multicloud profile --source DIR [--runs N] [--apply DIR] [--compare OLD NEW]."""
    from multicloud.ui.profile_runs import compare_configs, run_profile

    nodes = _parse_nodes(args.nodes) if args.nodes else None
    console = Console(stderr=True)

    def progress(i: int, runs: int, result: PipelineResult) -> None:
        console.print(f"run {i}/{runs}: {result.duration_seconds:.2f}s, "
                      f"{result.metrics.get('throughput_mb_s', 0):.1f} MB/s")

    if args.compare:
        old, new = args.compare
        comparison = await compare_configs(args.source, old, new, runs=args.runs,
                                           out_dir=args.out, nodes_per_cloud=nodes,
                                           on_run=progress)
        print(comparison.to_markdown())
        return EXIT_OK
    outcome = await run_profile(args.source, runs=args.runs, config_dir=args.config_dir,
                                out_dir=args.out, nodes_per_cloud=nodes,
                                apply_dir=args.apply_dir, on_run=progress,
                                charts=not args.no_charts)
    print(outcome.report_path.read_text())
    for chart in outcome.charts:
        print(f"chart: {chart}")
    if outcome.applied_dir is not None:
        print(f"recommended config written to {outcome.applied_dir}; measure it with "
              f"`multicloud profile --source {args.source} --compare {args.config_dir} "
              f"{outcome.applied_dir}`")
    return EXIT_OK


def _parse_nodes(text: str) -> dict[str, int]:
    """"aws=3,gcp=3" as a dict, with a clear error for anything else."""
    nodes: dict[str, int] = {}
    for part in text.split(","):
        cloud, _, count = part.partition("=")
        if not cloud.strip() or not count.strip().isdigit():
            raise UsageError(f"--nodes {text!r}: expected cloud=count pairs, e.g. aws=3,gcp=3")
        nodes[cloud.strip()] = int(count)
    return nodes


async def cmd_status(args: argparse.Namespace) -> int:
    """multicloud status [--watch]: the cluster's nodes and the running batch, if any."""
    from multicloud.cluster.launcher import read_state
    from multicloud.ui.dashboard import DashboardView, should_use_dashboard, watch_status
    from multicloud.ui.prometheus import fetch_status

    state = read_state(args.data_dir)
    if not args.cluster and state is not None:
        args.cluster = state["registry"]
    _, registry = await _open(args, read_only=True)
    token = resolve_token(args.token_file, args.data_dir) if args.cluster else None

    async def snapshot() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        nodes = await registry.report()
        return await fetch_status(args.data_dir, token), nodes

    async def fetch() -> DashboardView:
        status, nodes = await snapshot()
        return DashboardView.from_status(status, nodes)

    try:
        if args.json:
            status, nodes = await snapshot()
            print(json.dumps({"status": status, "nodes": nodes}, indent=2, default=str))
            return EXIT_OK
        console = Console()
        await watch_status(fetch, console, interval_s=args.interval,
                           once=not args.watch or not should_use_dashboard(console))
    finally:
        await registry.close()
    return EXIT_OK


async def cmd_restore(args: argparse.Namespace) -> int:
    """multicloud restore BATCH --to DIR|BUCKET-URL."""
    registry, orchestrator = await _open_catalogue(args, args.batch_id)
    try:
        report = await orchestrator.restore_batch(args.batch_id, args.dest)
    finally:
        await _close(registry, orchestrator)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"restored {report.files_restored} files, {format_bytes(report.bytes_restored)} "
              f"to {display_path(str(args.dest))}; every chunk and file verified")
        if report.skipped_links:
            print(f"left out {len(report.skipped_links)} symlink(s): a bucket holds no links "
                  f"(restore to a folder to get them back)")
        for problem in report.skipped_replicas:
            print(f"skipped {problem.problem} replica of {problem.chunk_id[:16]} on "
                  f"{problem.node_id}")
    return EXIT_OK


async def cmd_verify(args: argparse.Namespace) -> int:
    """multicloud verify BATCH."""
    registry, orchestrator = await _open_catalogue(args, args.batch_id)
    try:
        report = await orchestrator.verify_batch(args.batch_id)
    finally:
        await _close(registry, orchestrator)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        if not report.complete:
            print(f"batch {args.batch_id} is incomplete (status {report.status}): run the "
                  f"same `multicloud run` command to resume it")
        print(f"batch {args.batch_id}: {report.chunks} chunks, {report.replicas_ok}/"
              f"{report.replicas_checked} replicas ok")
        for p in report.problems:
            print(f"{p.problem}: chunk {p.chunk_id[:16]} on {p.node_id} {p.detail}".rstrip())
    return EXIT_OK if report.ok else EXIT_FAILED


async def cmd_batches(args: argparse.Namespace) -> int:
    """multicloud batches."""
    registry, orchestrator = await _open_catalogue(args)
    try:
        records = await asyncio.to_thread(orchestrator.storage_manager.manifest.batches)
    finally:
        await _close(registry, orchestrator)
    if args.json:
        print(json.dumps([{"batch_id": b.batch_id, "status": b.state, "source": b.source,
                           "created_at": b.created_at} for b in records], indent=2))
    else:
        for b in records:
            print(f"{display_path(b.batch_id)}\t{b.state}\t{display_path(b.source)}")
    return EXIT_OK


async def cmd_delete(args: argparse.Namespace) -> int:
    """multicloud delete BATCH: forget a batch here and on the nodes; gc frees its bytes."""
    registry, orchestrator = await _open_catalogue(args, args.batch_id, unreadable_ok=True)
    try:
        record, told = await orchestrator.delete_batch(args.batch_id)
    finally:
        await _close(registry, orchestrator)
    print(f"deleted batch {record.batch_id} ({record.status}, from {record.source}); "
          f"{told} node(s) told; run `multicloud gc` to free its bytes")
    return EXIT_OK


async def cmd_recover(args: argparse.Namespace) -> int:
    """multicloud recover: rebuild the local catalogue (manifest.db) from the nodes."""
    config, registry = await _open(args, read_only=True)
    orchestrator = PipelineOrchestrator(registry, config=config)
    try:
        report = await orchestrator.catalogue().recover()
    finally:
        await _close(registry, orchestrator)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"recovered {len(report.batches)} batch(es) from {report.nodes_answered} of "
              f"{report.nodes_asked} node(s) into {args.data_dir / MANIFEST_FILE}"
              + (f": {', '.join(report.batches)}" if report.batches else ""))
        for batch_id, why in sorted(report.failed.items()):
            print(f"could not recover {batch_id}: {why}", file=sys.stderr)
    return EXIT_FAILED if report.failed else EXIT_OK


async def cmd_repair(args: argparse.Namespace) -> int:
    """multicloud repair [BATCH | --all]."""
    if bool(args.batch_id) == bool(args.all):
        raise UsageError("name one batch to repair, or pass --all for every completed batch")
    registry, orchestrator = await _open_catalogue(args, args.batch_id)
    try:
        report = await orchestrator.repair(None if args.all else args.batch_id)
    finally:
        await _close(registry, orchestrator)
    _print_maintenance(args, report, "repair")
    return EXIT_FAILED if report.under_replicated else EXIT_OK


async def cmd_gc(args: argparse.Namespace) -> int:
    """multicloud gc [--dry-run]."""
    if args.grace < 0:
        raise UsageError(f"--grace must be 0 or more seconds (got {args.grace:g})")
    registry, orchestrator = await _open_catalogue(args)
    try:
        report = await orchestrator.collect_garbage(
            dry_run=args.dry_run, grace_s=args.grace,
            # Runs on other machines hold no lease here: in cluster mode the grace
            # period always applies.
            assume_live_run=bool(args.cluster))
    finally:
        await _close(registry, orchestrator)
    _print_maintenance(args, report, "gc")
    return EXIT_OK


def _print_maintenance(args: argparse.Namespace, report: MaintenanceReport, what: str) -> None:
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    if what == "gc":
        verb = "would free" if report.dry_run else "freed"
        print(f"gc {verb} {report.objects_freed} unreferenced object(s) and "
              f"{report.replicas_trimmed} replica(s) above the replication factor: "
              f"{format_bytes(report.bytes_freed)}")
        return
    print(f"repair: {report.chunks} chunks, {report.replicas_checked} replicas checked; "
          f"{report.missing} missing and {report.corrupt} corrupt dropped, "
          f"{report.replicas_created} replica(s) created; {report.under_replicated} chunk(s) "
          f"under-replicated, {report.lost} lost; {report.unavailable} on unreachable nodes")


async def cmd_simulate(args: argparse.Namespace) -> int:
    """multicloud simulate [--seeds N | --seed S]: exit 1 when an invariant failed."""
    # Each seed runs on an event loop of its own (virtual time): off this one. Ctrl-C
    # stops it after the seed under way, which tears down what that seed started.
    stop = threading.Event()
    try:
        ok = await asyncio.to_thread(run_simulate, args, print, stop.is_set)
    except asyncio.CancelledError:
        stop.set()
        raise
    return EXIT_OK if ok else EXIT_FAILED


async def cmd_cluster_up(args: argparse.Namespace) -> int:
    """multicloud cluster up."""
    from multicloud.cluster.launcher import cluster_up

    config = load_config(args.config_dir)
    console = Console(stderr=True)
    with console.status("starting the registry and nodes ..."):
        state = await cluster_up(args.data_dir, args.config_dir, config,
                                 registry_port=args.registry_port,
                                 node_base_port=args.node_base_port)
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        print(f"cluster up: registry {state['registry']}, {len(state['processes']) - 1} nodes "
              f"healthy; logs in {args.data_dir / 'run'}")
        print(f"use it with: multicloud run --cluster {state['registry']} --data-dir "
              f"{args.data_dir} --source DIR")
    return EXIT_OK


async def cmd_cluster_down(args: argparse.Namespace) -> int:
    """multicloud cluster down."""
    from multicloud.cluster.launcher import cluster_down

    stopped = await asyncio.to_thread(cluster_down, args.data_dir)
    print(f"stopped {len(stopped)} processes: {', '.join(stopped)}")
    return EXIT_OK


async def cmd_cluster_status(args: argparse.Namespace) -> int:
    """multicloud cluster status (embedded, --cluster URL, or what `cluster up` started)."""
    from multicloud.cluster.launcher import read_state

    state = read_state(args.data_dir)
    if not args.cluster and state is not None:
        args.cluster = state["registry"]
    _, registry = await _open(args)
    try:
        rows = await registry.report()
    finally:
        await registry.close()
    if state is not None and state.get("registry") == args.cluster:
        pids = {p["name"]: p["pid"] for p in state["processes"]}
        rows = [{**row, "pid": pids.get(row["id"])} for row in rows]
    if args.json:
        where = {"registry": args.cluster} if args.cluster else {"data_dir": str(args.data_dir)}
        print(json.dumps({**where, "nodes": rows}, indent=2))
        return EXIT_OK
    title = f"cluster at {args.cluster}" if args.cluster else f"embedded cluster at {args.data_dir}"
    Console().print(node_table(rows, title))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
