"""What the simulator tests share: the totals the terminal summary reports."""

from __future__ import annotations

from multicloud.sim.runner import Summary

SUMMARY = Summary()  # every seed the suite played, merged
