"""Per-file and per-batch costs: many small files, and the same data again as a new batch.

1. 10,000 files of 1 KiB: `multicloud run` (RF 3, 6 nodes, + sync) against three
   `rclone copy --checksum` (+ sync); the data directory's size and directory count.
2. 20,000 files of 1 KiB: run, then `verify` and `restore`, in milliseconds per file.
3. A second batch of the same dataset: its pipeline time over the first's, how many chunks
   it found stored already, and the egress it paid.

Each is a child process of the CLI, as a user runs it; figures are wall seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "multicloud.ui.cli"]


def small_files(root: Path, count: int, size: int = 1024, seed: int = 5) -> Path:
    """count files of size bytes in 100 folders: JSON lines, CSV, text and random bytes."""
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == f"{count}:{size}":
        return root / "files"
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "error", "info", "warn", "user", "order"]
    for i in range(count):
        folder = root / "files" / f"d{i % 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        if kind == 0:
            line = json.dumps({"id": i, "user": rng.choice(words), "v": rng.random()}) + "\n"
            data = (line * (size // len(line) + 1)).encode()[:size]
            data = data[:data.rfind(b"\n") + 1]
            name = f"f{i:05d}.jsonl"
        elif kind == 1:
            row = f"{i},{rng.choice(words)},{rng.random():.6f}\n"
            data = ("id,user,v\n" + row * (size // len(row))).encode()[:size]
            data = data[:data.rfind(b"\n") + 1]
            name = f"f{i:05d}.csv"
        elif kind == 2:
            data = " ".join(rng.choice(words) for _ in range(size // 4)).encode()[:size]
            name = f"f{i:05d}.txt"
        else:
            data = rng.randbytes(size)
            name = f"f{i:05d}.bin"
        (folder / name).write_bytes(data)
    marker.write_text(f"{count}:{size}")
    return root / "files"


def cli(*args: str) -> tuple[float, dict[str, Any]]:
    """Wall seconds of a CLI command with --json, and its JSON output (raises if it fails)."""
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"multicloud {args[0]} failed: {done.stdout[-500:]} "
                         f"{done.stderr[-1500:]}")
    return wall, json.loads(done.stdout or "{}")


def run(source: Path, data: Path, batch_id: str) -> tuple[float, dict[str, Any]]:
    """`multicloud run` plus sync (the durability the copies are held to)."""
    wall, result = cli("run", "--source", str(source), "--data-dir", str(data), "--batch-id",
                       batch_id, "--config-dir", "/nonexistent")
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return wall + time.perf_counter() - started, result


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes the files under path take on disk, directories under path)."""
    used = dirs = 0
    for root, folders, files in os.walk(path):
        dirs += len(folders)
        for name in files:
            try:
                used += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return used, dirs


