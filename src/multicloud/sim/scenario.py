"""What one seed means: a cluster's shape, a workload and the faults interleaved with it.

`scenario(seed, ops)` is a pure function: the same seed always gives the same cluster
(2-4 clouds, 3-12 nodes, replication factor 2-4, a quorum, min_clouds), the same batches
of small generated files, and the same list of steps. A step is a command (run, restore,
verify, repair, gc, delete, two commands at once) or a fault between commands (a node
crashed, restarted with or without its disk, a partition, a slow link, bit rot, a lost
replica, a crash in the middle of a write, a full disk, the local manifest lost). A run
may carry faults of its own, struck at a point of its progress, and may be killed there
(`kill`: the process dies) or interrupted (`interrupt`: Ctrl-C).

Steps name what they act on by index where the target only exists at run time (the k-th
crashed node, the k-th replica on a node), so a step still means something when the
shrinker has dropped the steps before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["CLOUDS", "FAULTS", "SOAK_FAULTS", "BatchSpec", "Scenario", "Shape", "Step",
           "scenario"]

CLOUDS = ("aws", "gcp", "azure", "oci")

# Faults between commands, and the ones a run can suffer while it works.
FAULTS = ("crash", "restart", "partition", "heal", "slow", "corrupt", "lose",
          "crash_during_write", "disk_full", "disk_freed", "lose_manifest")
# Faults only the soak strikes: real processes can hang (SIGSTOP) and lose the registry.
SOAK_FAULTS = ("hang", "registry_restart")
RUN_FAULTS = ("crash", "partition", "slow", "crash_during_write", "disk_full", "corrupt")
COMMANDS = ("run", "restore", "verify", "repair", "gc", "delete", "together")


@dataclass(frozen=True)
class Shape:
    """The simulated cluster: nodes per cloud and the replication policy."""

    nodes_per_cloud: tuple[tuple[str, int], ...]
    replication_factor: int
    write_quorum: int
    min_clouds: int

    @property
    def clouds(self) -> list[str]:
        """The clouds that have nodes."""
        return [cloud for cloud, _ in self.nodes_per_cloud]

    @property
    def node_ids(self) -> list[str]:
        """Every node's id, as the embedded cluster names them."""
        return [f"{cloud}-node-{i + 1}" for cloud, count in self.nodes_per_cloud
                for i in range(count)]

    def describe(self) -> str:
        """'aws:3 gcp:2, rf 3, quorum 2, min_clouds 2'."""
        nodes = " ".join(f"{cloud}:{count}" for cloud, count in self.nodes_per_cloud)
        return (f"{nodes}, rf {self.replication_factor}, quorum {self.write_quorum}, "
                f"min_clouds {self.min_clouds}")


@dataclass(frozen=True)
class BatchSpec:
    """A batch's files: how many, how big, and the seed of their bytes."""

    batch_id: str
    files: int
    max_bytes: int
    seed: int


