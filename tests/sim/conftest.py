"""Report how many seeds the suite played, how fast, and the fault mix they exercised."""

from __future__ import annotations

import pytest
from sim_support import SUMMARY

from multicloud.ui.simulate import summary_lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY.seeds:
        terminalreporter.section("fault simulation")
        for line in summary_lines(SUMMARY):
            terminalreporter.write_line(line)
