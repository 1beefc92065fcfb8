"""What the simulator tests share: the totals the terminal summary reports."""

from __future__ import annotations

from multicloud.sim.runner import Summary


class _Totals:
    """Every seed the suite played, summed (seeds per second, the fault mix)."""

    def __init__(self) -> None:
        self.total = Summary()

    def add(self, summary: Summary) -> None:
        self.total.seeds += summary.seeds
        self.total.seconds += summary.seconds
        for key, value in summary.counts.items():
            self.total.counts[key] = self.total.counts.get(key, 0) + value
        self.total.failures += summary.failures


SUMMARY = _Totals()
