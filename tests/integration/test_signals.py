"""Real signals: a handler raising in the main thread while it borrows connections.

Runs `tools/signal_storm.py` (in a process of its own: the signal is SIGALRM, which
pytest-timeout uses here). A timer signal fires at a random moment of each of
thousands of checkouts and returns, with or without a query, and its handler raises,
as KeyboardInterrupt, Celery's soft time limit or gunicorn's worker timeout would.
No place of the pool may be lost.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "signal_storm.py"


@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="Python 3.10 runs signal handlers between almost any two instructions:"
    " not guarded against (docs/differences.md)",
)
@pytest.mark.parametrize("query", [False, True], ids=["no-query", "query"])
@pytest.mark.parametrize("api", ["connection", "getconn"])
def test_signal_storm_loses_nothing(dsn: str, api: str, query: bool) -> None:
    args = [sys.executable, str(TOOL), "--api", api, "--cycles", "5000"]
    if query:
        args.append("--query")
    env = {**os.environ, "SIGNAL_STORM_DSN": dsn}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    found = re.search(r"nothing lost in 5000 cycles \((\d+) interrupted\)", done.stdout)
    assert found, done.stdout
    assert int(found.group(1)) > 500, "the signals hardly ever landed"
