"""Run seeds, shrink failures, sum up: the simulator as a library call.

`run_seed` plays one seed in a fresh world on the virtual-time loop and says whether
every invariant held. `shrink` takes a failing seed and drops steps one at a time while
the same invariant still fails, so what is printed is a short reproduction:
`multicloud simulate --seed S --steps i,j,k` replays it exactly. `simulate` runs many
seeds and returns a `Summary` (seeds per second, the fault mix, how many batches
committed, resumed, repaired).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multicloud.core import clock
from multicloud.sim.invariants import InvariantViolated
from multicloud.sim.loop import run_tagged, run_virtual
from multicloud.sim.mutations import mutated
from multicloud.sim.scenario import Scenario, scenario
from multicloud.sim.soak import ProcessWorld, soak_scenario
from multicloud.sim.world import World

__all__ = ["SeedResult", "Summary", "run_seed", "shrink", "simulate"]

DEFAULT_OPS = 12
_EPOCH = 1_800_000_000.0  # the simulated wall clock's start (2027-01-15)


@dataclass
class SeedResult:
    """How one seed went."""

    seed: int
    scenario: Scenario
    history: list[str]
    counts: dict[str, int]
    seconds: float
    violation: InvariantViolated | None = None
    step: int | None = None  # the step index after which the violation showed (None: end)
    root: Path | None = None  # where it ran (removed afterwards)

    @property
    def ok(self) -> bool:
        """Whether every invariant held."""
        return self.violation is None

    @property
    def digest(self) -> str:
        """SHA-256 of the history: two runs of a seed must give the same."""
        return hashlib.sha256("\n".join(self.history).encode()).hexdigest()

    def reproduction(self) -> str:
        """The command that replays this run."""
        steps = ("" if self.scenario.kept is None
                 else f" --steps {','.join(map(str, self.scenario.kept)) or 'none'}")
        return f"multicloud simulate --seed {self.seed}{steps}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "seed": self.seed, "ok": self.ok, "seconds": round(self.seconds, 3),
            "shape": self.scenario.shape.describe(), "digest": self.digest,
            "counts": dict(sorted(self.counts.items())),
            "violation": None if self.violation is None else str(self.violation),
            "invariant": None if self.violation is None else self.violation.number,
            "step": self.step,
            "steps": [{"index": i, **s.to_dict()} for i, s in self.scenario.active],
            "reproduction": self.reproduction(),
            "history": self.history,
        }


@dataclass
class Summary:
    """Many seeds, summed up."""

    seeds: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[SeedResult] = field(default_factory=list)
    shrunk: list[SeedResult] = field(default_factory=list)

    @property
    def seeds_per_second(self) -> float:
        """Seeds run per wall-clock second."""
        return self.seeds / self.seconds if self.seconds else 0.0

    def add(self, result: SeedResult) -> None:
        """Count one seed's faults and outcomes in."""
        self.seeds += 1
        self._count(result.counts)
        if not result.ok:
            self.failures.append(result)

    def merge(self, other: Summary) -> None:
        """Count another summary's seeds in (its time added to this one's)."""
        self.seeds += other.seeds
        self.seconds += other.seconds
        self._count(other.counts)
        self.failures += other.failures

    def _count(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"seeds": self.seeds, "failed": len(self.failures),
                "seconds": round(self.seconds, 2),
                "seeds_per_second": round(self.seeds_per_second, 2),
                "counts": dict(sorted(self.counts.items())),
                "failures": [f.to_dict() for f in self.failures],
                "shrunk": [s.to_dict() for s in self.shrunk]}


