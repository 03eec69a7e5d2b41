#!/usr/bin/env python3
"""A storm of signals whose handler raises, in the main thread using the pool.

A timer signal fires at a random moment of each checkout and return, in the main
thread, and its handler raises (as KeyboardInterrupt or Celery's soft time limit
would). After each interrupted cycle the client gives back whatever it still holds
and the pool's places are counted. Prints the first cycle after which a place is
missing, and where the interrupt that caused it landed.

`tests/shell/test_interrupt_anywhere.py` visits each place of the pool's shell where
CPython runs signal handlers; this is the real thing, core, psycopg and server
included. It found `take()` dropping the slot it had just popped. See docs/design.md,
"An exception from a signal handler".

    .venv/bin/python tools/signal_storm.py                 # on a throw-away server
    .venv/bin/python tools/signal_storm.py --dsn "..." --api getconn --query

Exits 1 if a place was lost. `tests/integration/test_signals.py` runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import traceback
from types import FrameType
from typing import Any

from psycopg import Connection

from psycopg_pool import ConnectionPool
from psycopg_pool._core.state import INF
from psycopg_pool._embedded_pg import EmbeddedPostgres


class Alarm(BaseException):
    """What the handler raises: a BaseException, like KeyboardInterrupt."""


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Alarm


def storm(dsn: str, api: str, query: bool, cycles: int, seed: int) -> str:
    rng = random.Random(seed)
    longest = 200e-6 if query else 30e-6  # about one cycle: the signal lands anywhere in it
    interrupted = 0
    with ConnectionPool(dsn, min_size=2, max_size=2, name="storm", timeout=2.0) as pool:
        pool.wait()
        previous = signal.signal(signal.SIGALRM, _raise)
        try:
            for i in range(cycles):
                held: list[Any] = []
                conn = None
                where: list[str] = []
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, longest))
                    if api == "getconn":
                        held.append(pool.getconn())
                        if query:
                            held[0].execute("SELECT 1")
                        pool.putconn(held[0])
                        held.clear()
                    else:
                        ctx = pool.connection()
                        held.append(ctx)
                        with ctx as conn:
                            if query:
                                conn.execute("SELECT 1")
                        held.clear()
                    signal.setitimer(signal.ITIMER_REAL, 0)
                except Alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    interrupted += 1
                    tb = traceback.extract_tb(sys.exc_info()[2])[1:-1]
                    where = [f"{f.name}:{f.lineno}" for f in tb]
                for c in held:
                    if not isinstance(c, Connection):
                        c = getattr(c, "_conn", None)  # (a `with` block's, if it got one)
                    if c is not None and c._pool is pool:  # still the client's: given back
                        pool.putconn(c)
                del conn  # (a `with` block's variable, which would keep it alive)
                held.clear()
                pool._reap(INF)  # what the client dropped comes back now, not later
                stats = pool.get_stats()
                missing = 2 - stats["pool_available"] - stats.get("pool_connecting", 0)
                if missing > 0:
                    return (
                        f"{api}, query={query}: {missing} place(s) lost after cycle {i}"
                        f" ({interrupted} interrupted); last interrupt at"
                        f" {' > '.join(where) or '(none)'}"
                    )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return f"{api}, query={query}: nothing lost in {cycles} cycles ({interrupted} interrupted)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("SIGNAL_STORM_DSN"),
        help="a server to use (default: $SIGNAL_STORM_DSN, else a throw-away one)",
    )
    parser.add_argument("--api", choices=["connection", "getconn"], default="connection")
    parser.add_argument("--query", action="store_true", help="run SELECT 1 in each cycle")
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # Interrupted queries leave connections the pool closes, each with a warning.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    if args.dsn:
        result = storm(args.dsn, args.api, args.query, args.cycles, args.seed)
    else:
        with EmbeddedPostgres() as pg:
            result = storm(pg.dsn, args.api, args.query, args.cycles, args.seed)
    print(result)
    sys.exit(0 if "nothing lost" in result else 1)


if __name__ == "__main__":
    main()
