"""A PoolTimeout must not cost more when more clients exist.

In a storm, timeouts come by the thousand: if each one costs time proportional to
the number of tasks or threads of the process, the event loop (or the pool's lock)
spends its time explaining timeouts instead of handing connections over, fewer
clients are served, more time out, and the storm feeds itself. (Found by
tests/integration/test_storm.py: successful uses fell from ~1,500 to ~40 per storm.)

The cost is counted, not timed: the Python and C function calls made while one
`getconn(timeout=0)` fails on an exhausted pool, with few or many unrelated clients
parked elsewhere.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

from psycopg_pool import PoolTimeout

from . import aharness, sharness

FEW, MANY = 10, 200


def calls_during(fn: Callable[[], Any]) -> int:
    """How many function calls `fn()` makes (it must raise PoolTimeout)."""
    n = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    sys.setprofile(profile)
    try:
        fn()
    except PoolTimeout:
        pass
    else:
        raise AssertionError("no PoolTimeout")
    finally:
        sys.setprofile(None)
    return n


async def async_cost(parked: int) -> int:
    async with aharness.scenario(max_size=1) as ctx:
        await ctx.holder()  # a task holds the only connection
        release = asyncio.Event()
        others = [asyncio.create_task(release.wait()) for _ in range(parked)]
        await asyncio.sleep(0)  # let them start and park

        def explain() -> None:
            coro = ctx.pool.getconn(0)  # fails at once: nothing is awaited
            try:
                coro.send(None)
            finally:
                coro.close()

        cost = calls_during(explain)
        release.set()
        await asyncio.gather(*others)
    return cost


def sync_cost(parked: int) -> int:
    with sharness.scenario(max_size=1) as ctx:
        ctx.holder()
        release = threading.Event()
        others = [threading.Thread(target=release.wait, daemon=True) for _ in range(parked)]
        for t in others:
            t.start()
        try:
            cost = calls_during(lambda: ctx.pool.getconn(0))
        finally:
            release.set()
            for t in others:
                t.join()
    return cost


@aharness.run_async
async def test_async_timeout_cost_does_not_grow_with_tasks() -> None:
    few, many = await async_cost(FEW), await async_cost(MANY)
    assert many < 2 * few, f"{few} calls with {FEW} other tasks, {many} with {MANY}"


def test_sync_timeout_cost_does_not_grow_with_threads() -> None:
    few, many = sync_cost(FEW), sync_cost(MANY)
    assert many < 2 * few, f"{few} calls with {FEW} other threads, {many} with {MANY}"
