"""The control-plane benchmark runs, on tiny sizes, and reports every figure.

Only that the figures are there and make sense: how fast they are is the benchmark's to
say (`make bench-control`), not a test's on a shared machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "control_plane_bench.py"
RUN_KEYS = ("per_s", "first_10pct_per_s", "last_10pct_per_s", "last_over_first",
            "first_10pct_cpu_per_s", "last_10pct_cpu_per_s", "last_over_first_cpu")


def positive(value: Any) -> bool:
    """A finite number above zero."""
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--nodes", "16", "--chunks", "400",
         "--run-chunks", "40", "--memory-chunks", "40", "--heartbeat-rounds", "2",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["nodes"] == 16
    assert r["clouds"] == {"aws": 4, "gcp": 4, "azure": 4, "oci": 4}
    assert (r["chunks"], r["run_chunks"]) == (400, 40)

    placement = r["placement"]
    assert placement["items"] == 400
    assert placement["prefix_items"] == 40
    assert placement["short_of_min_clouds"] == 0
    for key in (*RUN_KEYS, "decision_us", "prefix_seconds", "whole_over_prefix",
                "prefix_cpu_seconds", "whole_over_prefix_cpu",
                "busiest_node_over_cloud_mean"):
        assert positive(placement[key]), key
    assert len(placement["tenths_per_s"]) == 10
    assert set(placement["cloud_share"]) == {"aws", "gcp", "azure", "oci"}
    assert math.isclose(sum(placement["cloud_share"].values()), 1.0)

    for name, chunks in (("manifest_run", 40), ("manifest_big", 400), ("manifest_warm", 40)):
        run = r[name]
        assert run["items"] == chunks
        for key in (*RUN_KEYS, "on_disk_bytes_per_chunk"):
            assert positive(run[key]), (name, key)
        assert len(run["tenths_cpu_per_s"]) == 10
        if sys.platform == "linux":  # bytes written come from /proc/self/io
            assert positive(run["last_10pct_bytes_written_per_item"]), name
    assert positive(r["manifest_big_over_run"])
    assert positive(r["manifest_big_over_run_cpu"])

    memory = r["memory"]
    assert memory["chunks"] == 40
    # What the commit path keeps per chunk is storage's to decide: a number, of any sign.
    assert math.isfinite(memory["heap_bytes_per_chunk"])
    assert memory["top_sites"]
    assert positive(r["peak_rss_bytes"])

    registry = r["registry"]
    assert registry["nodes"] == 16
    assert registry["heartbeats"]["items"] == 32
    assert registry["http_heartbeats"] == 16
    for value in (registry["joins"]["first_half_per_s"], registry["joins"]["second_half_per_s"],
                  registry["heartbeats"]["per_s"], registry["http_heartbeats_per_s"],
                  registry["sweep_ms"], registry["views_ms"], registry["poll_apply_ms"]):
        assert positive(value)

    table = done.stdout[done.stdout.index("# Control plane at scale"):]
    for row in ("placement (RF 3), 400 chunk ids", "manifest, batch of 40: commits/s",
                "manifest, batch of 400: first / last 10%, CPU",
                "manifest, batch of 40 into that manifest: commits/s",
                "manifest: 40 vs 400 chunks, fresh manifests",
                "Python heap kept per chunk", "peak RSS", "registry: joins/s",
                "heartbeats/s over HTTP", "failure-detector sweep"):
        assert row in table, row
