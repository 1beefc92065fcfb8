"""One short soak seed in every CI run: the same invariants against node processes, with
a real SIGKILL, a restart, a SIGSTOP and a registry restart. `make soak` runs more."""

from __future__ import annotations

import subprocess

from multicloud.sim.runner import run_seed
from multicloud.sim.soak import soak_scenario


def _processes(data_dir: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"--data-dir {data_dir}"],
                         capture_output=True, text=True, check=False).stdout
    return out.split()


def test_a_soak_seed_holds_every_invariant_and_leaves_no_process() -> None:
    plan = soak_scenario(3, 8)
    kinds = {s.kind for s in plan.steps} | {f.kind for s in plan.steps for f in s.faults}
    assert {"hang", "registry_restart", "crash", "restart"} <= kinds
    result = run_seed(plan, soak=True)
    assert result.ok, f"{result.violation}\n" + "\n".join(result.history)
    assert result.counts.get("registry_restart") == 1
    assert result.counts.get("hang") == 1
    assert result.counts.get("restart", 0) >= 1
    assert result.root is not None
    assert _processes(str(result.root / "data")) == []


def test_the_soak_scenario_is_the_seeds_with_process_faults_mixed_in() -> None:
    plan = soak_scenario(3, 8)
    assert plan == soak_scenario(3, 8)
    assert len(plan.steps) > 8  # the registry restarts come on top
