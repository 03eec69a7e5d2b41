"""`asyncio.wait_for(pool.getconn(), t)` racing the hand-off never loses a connection.

On Python < 3.12 `wait_for` has two traps: when its timeout fires as the inner
call completes, it cancels a task that already has its result; and when the
*outer* task is cancelled as the inner one completes, it returns the result and
swallows the cancellation. The pool must not depend on `wait_for` itself (its own
waits use a timer on a future), and a caller wrapping getconn in it must get
either the connection or the exception, with the connection never stranded.

Each round: the only connection is held; a client waits for it through
`wait_for`; the holder gives it back at about the moment `wait_for` gives up (or
the client is cancelled). The delays are drawn around each other so that every
ordering happens over the rounds; the test checks that each round ends with
the connection idle again, and that both outcomes were seen.
"""

from __future__ import annotations

import ast
import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import psycopg_pool

from .aharness import ACtx, run_async, scenario, until
from .harness import TALLY

ROUNDS = 300


async def one_round(ctx: ACtx, rng: random.Random, cancel: bool) -> str:
    pool = ctx.pool
    loop = asyncio.get_running_loop()
    held = await ctx.take()
    delay = rng.uniform(0.0005, 0.002)
    jitter = rng.uniform(-0.0005, 0.0005)

    async def client() -> Any:
        # The hand-off and the deadline (or the cancellation) are timed from here.
        loop.call_later(delay, lambda: loop.create_task(ctx.give_back(held)))
        if cancel:
            this = asyncio.current_task()
            assert this is not None
            loop.call_later(delay + jitter, this.cancel)
            return await asyncio.wait_for(pool.getconn(), 10.0)
        return await asyncio.wait_for(pool.getconn(), delay + jitter)

    try:
        conn = await asyncio.create_task(client())
    except (asyncio.TimeoutError, asyncio.CancelledError) as ex:
        outcome = type(ex).__name__
    else:
        ctx.ledger.got("client", conn)
        await ctx.give_back(conn)
        outcome = "conn"
    # Whatever the outcome, the connection is back and idle: nothing stranded.
    await until(lambda: len(pool._core.idle) == 1 and not pool._core.n_waiting, "the connection")
    TALLY["interruptions"] += 1
    return outcome


@pytest.mark.parametrize(
    ("cancel", "outcomes"),
    [(False, {"conn", "TimeoutError"}), (True, {"conn", "CancelledError"})],
    ids=["wait_for-timeout", "outer-cancel"],
)
@run_async
async def test_wait_for_racing_the_hand_off(cancel: bool, outcomes: set[str]) -> None:
    rng = random.Random(int(cancel))
    seen: Counter[str] = Counter()
    async with scenario(max_size=1) as ctx:
        for _ in range(ROUNDS):
            seen[await one_round(ctx, rng, cancel)] += 1
    assert set(seen) == outcomes, seen


def test_the_pool_does_not_wait_with_wait_for() -> None:
    """The design rule: waits are timers on futures, never `asyncio.wait_for`."""
    root = Path(psycopg_pool.__file__).parent
    for name in ("pool_async.py", "null_pool_async.py", "_connector_async.py", "_acompat.py"):
        tree = ast.parse((root / name).read_text())
        used = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, (ast.Attribute, ast.Name))
            and (node.attr if isinstance(node, ast.Attribute) else node.id) == "wait_for"
        ]
        assert not used, f"{name} uses wait_for at lines {used}"