@dataclass(frozen=True)
class Step:
    """One command or fault; `at` (0-100) places a run's own faults in its progress."""

    kind: str
    node: str = ""
    batch: str = ""
    clouds: tuple[str, ...] = ()
    pick: int = 0
    factor: float = 1.0
    wipe: bool = False
    at: float = 0.0
    faults: tuple[Step, ...] = ()
    kill: str = ""  # "", "kill" or "interrupt"
    together: tuple[Step, ...] = ()

    def describe(self) -> str:
        """A short line for the history: 'crash aws-node-2', 'run b1 (kill at 40%)'."""
        text = self.kind.replace("_", " ")
        if self.kind == "together":
            return "together(" + " | ".join(s.describe() for s in self.together) + ")"
        if self.node:
            text += f" {self.node}"
        if self.batch:
            text += f" {self.batch}"
        if self.clouds:
            text += " " + "<->".join(self.clouds)
        if self.kind == "slow":
            text += f" x{self.factor:g}"
        if self.kind in ("corrupt", "lose", "restart"):
            text += f" #{self.pick}"
        if self.kind == "crash_during_write":
            text += f" write {self.pick}"
        if self.wipe:
            text += " (new disk)"
        extras = [f"{f.describe()} at {f.at:g}%" for f in self.faults]
        if self.kill:
            extras.append(f"{self.kill} at {self.at:g}%")
        return text + (f" [{', '.join(extras)}]" if extras else "")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        """The step to_dict described."""
        return cls(str(data["kind"]), node=str(data.get("node", "")),
                   batch=str(data.get("batch", "")), clouds=tuple(data.get("clouds", ())),
                   pick=int(data.get("pick", 0)), factor=float(data.get("factor", 1.0)),
                   wipe=bool(data.get("wipe", False)), at=float(data.get("at", 0.0)),
                   faults=tuple(cls.from_dict(f) for f in data.get("faults", ())),
                   kill=str(data.get("kill", "")),
                   together=tuple(cls.from_dict(t) for t in data.get("together", ())))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, without the fields left at their defaults."""
        out: dict[str, Any] = {"kind": self.kind}
        for name in ("node", "batch", "pick", "wipe", "at", "kill"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.clouds:
            out["clouds"] = list(self.clouds)
        if self.kind == "slow":
            out["factor"] = self.factor
        if self.faults:
            out["faults"] = [f.to_dict() for f in self.faults]
        if self.together:
            out["together"] = [s.to_dict() for s in self.together]
        return out


@dataclass(frozen=True)
class Scenario:
    """Everything one seed fixes."""

    seed: int
    shape: Shape
    batches: tuple[BatchSpec, ...]
    steps: tuple[Step, ...]
    kept: tuple[int, ...] | None = field(default=None)  # step indices a shrink kept

    def only(self, kept: tuple[int, ...]) -> Scenario:
        """The same scenario with just the steps at these indices (a shrunk one)."""
        return replace(self, kept=tuple(sorted(kept)))

    def to_dict(self) -> dict[str, Any]:
        """Everything the seed fixed, as JSON: a scenario kept this way replays even after
        the generator changes (how regression scenarios are kept)."""
        return {"seed": self.seed,
                "shape": {"nodes_per_cloud": [list(p) for p in self.shape.nodes_per_cloud],
                          "replication_factor": self.shape.replication_factor,
                          "write_quorum": self.shape.write_quorum,
                          "min_clouds": self.shape.min_clouds},
                "batches": [[b.batch_id, b.files, b.max_bytes, b.seed] for b in self.batches],
                "steps": [s.to_dict() for s in self.steps],
                "kept": None if self.kept is None else list(self.kept)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """The scenario to_dict described."""
        shape = data["shape"]
        return cls(int(data["seed"]),
                   Shape(tuple((str(c), int(n)) for c, n in shape["nodes_per_cloud"]),
                         int(shape["replication_factor"]), int(shape["write_quorum"]),
                         int(shape["min_clouds"])),
                   tuple(BatchSpec(str(b), int(f), int(m), int(sd))
                         for b, f, m, sd in data["batches"]),
                   tuple(Step.from_dict(s) for s in data["steps"]),
                   None if data.get("kept") is None else tuple(data["kept"]))

    @property
    def active(self) -> list[tuple[int, Step]]:
        """(index, step) of the steps this scenario runs."""
        if self.kept is None:
            return list(enumerate(self.steps))
        return [(i, self.steps[i]) for i in self.kept if i < len(self.steps)]


def scenario(seed: int, ops: int = 12) -> Scenario:
    """The scenario of a seed: shape, batches and about `ops` steps."""
    rng = random.Random(f"multicloud-sim/{seed}")
    shape = _shape(rng)
    batches = tuple(BatchSpec(f"b{i + 1}", rng.randint(1, 5),
                              rng.choice((4_096, 70_000, 200_000)), rng.randrange(2**31))
                    for i in range(rng.randint(2, 4)))
    steps = [_command(rng, shape, batches, "run", batches[0])]
    down = 0  # nodes crashed so far and not yet brought back by a restart step
    while len(steps) < max(ops, 1):
        if down and rng.random() < 0.35:
            # Most crashed nodes come back before the end, some of them on a new disk.
            steps.append(Step("restart", pick=rng.randrange(12), wipe=rng.random() < 0.3))
            down -= 1
            continue
        if rng.random() < 0.45:
            step = _fault(rng, shape, rng.choice(FAULTS))
        else:
            step = _command(rng, shape, batches, _pick_command(rng), None)
        steps.append(step)
        down += sum(s.kind in ("crash", "crash_during_write")
                    for s in (step, *step.faults, *step.together))
    return Scenario(seed, shape, batches, tuple(steps))


def _shape(rng: random.Random) -> Shape:
    clouds = CLOUDS[:rng.randint(2, 4)]
    counts = dict.fromkeys(clouds, 1)
    for _ in range(rng.randint(max(3, len(clouds)), 12) - len(clouds)):
        counts[rng.choice(clouds)] += 1
    nodes = sum(counts.values())
    rf = rng.randint(2, min(4, nodes))
    quorum = rng.randint(rf // 2 + 1, rf)
    min_clouds = rng.randint(1, min(len(clouds), rf))
    return Shape(tuple(counts.items()), rf, quorum, min_clouds)


def _pick_command(rng: random.Random) -> str:
    return rng.choices(COMMANDS, weights=(5, 1.5, 1.5, 1, 1, 0.6, 1.2))[0]


def _command(rng: random.Random, shape: Shape, batches: tuple[BatchSpec, ...], kind: str,
             batch: BatchSpec | None) -> Step:
    batch_id = (batch or rng.choice(batches)).batch_id
    if kind == "together":
        first = _command(rng, shape, batches, "run", None)
        second = _command(rng, shape, batches,
                          rng.choice(("run", "restore", "verify", "repair", "gc", "delete")),
                          None)
        return Step("together", together=(first, second))
    if kind in ("repair", "gc"):
        return Step(kind)
    if kind != "run":
        return Step(kind, batch=batch_id)
    faults = tuple(replace(_fault(rng, shape, rng.choice(RUN_FAULTS)),
                           at=float(rng.randrange(0, 95, 5)))
                   for _ in range(rng.choices((0, 1, 2), weights=(5, 3, 1))[0]))
    kill = rng.choices(("", "kill", "interrupt"), weights=(6, 2, 1))[0]
    return Step("run", batch=batch_id, faults=faults, kill=kill,
                at=float(rng.randrange(5, 95, 5)) if kill else 0.0)


def _fault(rng: random.Random, shape: Shape, kind: str) -> Step:
    nodes = shape.node_ids
    if kind in ("crash", "disk_full", "disk_freed"):
        return Step(kind, node=rng.choice(nodes))
    if kind == "restart":
        return Step(kind, pick=rng.randrange(12), wipe=rng.random() < 0.3)
    if kind in ("partition", "slow"):
        pair = tuple(rng.sample(shape.clouds, 2))
        factor = float(rng.choice((5, 20, 100)))
        return Step(kind, clouds=pair, factor=factor if kind == "slow" else 1.0)
    if kind in ("corrupt", "lose"):
        return Step(kind, node=rng.choice(nodes), pick=rng.randrange(1000))
    if kind == "crash_during_write":
        return Step(kind, node=rng.choice(nodes), pick=rng.randint(1, 3))
    return Step(kind)
