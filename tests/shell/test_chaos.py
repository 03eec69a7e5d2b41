"""Many clients against a pool of fakes failing at random, interrupted at random.

Each seed builds a different pool (plain or null, with or without check, reset
and configure callbacks) and runs a few dozen clients whose calls to the fakes
fail at random, some raising a KeyboardInterrupt-like exception; clients leave
their connection in every transaction status, raise in their block, time out,
are cancelled or see their `asyncio.timeout` expire, while `check()`, `drain()`
and sometimes `close()` run. The table-driven tests put one interruption at one
point; this puts many anywhere. Afterwards the books must balance as there.

These runs found a pool left below min_size after a discard during the
reconnection delay (now `test_refill_after_a_discard_while_waiting_to_retry`).
Set CHAOS_SEEDS for a longer hunt.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from typing import Any

import pytest

import psycopg_pool
from psycopg_pool._acompat import AsyncWaiter, Waiter

from . import aharness, sharness
from .fakes import ACTIVE, INERROR, INTRANS, Fakes
from .harness import TALLY

SEEDS = range(int(os.environ.get("CHAOS_SEEDS", "25")))
N_CLIENTS = 40


def pool_args(rng: random.Random) -> dict[str, Any]:
    callbacks = tuple(c for c in ("check", "reset", "configure") if rng.random() < 0.4)
    if rng.random() < 0.25:
        return {"null": True, "max_size": rng.randint(1, 3), "callbacks": callbacks}
    min_size = rng.randint(0, 2)
    return {"min_size": min_size, "max_size": min_size + rng.randint(1, 2), "callbacks": callbacks}


def client_args(rng: random.Random) -> dict[str, Any]:
    return {
        "timeout": rng.choice([None, None, 0.02, 0.2]),
        "context": rng.random() < 0.5,
        "tx": rng.choice([None, None, INTRANS, INERROR, ACTIVE]),
        "raise_in_block": rng.choice([None, None, None, ValueError("in the block")]),
    }


def blocking_points(monkeypatch: pytest.MonkeyPatch, fakes: Fakes) -> None:
    """The retry sleep (instant) and a client's wait pass through points too."""
    if fakes.asynchronous:
        real_await = AsyncWaiter.wait

        async def awaiting(self: AsyncWaiter, timeout: float) -> bool:
            await fakes.ahit("wait", self)
            return await real_await(self, timeout)

        monkeypatch.setattr(AsyncWaiter, "wait", awaiting)
        monkeypatch.setattr(psycopg_pool.pool_async, "asleep", lambda d: fakes.ahit("sleep"))
    else:
        real_wait = Waiter.wait

        def waiting(self: Waiter, timeout: float) -> bool:
            fakes.hit("wait", self)
            return real_wait(self, timeout)

        monkeypatch.setattr(Waiter, "wait", waiting)
        monkeypatch.setattr(psycopg_pool.pool, "sleep", lambda d: fakes.hit("sleep"))


@pytest.mark.parametrize("seed", SEEDS)
@aharness.run_async
async def test_chaos_async(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    async with aharness.scenario(**pool_args(rng)) as ctx:
        blocking_points(monkeypatch, ctx.fakes)
        ctx.fakes.chaos(rng, fail=0.1, interrupt=0.02)
        clients: list[aharness.Client] = []
        hits = 0
        for i in range(N_CLIENTS):
            clients.append(ctx.client(f"client-{i}", **client_args(rng)))
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            r = rng.random()
            if r < 0.15:
                rng.choice(clients).cancel()
                hits += 1
            elif r < 0.25 and aharness.HAS_TIMEOUT:
                rng.choice(clients).expire()
                hits += 1
            elif r < 0.28:
                ctx.op("checker", ctx.pool.check)
            elif r < 0.3:
                await ctx.pool.drain()
        if rng.random() < 0.2:
            ctx.closer(rng.choice([0.01, 5.0]))
            hits += 1
        await ctx.finish()
        TALLY["interruptions"] += hits + ctx.fakes.injected


def _client_thread() -> bool:
    """Only a client's own thread may be interrupted (a worker dying is another test)."""
    return threading.current_thread().name.startswith("client-")


@pytest.mark.parametrize("seed", SEEDS)
def test_chaos_sync(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    with sharness.scenario(**pool_args(rng)) as ctx:
        blocking_points(monkeypatch, ctx.fakes)
        ctx.fakes.chaos(rng, fail=0.1, interrupt=0.02, may_interrupt=_client_thread)
        for i in range(N_CLIENTS // 2):
            ctx.client(f"client-{i}", **client_args(rng))
            r = rng.random()
            if r < 0.05:
                ctx.op("checker", ctx.pool.check)
            elif r < 0.08:
                ctx.pool.drain()
        if rng.random() < 0.2:
            ctx.closer(rng.choice([0.01, 5.0]))
        ctx.finish()
        TALLY["interruptions"] += ctx.fakes.injected + (1 if ctx.shut() else 0)
