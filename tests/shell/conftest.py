"""Prints the torture tests' tally at the end of the session."""

from __future__ import annotations

import pytest

from .harness import TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY:
        terminalreporter.write_line(
            "shell torture: {scenarios} scenarios, {interruptions} interruptions injected,"
            " {lost} with lost connections, {hangs} hangs".format(
                **{k: TALLY[k] for k in ("scenarios", "interruptions", "lost", "hangs")}
            )
        )
