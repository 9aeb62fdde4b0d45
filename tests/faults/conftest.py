"""The fault-injection suite: every scenario records its figures; the table prints at the end."""

from __future__ import annotations

import pytest

from tests.faults.rig import RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.write_sep("=", "fault injection: what each scenario lost or duplicated")
        terminalreporter.write_line(RESULTS.table())