def rclone_three(source: Path, out: Path) -> float | None:
    """Three `rclone copy --checksum` + sync, wall seconds (None without rclone)."""
    if shutil.which("rclone") is None:
        return None
    dests = [out / f"rclone-small-{i}" for i in range(3)]
    for dest in dests:
        shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    for dest in dests:
        subprocess.run(["rclone", "copy", "--checksum", "--config", "/dev/null", str(source),
                        str(dest)], check=True, capture_output=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - started
    for dest in dests:
        shutil.rmtree(dest, ignore_errors=True)
    return wall


def small_files_section(out: Path, count: int = 10_000, many: int = 20_000) -> dict[str, Any]:
    """Sections 1 and 2 of the module docstring."""
    source = small_files(out / f"small-{count}", count)
    logical = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    data = out / "small-run"
    shutil.rmtree(data, ignore_errors=True)
    wall, result = run(source, data, "small")
    used, dirs = disk_usage(data)
    rclone = rclone_three(source, out)
    shutil.rmtree(data, ignore_errors=True)
    print(f"  {count} files of 1 KiB: pipeline {wall:.2f}s, rclone x3 "
          f"{rclone if rclone is None else round(rclone, 2)}s, {used / 2**20:.1f} MiB on disk "
          f"for {logical / 2**20:.1f} MiB, {dirs} directories", flush=True)
    figures: dict[str, Any] = {
        "files": count, "logical_bytes": logical, "pipeline_s": wall, "rclone_s": rclone,
        "pipeline_over_rclone": wall / rclone if rclone else None,
        "chunks": result["chunks_processed"], "disk_bytes": used,
        "disk_over_logical": used / logical, "directories": dirs}

    many_source = small_files(out / f"small-{many}", many)
    data = out / "small-many"
    shutil.rmtree(data, ignore_errors=True)
    run_s, _ = run(many_source, data, "many")
    verify_s, _ = cli("verify", "many", "--data-dir", str(data), "--config-dir", "/nonexistent")
    back = out / "small-restored"
    shutil.rmtree(back, ignore_errors=True)
    restore_s, _ = cli("restore", "many", "--to", str(back), "--data-dir", str(data),
                       "--config-dir", "/nonexistent")
    shutil.rmtree(back, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    figures["many"] = {"files": many, "run_s": run_s, "verify_s": verify_s,
                       "restore_s": restore_s, "run_ms_per_file": run_s / many * 1000,
                       "verify_ms_per_file": verify_s / many * 1000,
                       "restore_ms_per_file": restore_s / many * 1000}
    print(f"  {many} files: run {run_s:.2f}s, verify {verify_s:.2f}s, restore "
          f"{restore_s:.2f}s", flush=True)
    return figures


def second_batch_section(source: Path, out: Path) -> dict[str, Any]:
    """Section 3 of the module docstring."""
    data = out / "second-batch"
    shutil.rmtree(data, ignore_errors=True)
    _, first = cli("run", "--source", str(source), "--data-dir", str(data), "--batch-id",
                   "first", "--config-dir", "/nonexistent")
    _, second = cli("run", "--source", str(source), "--data-dir", str(data), "--batch-id",
                    "second", "--config-dir", "/nonexistent")
    shutil.rmtree(data, ignore_errors=True)
    stored = second["metrics"]["already_stored"]
    figures = {
        "first_s": first["duration_seconds"], "second_s": second["duration_seconds"],
        "second_over_first": second["duration_seconds"] / first["duration_seconds"],
        "chunks": second["chunks_processed"], "already_stored_chunks": stored["chunks"],
        "first_egress_usd": first["metrics"]["distribution"]["egress_cost_usd"],
        "second_egress_usd": second["metrics"]["distribution"]["egress_cost_usd"]}
    print(f"  first {figures['first_s']:.2f}s, second {figures['second_s']:.2f}s "
          f"({figures['second_over_first']:.2f}); {stored['chunks']} of "
          f"{figures['chunks']} chunks stored already; egress "
          f"${figures['first_egress_usd']:.4f} then ${figures['second_egress_usd']:.6f}",
          flush=True)
    return figures


def render_lines(r: dict[str, Any]) -> list[str]:
    """Rows for the report's table."""
    lines = []
    if "small_files" in r:
        s = r["small_files"]
        rclone = "n/a" if s["rclone_s"] is None else f"{s['rclone_s']:.2f} s"
        ratio = "" if s["pipeline_over_rclone"] is None else \
            f" ({s['pipeline_over_rclone']:.2f} of rclone)"
        lines += [
            f"| {s['files']} files of 1 KiB: pipeline / rclone x 3 (+ sync) | "
            f"{s['pipeline_s']:.2f} s / {rclone}{ratio} |",
            f"| {s['files']} files of 1 KiB: on disk, all replicas and the manifest | "
            f"{s['disk_bytes'] / 2**20:.1f} MiB for {s['logical_bytes'] / 2**20:.1f} MiB "
            f"({s['disk_over_logical']:.2f}x), {s['directories']} directories, "
            f"{s['chunks']} chunks |",
            f"| {s['many']['files']} files of 1 KiB: run / verify / restore | "
            f"{s['many']['run_ms_per_file']:.2f} / {s['many']['verify_ms_per_file']:.3f} / "
            f"{s['many']['restore_ms_per_file']:.3f} ms per file |"]
    if "second_batch" in r:
        b = r["second_batch"]
        lines.append(
            f"| the same data again as a new batch | {b['second_s']:.2f} s after "
            f"{b['first_s']:.2f} s ({b['second_over_first']:.2f}); "
            f"{b['already_stored_chunks']} of {b['chunks']} chunks stored already; egress "
            f"${b['second_egress_usd']:.6f} after ${b['first_egress_usd']:.4f} |")
    return lines
