"""Where a hand-off's time goes: the pool beside simpler ways to share connections.

One process, `SELECT 1` (autocommit, or with a COMMIT: `--transaction`) from
`--workers` asyncio tasks (or threads, with `--threads`); the modes take turns in
slices (A B C ... C B A ...) so that they all see the same machine state:

- `baseline`: min(workers, max_size) workers, each on its own dedicated connection;
- `fifo`: a deque of max_size connections; waiters (a future, or a lock for threads)
  served in order;
- `fifo-busy`: the same with `--busy` iterations of an empty Python loop per request
  (50 is about 0.3 µs), to see what a little more Python costs in place;
- `fifo-ctx` (tasks): the FIFO behind a class-based `async with` (the protocol's cost);
- `getconn`: `pool.getconn()` / `pool.putconn()`;
- `pool`: `with pool.connection()`.

`--ablate lock` swaps the async pool's lock for a no-op, `--ablate deadlines` skips its
shared deadline timer (waiters then never time out): probes of what those parts cost,
safe only because one thread uses that pool. Prints a markdown table.

    .venv/bin/python bench/probe.py --workers 1024 --max-size 16
    .venv/bin/python bench/probe.py --threads --workers 16 --max-size 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg
from workload import (
    CHECKOUT_TIMEOUT,
    AsyncRequest,
    Metrics,
    SyncRequest,
    _adedicated_request,
    _afifo_request,
    _apool_request,
    _AsyncFifo,
    _dedicated_request,
    _fifo_request,
    _pool_request,
    _share_order,
    _SyncFifo,
    clock,
    run_tasks,
    run_threads,
)

MODES = ("baseline", "fifo", "fifo-busy", "fifo-ctx", "getconn", "pool")
Runs = dict[str, list[tuple[float, float]]]  # mode: (q/s, client CPU µs/req) per slice


class _FifoContext:
    __slots__ = ("_conn", "_fifo")

    def __init__(self, fifo: _AsyncFifo) -> None:
        self._fifo = fifo

    async def __aenter__(self) -> Any:
        self._conn = conn = await self._fifo.get()
        return conn

    async def __aexit__(self, *exc: object) -> None:
        self._fifo.put(self._conn)


async def _fifo_context_request(fifo: _AsyncFifo, autocommit: bool) -> tuple[float, float]:
    async with _FifoContext(fifo) as conn:
        t1 = clock()
        await (await conn.execute("SELECT 1")).fetchone()
        if not autocommit:
            await conn.commit()
    return t1, clock()


def _agetconn_request(pool: Any, autocommit: bool) -> AsyncRequest:
    async def req() -> tuple[float, float]:
        conn = await pool.getconn(timeout=CHECKOUT_TIMEOUT)
        try:
            t1 = clock()
            await (await conn.execute("SELECT 1")).fetchone()
            if not autocommit:
                await conn.commit()
        finally:
            await pool.putconn(conn)
        return t1, clock()

    return req


def _getconn_request(pool: Any, autocommit: bool) -> SyncRequest:
    def req() -> tuple[float, float]:
        conn = pool.getconn(timeout=CHECKOUT_TIMEOUT)
        try:
            t1 = clock()
            conn.execute("SELECT 1").fetchone()
            if not autocommit:
                conn.commit()
        finally:
            pool.putconn(conn)
        return t1, clock()

    return req


class _NoLock:
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass


def _ablate(pool: Any, parts: list[str]) -> None:
    if "lock" in parts:
        pool._lock = _NoLock()
    if "deadlines" in parts:
        from psycopg_pool import _acompat

        def add(self: Any, deadline: float) -> bool:
            return True

        _acompat.AsyncDeadlines.add = add  # type: ignore[method-assign]


def _record(runs: Runs, mode: str, m: Metrics) -> None:
    runs[mode].append((m["throughput"], m.get("cpu_us_per_op", float("nan"))))


async def probe_tasks(dsn: str, args: argparse.Namespace, modes: list[str]) -> Runs:
    from psycopg_pool import AsyncConnectionPool

    w, n, ac = args.workers, args.max_size, not args.transaction
    connect = psycopg.AsyncConnection.connect
    pool = AsyncConnectionPool(dsn, min_size=n, max_size=n, kwargs={"autocommit": ac}, open=False)
    await pool.open(wait=True, timeout=CHECKOUT_TIMEOUT)
    _ablate(pool, args.ablate)
    dedicated = [await connect(dsn, autocommit=ac) for _ in range(min(w, n))]
    fifo_conns = [await connect(dsn, autocommit=ac) for _ in range(n)]
    fifo = _AsyncFifo(fifo_conns)
    reqs: dict[str, list[AsyncRequest]] = {
        "baseline": [_adedicated_request(c, ac) for c in dedicated],
        "fifo": [_afifo_request(fifo, ac)] * w,
        "fifo-busy": [_afifo_request(fifo, ac, busy=args.busy)] * w,
        "fifo-ctx": [partial(_fifo_context_request, fifo, ac)] * w,
        "getconn": [_agetconn_request(pool, ac)] * w,
        "pool": [_apool_request(pool)] * w,
    }
    runs: Runs = {m: [] for m in modes}
    try:
        for mode in modes:  # warm up every path once
            await run_tasks(reqs[mode], 0.0, 0.2)
        for _ in range(args.rounds // 2):
            for mode in _share_order(modes)[: 2 * len(modes)]:
                _record(runs, mode, await run_tasks(reqs[mode], 0.02, args.slice))
    finally:
        for c in dedicated + fifo_conns:
            await c.close()
        await pool.close()
    return runs


def probe_threads(dsn: str, args: argparse.Namespace, modes: list[str]) -> Runs:
    from psycopg_pool import ConnectionPool

    w, n, ac = args.workers, args.max_size, not args.transaction
    pool = ConnectionPool(dsn, min_size=n, max_size=n, kwargs={"autocommit": ac}, open=False)
    pool.open(wait=True, timeout=CHECKOUT_TIMEOUT)
    dedicated = [psycopg.connect(dsn, autocommit=ac) for _ in range(min(w, n))]
    fifo_conns = [psycopg.connect(dsn, autocommit=ac) for _ in range(n)]
    fifo = _SyncFifo(fifo_conns)
    reqs: dict[str, list[SyncRequest]] = {
        "baseline": [_dedicated_request(c, ac) for c in dedicated],
        "fifo": [_fifo_request(fifo, ac)] * w,
        "fifo-busy": [_fifo_request(fifo, ac, busy=args.busy)] * w,
        "getconn": [_getconn_request(pool, ac)] * w,
        "pool": [_pool_request(pool)] * w,
    }
    modes = [m for m in modes if m in reqs]
    runs: Runs = {m: [] for m in modes}
    try:
        for mode in modes:
            run_threads(reqs[mode], 0.0, 0.2)
        for _ in range(args.rounds // 2):
            for mode in _share_order(modes)[: 2 * len(modes)]:
                _record(runs, mode, run_threads(reqs[mode], 0.02, args.slice))
    finally:
        for c in dedicated + fifo_conns:
            c.close()
        pool.close()
    return runs


def table(runs: Runs) -> list[str]:
    def qps(mode: str) -> float:
        return sum(q for q, _ in runs[mode]) / len(runs[mode])

    def share(mode: str, ref: str) -> str:
        return f"{qps(mode) / qps(ref):.3f}" if ref in runs else "-"

    lines = [
        "| mode | q/s (median slice) | client CPU µs/req | ÷ baseline | ÷ fifo |",
        "|---|---|---|---|---|",
    ]
    for mode, r in runs.items():
        cells = [
            mode,
            f"{statistics.median(q for q, _ in r):,.0f}",
            f"{statistics.median(c for _, c in r):.1f}",
            share(mode, "baseline"),
            share(mode, "fifo"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from run import database

    with database(None, None) as (url, _):
        yield url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    ap.add_argument("--threads", action="store_true", help="threads rather than asyncio tasks")
    ap.add_argument(
        "--transaction", action="store_true", help="not autocommit: a COMMIT per request"
    )
    ap.add_argument("--workers", type=int, default=1024)
    ap.add_argument("--max-size", type=int, default=16)
    ap.add_argument("--slice", type=float, default=0.4, help="seconds per slice")
    ap.add_argument("--rounds", type=int, default=8, help="slices per mode (even)")
    ap.add_argument("--busy", type=int, default=50, help="empty loop iterations for fifo-busy")
    split: Callable[[str], list[str]] = lambda s: s.split(",")  # noqa: E731
    ap.add_argument("--modes", default=list(MODES), type=split)
    ap.add_argument("--ablate", default=[], type=split, help="lock,deadlines (see above)")
    args = ap.parse_args()
    modes = [m for m in MODES if m in args.modes]
    with _server(args.dsn) as dsn:
        if args.threads:
            runs = probe_threads(dsn, args, modes)
        else:
            runs = asyncio.run(probe_tasks(dsn, args, modes))
    kind = "threads" if args.threads else "tasks"
    ablated = f", ablated: {','.join(args.ablate)}" if args.ablate else ""
    print(
        f"{args.workers} {kind}, max_size {args.max_size},"
        f" {'transaction' if args.transaction else 'autocommit'}, {args.rounds} x {args.slice} s"
        f" per mode, fifo-busy {args.busy} loops{ablated}\n"
    )
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