def run_seed(seed: int | Scenario, ops: int = DEFAULT_OPS, *, mutation: str = "",
             workdir: Path | None = None, soak: bool = False) -> SeedResult:
    """Play one seed (or an exact scenario, e.g. a shrunk one) and check every invariant;
    with soak, against node processes in real time (see multicloud.sim.soak)."""
    if isinstance(seed, Scenario):
        plan = seed
    else:
        plan = soak_scenario(seed, ops) if soak else scenario(seed, ops)
    started = time.perf_counter()
    violation: InvariantViolated | None = None
    step: int | None = None
    with _workdir(plan.seed, workdir, "soak" if soak else "seed") as root:
        weakened = 1 if mutation == "quorum-1" else None
        world = (ProcessWorld(plan, root, quorum_override=weakened) if soak
                 else World(plan, root, quorum_override=weakened))
        try:
            with _quiet(), mutated(mutation):
                if soak:
                    run_tagged(world.play())
                else:
                    with clock.virtual_wall(_EPOCH):
                        run_virtual(world.play())
        except InvariantViolated as exc:
            violation, step = exc, world.step_index
    return SeedResult(plan.seed, plan, world.history, world.counts,
                      time.perf_counter() - started, violation, step, root)


def shrink(failed: SeedResult, *, mutation: str = "", soak: bool = False,
           on_try: Callable[[SeedResult], None] | None = None) -> SeedResult:
    """The smallest scenario found that still breaks the same invariant: drop whole steps
    one at a time (later ones first), keeping each drop that still fails, until no single
    drop does. Whole steps only, so `--seed S --steps i,j` replays the result exactly."""
    assert failed.violation is not None
    number = failed.violation.number
    best = failed

    def attempt(plan: Scenario) -> bool:
        nonlocal best
        result = run_seed(plan, mutation=mutation, soak=soak)
        if on_try is not None:
            on_try(result)
        if result.violation is not None and result.violation.number == number:
            best = result
            return True
        return False

    kept = [i for i, _ in best.scenario.active]
    if best.step is not None and best.step >= 0:
        kept = [i for i in kept if i <= best.step]  # what came after it cannot matter
        attempt(best.scenario.only(tuple(kept)))
    progress = True
    while progress:
        progress = False
        for index in list(reversed(kept)):
            trial = [i for i in kept if i != index]
            if attempt(best.scenario.only(tuple(trial))):
                kept = trial
                progress = True
    return best


def simulate(seeds: Iterable[int], ops: int = DEFAULT_OPS, *, mutation: str = "",
             stop_on_failure: bool = False, shrink_failures: bool = True, soak: bool = False,
             on_result: Callable[[SeedResult], None] | None = None,
             stopped: Callable[[], bool] = lambda: False) -> Summary:
    """Run every seed; failures are shrunk (the first few) and kept in the summary.
    stopped() is asked between seeds (Ctrl-C): the summary then covers the seeds run."""
    summary = Summary()
    started = time.perf_counter()
    for seed in seeds:
        if stopped():
            break
        result = run_seed(seed, ops, mutation=mutation, soak=soak)
        summary.add(result)
        if on_result is not None:
            on_result(result)
        if not result.ok:
            if shrink_failures and len(summary.shrunk) < 3:
                summary.shrunk.append(shrink(result, mutation=mutation, soak=soak))
            if stop_on_failure:
                break
    summary.seconds = time.perf_counter() - started
    return summary


@contextmanager
def _workdir(seed: int, base: Path | None, kind: str) -> Iterator[Path]:
    """The seed's own directory, the same path on every run (paths end up in manifests,
    so a different one would change chunk ids of the catalogue), on tmpfs when there is
    one; removed afterwards. A second process playing the same seed at once gets a
    directory of its own, and with it a history that may differ."""
    shm = Path("/dev/shm")
    scratch = base or (shm if shm.is_dir() else Path(tempfile.gettempdir()))
    parent = scratch / "multicloud-sim"
    parent.mkdir(parents=True, exist_ok=True)
    with (parent / f"{kind}-{seed}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            root, held = parent / f"{kind}-{seed}", True
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
        except BlockingIOError:
            root, held = Path(tempfile.mkdtemp(prefix=f"{kind}-{seed}-", dir=parent)), False
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
            if held:  # only its holder may remove the lock file
                Path(lock.name).unlink(missing_ok=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """The product logs every injected failure; a simulation expects them, and keeps
    them from the application's handlers (only its own traceback watch sees errors)."""
    logger = logging.getLogger("multicloud")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
