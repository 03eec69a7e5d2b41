"""Where an asyncio hand-off's time goes: the pool beside simpler ways to share connections.

One process, one event loop, `SELECT 1` (autocommit) from `--workers` tasks; the modes
take turns in slices (A B C ... C B A ...) so that they all see the same machine state:

- `baseline`: min(workers, max_size) tasks, each on its own dedicated connection;
- `fifo`: a deque of max_size connections and one future per waiter, `get()`/`put()`;
- `fifo-ctx`: the same FIFO behind a class-based `async with` (the protocol's own cost);
- `getconn`: `await pool.getconn()` / `await pool.putconn()`;
- `pool`: `async with pool.connection()`.

`--ablate lock` swaps the pool's lock for a no-op, `--ablate deadlines` skips the shared
deadline timer (waiters then never time out): probes of what those parts cost, which
are safe here only because one thread uses the pool. Prints a markdown table.

    .venv/bin/python bench/probe.py --workers 1024 --max-size 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from workload import (
    CHECKOUT_TIMEOUT,
    AsyncRequest,
    _adedicated_request,
    _apool_request,
    _AsyncFifo,
    _share_order,
    clock,
    run_tasks,
)

MODES = ("baseline", "fifo", "fifo-ctx", "getconn", "pool")


class _FifoContext:
    __slots__ = ("_conn", "_fifo")

    def __init__(self, fifo: _AsyncFifo) -> None:
        self._fifo = fifo

    async def __aenter__(self) -> Any:
        self._conn = conn = await self._fifo.get()
        return conn

    async def __aexit__(self, *exc: object) -> None:
        self._fifo.put(self._conn)


def _fifo_request(fifo: _AsyncFifo, ctx: bool) -> AsyncRequest:
    async def plain() -> tuple[float, float]:
        conn = await fifo.get()
        try:
            t1 = clock()
            await (await conn.execute("SELECT 1")).fetchone()
        finally:
            fifo.put(conn)
        return t1, clock()

    async def with_context() -> tuple[float, float]:
        async with _FifoContext(fifo) as conn:
            t1 = clock()
            await (await conn.execute("SELECT 1")).fetchone()
        return t1, clock()

    return with_context if ctx else plain


def _getconn_request(pool: Any) -> AsyncRequest:
    async def req() -> tuple[float, float]:
        conn = await pool.getconn(timeout=CHECKOUT_TIMEOUT)
        try:
            t1 = clock()
            await (await conn.execute("SELECT 1")).fetchone()
        finally:
            await pool.putconn(conn)
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

        def add(self: Any, fut: Any, deadline: float) -> bool:
            return True

        _acompat.AsyncDeadlines.add = add  # type: ignore[method-assign]


async def probe(dsn: str, args: argparse.Namespace) -> list[list[str]]:
    from psycopg_pool import AsyncConnectionPool

    w, n = args.workers, args.max_size
    connect = psycopg.AsyncConnection.connect
    pool = AsyncConnectionPool(dsn, min_size=n, max_size=n, kwargs={"autocommit": True}, open=False)
    await pool.open(wait=True, timeout=CHECKOUT_TIMEOUT)
    _ablate(pool, args.ablate)
    dedicated = [await connect(dsn, autocommit=True) for _ in range(min(w, n))]
    fifo_conns = [await connect(dsn, autocommit=True) for _ in range(n)]
    fifo = _AsyncFifo(fifo_conns)
    reqs: dict[str, list[AsyncRequest]] = {
        "baseline": [_adedicated_request(c, True) for c in dedicated],
        "fifo": [_fifo_request(fifo, False)] * w,
        "fifo-ctx": [_fifo_request(fifo, True)] * w,
        "getconn": [_getconn_request(pool)] * w,
        "pool": [_apool_request(pool)] * w,
    }
    modes = [m for m in MODES if m in args.modes]
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        for mode in modes:  # warm up every path once
            await run_tasks(reqs[mode], 0.0, 0.2)
        for _ in range(args.rounds // 2):
            for mode in _share_order(modes)[: 2 * len(modes)]:
                m = await run_tasks(reqs[mode], 0.02, args.slice)
                runs[mode].append((m["throughput"], m.get("cpu_us_per_op", float("nan"))))
    finally:
        for c in dedicated + fifo_conns:
            await c.close()
        await pool.close()

    def qps(mode: str) -> float:
        return sum(q for q, _ in runs[mode]) / len(runs[mode])

    rows = []
    for mode in modes:
        rows.append(
            [
                mode,
                f"{statistics.median(q for q, _ in runs[mode]):,.0f}",
                f"{statistics.median(c for _, c in runs[mode]):.1f}",
                f"{qps(mode) / qps('baseline'):.3f}" if "baseline" in runs else "-",
                f"{qps(mode) / qps('fifo'):.3f}" if "fifo" in runs else "-",
            ]
        )
    return rows


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
    ap.add_argument("--workers", type=int, default=1024)
    ap.add_argument("--max-size", type=int, default=16)
    ap.add_argument("--slice", type=float, default=0.4, help="seconds per slice")
    ap.add_argument("--rounds", type=int, default=8, help="slices per mode (even)")
    ap.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    ap.add_argument(
        "--ablate", default=[], type=lambda s: s.split(","), help="lock,deadlines (see above)"
    )
    args = ap.parse_args()
    with _server(args.dsn) as dsn:
        rows = asyncio.run(probe(dsn, args))
    print(
        f"{args.workers} tasks, max_size {args.max_size}, {args.rounds} x {args.slice} s"
        f" per mode{', ablated: ' + ','.join(args.ablate) if args.ablate else ''}\n"
    )
    print("| mode | q/s (median slice) | client CPU µs/req | ÷ baseline | ÷ fifo |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
