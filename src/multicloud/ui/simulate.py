"""`multicloud simulate`: seeded fault schedules against the embedded cluster, as text.

The simulator itself is `multicloud.sim`; this module turns its results into what a
person reads: one line per failing seed as it is found, a summary with seeds per second
and the fault mix, and for a failure the shrunk reproduction and its history.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from multicloud.core.errors import UsageError
from multicloud.sim.mutations import MUTATIONS
from multicloud.sim.runner import DEFAULT_OPS, SeedResult, Summary, run_seed, shrink, simulate
from multicloud.sim.scenario import FAULTS, SOAK_FAULTS, Scenario, scenario
from multicloud.sim.soak import soak_scenario

__all__ = ["add_simulate_parser", "run_simulate"]

# The outcomes a summary lists after the faults, in this order.
_OUTCOMES = ("committed", "resumed", "killed", "interrupted", "failed runs", "together",
             "repairs", "replicas repaired", "gcs", "restores", "verifies", "deletes",
             "errors", "new disks", "manifests published again", "batches lost to faults")


def add_simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        handler: Callable[..., object]) -> None:
    """Register `simulate` with the CLI's subparsers."""
    sim = sub.add_parser(
        "simulate", help="play seeded fault schedules against the embedded cluster",
        description="Each seed fixes a cluster (2-4 clouds, 3-12 nodes, RF, quorum), a "
                    "workload and the faults interleaved with it, on virtual time; every "
                    "invariant is checked after each step and at the end.")
    which = sim.add_mutually_exclusive_group()
    which.add_argument("--seeds", type=int, default=100, metavar="N",
                       help="play N seeds, from --first on (default 100)")
    which.add_argument("--seed", type=int, metavar="S", help="play one seed and show it")
    sim.add_argument("--first", type=int, default=0, metavar="K", help="first of --seeds")
    sim.add_argument("--ops", type=int, default=DEFAULT_OPS, metavar="K",
                     help=f"steps per seed (default {DEFAULT_OPS})")
    sim.add_argument("--steps", metavar="I,J,...",
                     help="with --seed: play only these steps (a shrunk reproduction)")
    sim.add_argument("--mutation", choices=MUTATIONS,
                     help="break the build on purpose, to see the simulator catch it")
    sim.add_argument("--no-shrink", action="store_true", help="report failures unshrunk")
    sim.add_argument("--soak", action="store_true",
                     help="against a registry and node processes, with real SIGKILL, SIGSTOP "
                          "and registry restarts (slow: tens of seconds a seed)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(handler=handler)


def run_simulate(args: argparse.Namespace, out: Callable[[str], None],
                 stopped: Callable[[], bool] = lambda: False) -> bool:
    """Do what the arguments say, writing lines with out; whether every seed passed.
    stopped() is asked between seeds: a Ctrl-C ends the run after the seed under way."""
    mutation = args.mutation or ""
    if args.ops < 1:
        raise UsageError(f"--ops must be at least 1 (got {args.ops})")
    if args.seed is not None:
        return _one(args, mutation, out)
    if args.steps:
        raise UsageError("--steps replays part of one seed: give it with --seed S")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1 (got {args.seeds})")
    seeds = range(args.first, args.first + args.seeds)

    def progress(result: SeedResult) -> None:
        if not result.ok and not args.json:
            out(f"seed {result.seed}: {result.violation} (step {_step(result)})")

    summary = simulate(seeds, args.ops, mutation=mutation, on_result=progress,
                       shrink_failures=not args.no_shrink, soak=args.soak, stopped=stopped)
    if args.json:
        out(json.dumps(summary.to_dict(), indent=2))
    else:
        for line in summary_lines(summary):
            out(line)
    return not summary.failures


def summary_lines(summary: Summary) -> list[str]:
    """The text summary of many seeds: speed, verdict, fault mix, outcomes, repros."""
    counts = summary.counts
    verdict = ("every invariant held" if not summary.failures
               else f"{len(summary.failures)} failed")
    lines = [f"{summary.seeds} seeds in {summary.seconds:.1f} s "
             f"({summary.seeds_per_second:.1f} seeds/s): {verdict}",
             "faults: " + ", ".join(f"{k.replace('_', ' ')} {counts.get(k, 0)}"
                                    for k in (*FAULTS, *SOAK_FAULTS)
                                    if k in FAULTS or k in counts),
             "outcomes: " + ", ".join(f"{k} {counts[k]}" for k in _OUTCOMES if k in counts)]
    for result in summary.shrunk:
        lines += ["", f"seed {result.seed} shrunk to {len(result.scenario.active)} step(s): "
                      f"{result.violation}",
                  f"  replay: {result.reproduction()}"]
        lines += [f"  {line}" for line in result.history]
    return lines


def _one(args: argparse.Namespace, mutation: str, out: Callable[[str], None]) -> bool:
    plan = soak_scenario(args.seed, args.ops) if args.soak else scenario(args.seed, args.ops)
    if args.steps:
        plan = plan.only(_parse_steps(args.steps, plan))
    result = run_seed(plan, mutation=mutation, soak=args.soak)
    shrunk = (shrink(result, mutation=mutation, soak=args.soak)
              if not result.ok and not args.no_shrink else None)
    if args.json:
        data = result.to_dict()
        if shrunk is not None:
            data["shrunk"] = shrunk.to_dict()
        out(json.dumps(data, indent=2))
        return result.ok
    out(f"seed {result.seed}: {result.scenario.shape.describe()}, "
        f"{len(result.scenario.active)} step(s)")
    for line in result.history:
        out(f"  {line}")
    if result.ok:
        out(f"seed {result.seed}: every invariant held ({result.seconds:.2f} s, history "
            f"{result.digest[:16]})")
        return True
    out(f"seed {result.seed}: {result.violation} (step {_step(result)})")
    if shrunk is not None:
        out(f"shrunk to {len(shrunk.scenario.active)} step(s): {shrunk.violation}")
        out(f"  replay: {shrunk.reproduction()}")
        for index, step in shrunk.scenario.active:
            out(f"  step {index}: {step.describe()}")
    return False


def _step(result: SeedResult) -> str:
    return "the end checks" if result.step is None or result.step < 0 else str(result.step)


def _parse_steps(text: str, plan: Scenario) -> tuple[int, ...]:
    if text == "none":
        return ()
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--steps takes step numbers separated by commas, e.g. 2,5,9 "
                         f"(got {text!r})") from None
    bad = [i for i in steps if not 0 <= i < len(plan.steps)]
    if bad:
        raise UsageError(f"seed {plan.seed} has steps 0-{len(plan.steps) - 1}; there is no "
                         f"step {bad[0]}")
    return steps
