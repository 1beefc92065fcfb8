"""Thousands of seeded fault schedules against the embedded cluster, on every CI run.

`make test` plays 1,000 seeds: a fixed list (0-699) and a rotating slice of 300 derived
from the commit, so every commit adds seeds no earlier one played. A failure names the
seed, the invariant and a shrunk reproduction (`multicloud simulate --seed S --steps ...`).
The regression seeds are the ones that found bugs; the broken-build tests show the
simulator catches a weakened quorum and a disabled repair.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from sim_support import SUMMARY

from multicloud.sim.runner import SeedResult, run_seed, shrink, simulate
from multicloud.sim.scenario import Scenario, scenario

ROOT = Path(__file__).resolve().parents[2]
FIXED_SEEDS = 700
ROTATING_SEEDS = 300
BLOCK = 100


def _explain(result: SeedResult) -> str:
    shrunk = shrink(result)
    steps = "\n".join(f"  step {i}: {s.describe()}" for i, s in shrunk.scenario.active)
    return (f"seed {result.seed}: {result.violation} (step {result.step})\n"
            f"shrunk: {shrunk.violation}\nreplay: {shrunk.reproduction()}\n{steps}\n"
            + "\n".join(shrunk.history))


def _play(seeds: range) -> None:
    summary = simulate(seeds, shrink_failures=False)
    SUMMARY.merge(summary)
    if summary.failures:
        pytest.fail(_explain(summary.failures[0]), pytrace=False)


def rotating_start() -> int:
    """Where this commit's slice starts: from MULTICLOUD_SIM_SLICE, else the commit id."""
    override = os.environ.get("MULTICLOUD_SIM_SLICE")
    if override:
        return int(override)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "no-git"
    return 10_000 + zlib.crc32(head.encode()) % 10_000_000


@pytest.mark.parametrize("first", range(0, FIXED_SEEDS, BLOCK))
def test_fixed_seeds_hold_every_invariant(first: int) -> None:
    _play(range(first, first + BLOCK))


@pytest.mark.parametrize("block", range(ROTATING_SEEDS // BLOCK))
def test_this_commits_slice_of_seeds_holds_every_invariant(block: int) -> None:
    start = rotating_start() + block * BLOCK
    _play(range(start, start + BLOCK))


# Every bug the simulator found, kept as the scenario that found it (frozen as JSON, so
# it replays exactly however the generator changes later). Each failed before its fix.
REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.json"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression_scenario(path: Path) -> None:
    data = json.loads(path.read_text())
    result = run_seed(Scenario.from_dict(data["scenario"]))
    assert result.ok, f"{data['bug']} ({data['found_as']})\n{_explain(result)}"


def test_regressions_are_kept() -> None:
    assert len(REGRESSIONS) >= 10


def test_the_same_seed_gives_the_same_history_byte_for_byte() -> None:
    first, second = run_seed(7), run_seed(7)
    assert first.history == second.history
    assert first.counts == second.counts
    assert len(first.history) > 10


def test_another_process_with_another_hash_seed_replays_the_same_history() -> None:
    here = run_seed(11)
    out = subprocess.run(
        [sys.executable, "-m", "multicloud.ui.cli", "simulate", "--seed", "11", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    there = json.loads(out.stdout)
    assert there["history"] == here.history
    assert there["digest"] == here.digest


def test_a_scenario_is_a_pure_function_of_its_seed() -> None:
    assert scenario(5) == scenario(5)
    assert scenario(5) != scenario(6)
    shape = scenario(5).shape
    assert 2 <= len(shape.clouds) <= 4
    assert 3 <= len(shape.node_ids) <= 12
    assert 2 <= shape.replication_factor <= 4
    assert shape.replication_factor // 2 + 1 <= shape.write_quorum <= shape.replication_factor


def test_the_workloads_exercise_every_fault_and_outcome() -> None:
    summary = simulate(range(60), shrink_failures=False)
    assert not summary.failures
    for what in ("crash", "restart", "partition", "heal", "slow", "corrupt", "lose",
                 "crash_during_write", "disk_full", "lose_manifest", "committed", "resumed",
                 "killed", "interrupted", "together", "repairs", "gcs", "restores",
                 "verifies", "deletes"):
        assert summary.counts.get(what, 0) > 0, what


@pytest.mark.parametrize("mutation", ["quorum-1", "no-repair"])
def test_a_deliberately_broken_build_is_caught_and_shrunk(mutation: str) -> None:
    summary = simulate(range(1000), mutation=mutation, stop_on_failure=True)
    assert summary.failures, f"{mutation}: 1,000 seeds found nothing"
    failed, shrunk = summary.failures[0], summary.shrunk[0]
    expected = {"quorum-1": {2}, "no-repair": {3, 4}}[mutation]
    assert shrunk.violation is not None
    assert shrunk.violation.number in expected
    assert len(shrunk.scenario.active) < len(failed.scenario.active)
    # The printed reproduction replays it.
    replay = run_seed(scenario(failed.seed).only(shrunk.scenario.kept or ()),
                      mutation=mutation)
    assert replay.violation is not None
    assert str(replay.violation) == str(shrunk.violation)
    assert replay.history == shrunk.history

