"""A short demo: many threads and many tasks sharing a few connections.

    python -m psycopg_pool.demo [--seconds N]

Uses the database in $DATABASE_URL, or starts a throw-away PostgreSQL (server
binaries found on this machine) and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator

from . import AsyncConnectionPool, ConnectionPool


@contextlib.contextmanager
def database() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from ._embedded_pg import EmbeddedPostgres

    print("no DATABASE_URL: starting a throw-away PostgreSQL...")
    with EmbeddedPostgres() as server:
        yield server.dsn


def run_threads(dsn: str, seconds: float, workers: int) -> None:
    done = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    with ConnectionPool(dsn, min_size=2, max_size=4, open=True, name="demo-threads") as pool:

        def work() -> None:
            nonlocal done
            n = 0
            while time.monotonic() < stop:
                with pool.connection() as conn:
                    conn.execute("SELECT pg_sleep(0.001)")
                n += 1
            with lock:
                done += n

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report(f"ConnectionPool, {workers} threads", done, seconds, pool.get_stats())


async def run_tasks(dsn: str, seconds: float, workers: int) -> None:
    done = 0
    stop = time.monotonic() + seconds
    async with AsyncConnectionPool(
        dsn, min_size=2, max_size=8, open=False, name="demo-tasks"
    ) as pool:

        async def work() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with pool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.001)")
                done += 1

        await asyncio.gather(*(work() for _ in range(workers)))
        report(f"AsyncConnectionPool, {workers} tasks", done, seconds, pool.get_stats())


def report(title: str, done: int, seconds: float, stats: dict[str, int]) -> None:
    print(f"\n{title}: {done} queries in {seconds:.1f} s ({done / seconds:,.0f}/s)")
    for key in sorted(stats):
        print(f"  {key:20} {stats[key]:>10}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each run")
    args = parser.parse_args(argv)
    with database() as dsn:
        run_threads(dsn, args.seconds, workers=16)
        asyncio.run(run_tasks(dsn, args.seconds, workers=200))


if __name__ == "__main__":
    main()
