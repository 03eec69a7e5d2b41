#!/usr/bin/env python3
"""Generate the sync pool modules from their async sources.

A line-based translation: each line of an async source goes through the
substitutions below, in order. It is deliberately dumb, so that the async source
stays the single place where the pool logic is written; anything that really
differs between threads and asyncio lives in `psycopg_pool/_acompat.py` under
twin names (`AsyncWaiter` / `Waiter`, ...).

    python tools/unasync.py           rewrite the generated files
    python tools/unasync.py --check   exit 1 if any generated file is stale
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "psycopg_pool"

# source -> generated
FILES = {
    "pool_async.py": "pool.py",
    "null_pool_async.py": "null_pool.py",
    "_connector_async.py": "_connector.py",
}

# Whole words, applied in this order.
WORDS = {
    "AsyncNullConnectionPool": "NullConnectionPool",
    "AsyncConnectionPool": "ConnectionPool",
    "_AsyncConnectionContext": "_ConnectionContext",
    "AsyncConnectAttempt": "ConnectAttempt",
    "AsyncConnection": "Connection",
    "AsyncWaiter": "Waiter",
    "AsyncWakeup": "Wakeup",
    "AsyncDeadlines": "Deadlines",
    "AsyncWatchdog": "Watchdog",
    "AsyncBackground": "Background",
    "AsyncPoolMixin": "PoolMixin",
    "AsyncReturningConnection": "ReturningConnection",
    "ACT": "CT",
    "asleep": "sleep",
    "aresolve": "resolve",
    "acheck_cancelled": "check_cancelled",
    "acancelling": "cancelling",
    "acancelled": "cancelled",
    "arun_now": "run_now",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "_connector_async": "_connector",
    "null_pool_async": "null_pool",
    "pool_async": "pool",
}

PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\basync def "), "def "),
    (re.compile(r"\basync with "), "with "),
    (re.compile(r"\basync for "), "for "),
    (re.compile(r"\bawait "), ""),
    (re.compile(r"Awaitable\[([^\[\]]*(?:\[[^\[\]]*\])?[^\[\]]*)\]"), r"\1"),
    (re.compile(r"Coroutine\[Any, Any, Any\]"), "Any"),
    (re.compile(r"^(from collections\.abc import .*)\bAwaitable, "), r"\1"),
    (re.compile(r"^(from collections\.abc import .*), Coroutine\b"), r"\1"),
    *[(re.compile(rf"\b{re.escape(a)}\b"), b) for a, b in WORDS.items()],
]

HEADER = (
    "# WARNING: this file is generated from {src} by tools/unasync.py: do not edit it,\n"
    "# edit {src} and run `python tools/unasync.py`.\n"
)


def translate(text: str, src: str) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        for pattern, repl in PATTERNS:
            line = pattern.sub(repl, line)
        out.append(line)
    return HEADER.format(src=src) + "".join(out)


def formatted(text: str, path: Path) -> str:
    """`text` as `ruff format` lays it out: dropping `await`s can shorten lines that
    the formatter would then join, and CI checks the formatting of every file."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(path), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"ruff format failed on the translation of {path.name}:\n{proc.stderr}")
    return proc.stdout


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for src, dst in FILES.items():
        target = PACKAGE / dst
        expected = formatted(translate((PACKAGE / src).read_text(), src), target)
        current = target.read_text() if target.exists() else None
        if current == expected:
            continue
        if check:
            stale.append(dst)
        else:
            target.write_text(expected)
            print(f"wrote psycopg_pool/{dst}")
    if stale:
        print(
            "stale generated files: " + ", ".join(stale) + " (run `python tools/unasync.py`)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
