"""Profile the pipeline (the user's script): run it N times, print the bottleneck report.

    python scripts/profile_pipeline.py                           # 5 runs on generated data
    python scripts/profile_pipeline.py --source DIR --runs 3
    python scripts/profile_pipeline.py --source DIR --apply tuned --compare

Writes report.md and PNG charts into --out (default profile-out). With --apply DIR the
recommended config is written to DIR; --compare then runs both configs and prints the
measured difference. Each run gets a fresh embedded cluster, removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from multicloud.core.config import load_config
from multicloud.core.errors import MulticloudError
from multicloud.core.types import PipelineResult
from multicloud.core.units import parse_size
from multicloud.datagen import generate_dataset
from multicloud.ui.profile_rules import RunCallback
from multicloud.ui.profile_runs import compare_configs, run_profile


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path,
                        help="directory or file to run on (default: generate --size of data)")
    parser.add_argument("--size", default="128MiB", help="generated data size, without --source")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config-dir", type=Path, default=Path("config"),
                        help="YAML config dir (missing files mean defaults)")
    parser.add_argument("--out", type=Path, default=Path("profile-out"),
                        help="where report.md and the charts go")
    parser.add_argument("--apply", type=Path, metavar="DIR",
                        help="write the recommended config to this new dir")
    parser.add_argument("--compare", action="store_true",
                        help="with --apply: run both configs and print the difference")
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    return parser.parse_args(argv)


def progress(label: str) -> RunCallback:
    def show(i: int, runs: int, result: PipelineResult) -> None:
        print(f"{label} run {i}/{runs}: {result.duration_seconds:.2f}s, "
              f"{result.metrics.get('throughput_mb_s', 0):.1f} MB/s", flush=True)
    return show


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.compare and args.apply is None:
        print("error: --compare needs --apply DIR (the config to compare against)",
              file=sys.stderr)
        return 2
    source = args.source
    if source is None:
        source = args.out / "test_data" / "aws_s3_simulation"
        if not source.exists():
            chunk = load_config(args.config_dir).ingestion.chunk_size_bytes
            print(f"generating {args.size} of test data in {source} ...", flush=True)
            await asyncio.to_thread(generate_dataset, source, parse_size(args.size),
                                    chunk_hint_bytes=chunk)
    outcome = await run_profile(source, runs=args.runs, config_dir=args.config_dir,
                                out_dir=args.out, apply_dir=args.apply,
                                on_run=progress("Profiling"), charts=not args.no_charts)
    print()
    print(outcome.report_path.read_text())
    print(f"report: {outcome.report_path}")
    for chart in outcome.charts:
        print(f"chart:  {chart}")
    if outcome.applied_dir is not None:
        print(f"recommended config written to {outcome.applied_dir}")
    if args.compare and outcome.applied_dir is not None:
        comparison = await compare_configs(source, args.config_dir, outcome.applied_dir,
                                           runs=max(1, min(args.runs, 3)), out_dir=args.out,
                                           on_run=progress("Comparing"))
        print()
        print(comparison.to_markdown())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(sys.argv[1:])))
    except MulticloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
