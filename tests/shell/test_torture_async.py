"""AsyncConnectionPool under interruption at every await point, with fake connections.

Each *spot* brings the pool to block at one await point (a gate of the fakes, or a
client queued for a connection); each *interruption* then hits it there:

    cancel        task.cancel() of the caller blocked there (or waiting on it)
    timeout       the caller's `asyncio.timeout` expires
    pool_timeout  the pool's own `timeout` of a waiting caller expires
    wait_timeout  the timeout of `wait()` / `close()` expires
    error         the blocked call raises an Exception
    interrupt     the blocked call raises a BaseException (not CancelledError)
    close         pool.close() meanwhile (waiting for the background work)
    close_cancel  pool.close(timeout=0.01), which cancels the background work

Whatever happens, the books must balance afterwards (`ACtx.finish`), the pool
must serve at once, and closing it must close every connection ever opened. Each
spot also says what its victim may see: a connection ("conn"), a normal return
("ok"), or an exception (by class name).

`test_await_points_are_covered` parses the async shell and fails when an await
expression appears that `COVERED` does not map to a scenario here.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import OperationalError

import psycopg_pool
from psycopg_pool._acompat import AsyncWaiter
from psycopg_pool._core import state as st

from .aharness import HAS_TIMEOUT, Actor, ACtx, reached, run_async, scenario, until
from .fakes import ACTIVE, INTRANS, Fakes, Gate, Interrupt, break_conn
from .harness import (
    BACKGROUND,
    BG_CONNECT,
    BG_RETURN,
    CANCELLED,
    CHECK,
    CLOSED,
    CONNECT_CALLBACKS,
    CONNECT_STEPS,
    LEND_CHECK,
    POOL_TIMEOUT,
    QUEUE,
    RETURN,
    SHORT,
    TALLY,
    TIMEOUT,
    WAIT,
    Spot,
    Spots,
    victim_timeout,
)

SPOTS = Spots()
spot = SPOTS
# All of them: an asyncio shell can be interrupted in every way.
INTERRUPTIONS = {
    "cancel",
    "timeout" if HAS_TIMEOUT else "cancel",
    "pool_timeout",
    "wait_timeout",
    "error",
    "broken",
    "interrupt",
    "close",
    "close_cancel",
}

# ----------------------------------------------------------------------
# Spots: clients waiting in the queue


def wait_gate(ctx: ACtx, how: str) -> Gate | None:
    """For `interrupt`: the victim's wait for a connection raises it (see `waiting`)."""
    return ctx.fakes.block("wait") if how == "interrupt" else None


async def queued_victim(ctx: ACtx, how: str, **kwargs: Any) -> Actor:
    """A victim client, once it waits for a connection (or has already ended).

    Waited for, not assumed: on Python >= 3.12 `reached()` on an event already set
    does not yield to the loop, so a victim created after its gate was reached by
    another actor would not have started by the time it is interrupted.
    """
    victim = ctx.client("victim", timeout=victim_timeout(how), **kwargs)
    await until(lambda: ctx.pool._core.n_waiting or victim.done.is_set(), "the victim to queue")
    return victim


async def _queued(ctx: ACtx, how: str, **kwargs: Any) -> tuple[Actor, Gate | None]:
    await ctx.holder()
    gate = wait_gate(ctx, how)
    return await queued_victim(ctx, how, **kwargs), gate


@spot("queue", QUEUE, max_size=1)
async def reach_queue(ctx: ACtx, how: str) -> tuple[Actor, Gate | None]:
    return await _queued(ctx, how)


@spot("queue-context", QUEUE, max_size=1)
async def reach_queue_context(ctx: ACtx, how: str) -> tuple[Actor, Gate | None]:
    return await _queued(ctx, how, context=True)


@spot("queue-check", QUEUE, max_size=1, callbacks=("check",))
async def reach_queue_check(ctx: ACtx, how: str) -> tuple[Actor, Gate | None]:
    return await _queued(ctx, how)


@spot("null-queue", QUEUE, null=True)
async def reach_null_queue(ctx: ACtx, how: str) -> tuple[Actor, Gate | None]:
    return await _queued(ctx, how)


# ----------------------------------------------------------------------
# Spots: the check callback of getconn, and its retry sleep


@spot(
    "check",
    LEND_CHECK,
    max_size=1,
    callbacks=("check",),
)
async def reach_check(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("check")
    victim = ctx.client("victim", timeout=victim_timeout(how))
    return victim, gate


@spot(
    "alive-check",
    LEND_CHECK,
    max_size=1,
    alive_check_after=0.0,
)
async def reach_alive_check(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    """No check callback, but the idle connection received something: checked."""
    ctx.pool._core.idle[0].conn.pgconn.server_says()
    gate = ctx.fakes.block("execute")
    return ctx.client("victim", timeout=victim_timeout(how)), gate


@spot(
    "check-sleep",
    {
        "cancel": (CANCELLED,),
        "timeout": (TIMEOUT,),
        "interrupt": ("Interrupt",),
        "close": (CLOSED,),
    },
    max_size=1,
    callbacks=("check",),
)
async def reach_check_sleep(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    # Two checks fail on a healthy connection: the third attempt comes after a sleep.
    ctx.fakes.fail("check", OperationalError("check failed"), times=2)
    gate = ctx.fakes.block("sleep")
    victim = ctx.client("victim")
    return victim, gate


# ----------------------------------------------------------------------
# Spots: connecting, inline (null pool) and in the background


async def _connect_step(ctx: ACtx, step: str) -> Gate:
    if step == "close":  # configure failed: the connection is closed before raising
        ctx.fakes.fail("configure", OperationalError("configure failed"))
    return ctx.fakes.block(step)


def _connect_spots() -> None:
    for step in CONNECT_STEPS:
        callbacks = CONNECT_CALLBACKS

        async def reach_inline(ctx: ACtx, how: str, step: str = step) -> tuple[Actor, Gate]:
            gate = await _connect_step(ctx, step)
            return ctx.client("victim"), gate

        failed = "OperationalError"  # the step's error, or configure's (step "close")
        spot(
            f"inline-{step}",
            {
                "cancel": (CANCELLED,),
                "timeout": (TIMEOUT,),
                "error": (failed,),
                "interrupt": ("Interrupt",),
                "close": (failed,) if step == "close" else (CLOSED,),
            },
            null=True,
            callbacks=callbacks,
        )(reach_inline)

        async def reach_bg(ctx: ACtx, how: str, step: str = step) -> tuple[Actor, Gate]:
            await ctx.holder()
            gate = await _connect_step(ctx, step)
            return ctx.client("victim", timeout=victim_timeout(how)), gate

        spot(
            f"bg-{step}",
            BG_CONNECT,
            max_size=2,
            callbacks=callbacks,
        )(reach_bg)


_connect_spots()


# ----------------------------------------------------------------------
# Spots: giving a connection back


@spot("return-rollback", RETURN, max_size=1)
async def reach_return_rollback(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("rollback")
    return ctx.client("victim", tx=INTRANS), gate


@spot("return-active-close", RETURN, max_size=1)
async def reach_return_active(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("close")
    return ctx.client("victim", tx=ACTIVE), gate


@spot("return-active-cancel", RETURN, max_size=1)
async def reach_return_active_cancel(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("cancel")  # the query a closing connection still runs
    return ctx.client("victim", tx=ACTIVE), gate


@spot("return-rollback-failed-close", RETURN, max_size=1)
async def reach_return_rollback_failed(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    ctx.fakes.fail("rollback", OperationalError("rollback failed"))
    gate = ctx.fakes.block("close")
    return ctx.client("victim", tx=INTRANS), gate


@spot("return-rollback-waiter", QUEUE, max_size=1)
async def reach_return_waiter(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("rollback")
    ctx.client("returner", tx=INTRANS)
    await reached(gate.reached, "the rollback")
    waiting = wait_gate(ctx, how)
    return await queued_victim(ctx, how), waiting or gate


async def _bg_return(ctx: ACtx, how: str, point: str, tx: Any = None) -> tuple[Actor, Gate]:
    if point == "close":
        ctx.fakes.fail("reset", OperationalError("reset failed"))
    gate = ctx.fakes.block(point)
    ctx.client("returner", tx=tx)
    await reached(gate.reached, f"the {point} in the background")
    return await queued_victim(ctx, how), gate


@spot("reset", BG_RETURN, max_size=1, callbacks=("reset",))
async def reach_reset(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    return await _bg_return(ctx, how, "reset")


@spot("reset-rollback", BG_RETURN, max_size=1, callbacks=("reset",))
async def reach_reset_rollback(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    return await _bg_return(ctx, how, "rollback", INTRANS)


@spot("reset-failed-close", BG_RETURN, max_size=1, callbacks=("reset",))
async def reach_reset_failed(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    return await _bg_return(ctx, how, "close")


@spot(
    "exit-commit",
    {**RETURN, "error": ("OperationalError",)},
    max_size=1,
)
async def reach_exit_commit(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("commit")
    return ctx.client("victim", context=True, tx=INTRANS), gate


@spot(
    "exit-rollback",
    {**RETURN, "error": ("ValueError",), "close": ("ValueError",)},
    max_size=1,
)
async def reach_exit_rollback(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("rollback")
    victim = ctx.client("victim", context=True, tx=INTRANS, raise_in_block=ValueError("oops"))
    return victim, gate


# ----------------------------------------------------------------------
# Spots: pool.check(), wait(), open(), close(), and the background jobs


@spot("pool-check-execute", CHECK, min_size=2)
async def reach_pool_check_execute(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("execute")
    return ctx.op("checker", ctx.pool.check), gate


@spot("pool-check-autocommit-on", CHECK, min_size=2)
async def reach_pool_check_on(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("set_autocommit")
    return ctx.op("checker", ctx.pool.check), gate


@spot("pool-check-autocommit-off", CHECK, min_size=2)
async def reach_pool_check_off(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("set_autocommit", skip=1)
    return ctx.op("checker", ctx.pool.check), gate


@spot("pool-check-waiter", QUEUE, min_size=1)
async def reach_pool_check_waiter(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    gate = ctx.fakes.block("execute")
    ctx.op("checker", ctx.pool.check)
    await reached(gate.reached, "the check")
    waiting = wait_gate(ctx, how)
    return await queued_victim(ctx, how), waiting or gate


async def _waiting(
    ctx: ACtx, how: str, fn: Callable[[float], Awaitable[Any]]
) -> tuple[Actor, Gate]:
    connecting = ctx.fakes.gates[0]
    gate = wait_gate(ctx, how)
    timeout = SHORT if how == "wait_timeout" else 5.0
    victim = ctx.op("waiter", lambda: fn(timeout))
    await until(lambda: ctx.pool._core.ready_waiters or victim.done.is_set(), "wait() to wait")
    return victim, gate or connecting


@spot("wait", WAIT, min_size=2, open_wait=False)
async def reach_wait(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    ctx.fakes.block("connect")
    await ctx.pool.open()
    return await _waiting(ctx, how, ctx.pool.wait)


@spot("open-wait", WAIT, min_size=2, open_wait=False)
async def reach_open_wait(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    ctx.fakes.block("connect")
    return await _waiting(ctx, how, lambda t: ctx.pool.open(wait=True, timeout=t))


CLOSING = {"cancel": (CANCELLED,), "timeout": (TIMEOUT,), "wait_timeout": ("ok",)}


async def _closing(ctx: ACtx, how: str, fn: Callable[[], Awaitable[Any]]) -> tuple[Actor, Gate]:
    await ctx.holder()
    gate = ctx.fakes.block("connect")
    ctx.client("waiter")
    await reached(gate.reached, "the connection attempt")
    victim = ctx.op("closer", fn)
    await ctx.is_closed()
    return victim, gate


@spot("close", CLOSING, max_size=2)
async def reach_close(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    timeout = 0.01 if how == "wait_timeout" else 5.0
    return await _closing(ctx, how, lambda: ctx.pool.close(timeout))


@spot("aexit", {"cancel": (CANCELLED,), "timeout": (TIMEOUT,)}, max_size=2)
async def reach_aexit(ctx: ACtx, how: str) -> tuple[Actor, Gate]:
    return await _closing(ctx, how, lambda: ctx.pool.__aexit__(None, None, None))


@spot(
    "reconnect-failed",
    BACKGROUND,
    open_wait=False,
    reconnect_timeout=0.0,
    callbacks=("reconnect_failed",),
)
async def reach_reconnect_failed(ctx: ACtx, how: str) -> tuple[None, Gate]:
    ctx.fakes.fail("connect", OperationalError("server down"))
    gate = ctx.fakes.block("reconnect_failed")
    await ctx.pool.open()
    return None, gate


@spot("close-job", BACKGROUND)
async def reach_close_job(ctx: ACtx, how: str) -> tuple[None, Gate]:
    gate = ctx.fakes.block("close")
    await ctx.pool.drain()
    return None, gate


# ----------------------------------------------------------------------
# Running the table


async def interrupt(ctx: ACtx, how: str, victim: Actor | None, gate: Gate | None) -> None:
    """Hit the blocked pool with `how`, then let everything go on."""
    TALLY["interruptions"] += 1
    if how == "pool_timeout" or (how == "wait_timeout" and victim and victim.name == "closer"):
        assert victim is not None
        await victim.finished()
    elif how == "wait_timeout":  # wait() timed out: it closes the pool, waiting for its jobs
        assert victim is not None
        await until(lambda: victim.done.is_set() or ctx.pool.closed, "wait() to time out")
    else:
        if gate is not None:
            await reached(gate.reached, f"{gate.point} to block")
        if how == "cancel":
            assert victim is not None
            victim.cancel()
            await victim.finished()
        elif how == "timeout":
            assert victim is not None
            victim.expire()
            await victim.finished()
        elif how in ("error", "broken", "interrupt"):
            assert gate is not None
            if how == "broken":
                break_conn(gate.conn)
            exc = Interrupt() if how == "interrupt" else OperationalError(f"{gate.point} failed")
            gate.open(raising=exc)
        elif how in ("close", "close_cancel"):
            closer = ctx.closer(0.01 if how == "close_cancel" else 5.0)
            await ctx.is_closed()
            if how == "close_cancel":
                await closer.finished()
        else:
            raise AssertionError(f"unknown interruption {how}")
    if gate is not None:
        gate.open(gate.raising)


@pytest.mark.parametrize(("spot", "how"), SPOTS.scenarios(INTERRUPTIONS))
@run_async
async def test_interrupted(spot: Spot, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with scenario(**spot.pool) as ctx:
        fakes = ctx.fakes
        # Two more points the fakes can block at: the retry sleep of getconn's check
        # loop, and a client's wait for a connection (before the real wait).
        monkeypatch.setattr(psycopg_pool.pool_async, "asleep", lambda d: fakes.ahit("sleep"))
        real_wait = AsyncWaiter.wait

        async def waiting(self: AsyncWaiter, *args: Any) -> bool:
            await fakes.ahit("wait", self)
            return await real_wait(self, *args)

        monkeypatch.setattr(AsyncWaiter, "wait", waiting)
        victim, gate = await spot.reach(ctx, how)
        await interrupt(ctx, how, victim, gate)
        await ctx.finish()
        if victim is not None:
            assert victim.result in spot.expect[how], f"victim: {victim.error!r}"


# ----------------------------------------------------------------------
# Races around the hand-off


@run_async
async def test_cancel_after_the_grant() -> None:
    """Cancelled in the same loop step as the connection is handed to it: passed on."""
    async with scenario(max_size=1) as ctx:
        held = await ctx.take()
        victim = ctx.client("victim")
        other = ctx.client("other")
        await until(lambda: ctx.pool._core.n_waiting == 2, "two clients to queue")
        await ctx.give_back(held)  # granted to the victim, which has not run yet
        victim.cancel()
        assert await victim.finished() == CANCELLED
        assert await other.finished() == "conn"
        TALLY["interruptions"] += 1


@run_async
async def test_pool_timeout_fires_as_the_grant_arrives() -> None:
    """The waiter's timer fires, then it is granted before it runs: passed on."""
    async with scenario(max_size=1) as ctx:
        held = await ctx.take()
        victim = ctx.client("victim")
        await until(lambda: ctx.pool._core.n_waiting, "the victim to queue")
        (ticket,) = ctx.pool._core.waiting()
        ticket.fut.set_result(False)  # what its timer does
        await ctx.give_back(held)
        assert await victim.finished() == POOL_TIMEOUT
        assert ctx.pool._core.counts()[st.IDLE] == 1
        TALLY["interruptions"] += 1


@run_async
async def test_close_after_the_grant() -> None:
    """The grant is the hand-over: a client granted a connection before close() keeps
    it (as upstream does), and the connection is closed when it comes back."""
    async with scenario(max_size=1) as ctx:
        held = await ctx.take()
        victim = ctx.client("victim")
        await until(lambda: ctx.pool._core.n_waiting, "the victim to queue")
        await ctx.give_back(held)
        await ctx.pool.close()  # its first step runs before the victim resumes
        assert await victim.finished() == "conn"
        await until(lambda: not ctx.fakes.open_conns(), "the connection closed on return")
        TALLY["interruptions"] += 1


@run_async
async def test_cancelled_twice_while_ending_the_transaction() -> None:
    """Cancelled in commit, then again in the rollback of the return: closed, not lost."""
    async with scenario(max_size=1) as ctx:
        commit = ctx.fakes.block("commit")
        rollback = ctx.fakes.block("rollback")
        victim = ctx.client("victim", context=True, tx=INTRANS)
        await reached(commit.reached, "the commit")
        victim.cancel()
        await reached(rollback.reached, "the rollback of the return")
        victim.cancel()
        assert await victim.finished() == CANCELLED
        TALLY["interruptions"] += 2


@run_async
async def test_check_turning_cancellation_into_an_error() -> None:
    """A check that reports its cancellation as an error must not swallow it.

    Like a driver that answers a cancelled query with QueryCanceled: getconn must
    still raise CancelledError, not retry with another connection.
    """

    def custom(fakes: Fakes) -> dict[str, Any]:
        async def check(conn: Any) -> None:
            try:
                await fakes.ahit("check", conn)
            except asyncio.CancelledError:
                raise OperationalError("canceling statement due to user request") from None

        return {"check": check}

    async with scenario(max_size=2, custom=custom) as ctx:
        fakes = ctx.fakes
        gate = fakes.block("check")
        victim = ctx.client("victim")
        await reached(gate.reached, "the check")
        victim.cancel()
        assert await victim.finished() == CANCELLED
        TALLY["interruptions"] += 1


@run_async
async def test_close_while_clients_wait_connect_check_and_return() -> None:
    """pool.close() with a client at each stage at once: no hang, every waiter PoolClosed."""
    async with scenario(max_size=3, callbacks=("check", "reset")) as ctx:
        fakes = ctx.fakes
        holder = await ctx.holder()
        checking = fakes.block("check")
        checked = ctx.client("checked")  # takes the idle connection, blocks in check
        await reached(checking.reached, "the check")
        connecting = fakes.block("connect")
        connector = ctx.client("connector")  # the pool grows for it
        await reached(connecting.reached, "the connection attempt")
        waiters = [ctx.client(f"waiter-{i}") for i in range(3)]
        await until(lambda: ctx.pool._core.n_waiting >= 3, "the waiters to queue")
        resetting = fakes.block("reset")
        holder.go.set()  # returns, reset in the background
        await reached(resetting.reached, "the reset")
        ctx.closer(5.0)
        await ctx.is_closed()
        for w in [connector, *waiters]:
            assert await w.finished() == CLOSED
        fakes.clear()
        assert await checked.finished() == "conn"
        TALLY["interruptions"] += 1


@run_async
async def test_housekeeper_ends_with_the_pool() -> None:
    async with scenario() as ctx:
        (housekeeper,) = ctx.pool._bg.daemons
    await until(housekeeper.done, "the housekeeper to end")
    TALLY["interruptions"] += 1


# ----------------------------------------------------------------------
# Every await point is covered

# Await expressions of the async shell ("function: awaited callable", repeats
# numbered) -> the spots, or the tests above, that interrupt the pool there or in
# what it awaits.
COVERED: dict[str, list[str]] = {
    "AsyncConnectionPool.open: self.wait": ["open-wait"],
    "AsyncConnectionPool.close: self._stop_background": ["close", "aexit"],
    "AsyncConnectionPool._stop_background: bg.stop": ["close", "aexit"],
    "AsyncConnectionPool.__aenter__: self.open": ["test_housekeeper_ends_with_the_pool"],
    "AsyncConnectionPool.__aexit__: self.close": ["aexit"],
    "AsyncConnectionPool.wait: ticket.wait": ["wait", "open-wait"],
    "AsyncConnectionPool.wait: self.close": ["wait", "open-wait"],
    "AsyncConnectionPool.wait: self.close#2": ["wait", "open-wait"],
    "AsyncConnectionPool.getconn: ticket.wait": [
        "queue",
        "queue-context",
        "null-queue",
        "test_cancel_after_the_grant",
        "test_pool_timeout_fires_as_the_grant_arrives",
        "test_close_after_the_grant",
    ],
    "AsyncConnectionPool.getconn: self._wait_ticket": [
        "test_pool_timeout_fires_as_the_grant_arrives",
        *[f"inline-{s}" for s in CONNECT_STEPS],
    ],
    "AsyncConnectionPool.getconn: self._getconn_slow": ["queue-check", "check"],
    "AsyncConnectionPool._getconn_slow: self._wait_slot": ["queue-check"],
    "AsyncConnectionPool._wait_slot: self._wait_ticket": ["queue-check"],
    "AsyncConnectionPool._getconn_slow: self._check_before_lending": ["check", "alive-check"],
    "AsyncConnectionPool._check_before_lending: check": [
        "check",
        "alive-check",
        "test_check_turning_cancellation_into_an_error",
    ],
    "AsyncConnectionPool._getconn_slow: asleep": ["check-sleep"],
    "AsyncConnectionPool._wait_ticket: self._not_queued": [f"inline-{s}" for s in CONNECT_STEPS],
    "AsyncConnectionPool._not_queued: self._connect_inline": [f"inline-{s}" for s in CONNECT_STEPS],
    "AsyncConnectionPool._wait_ticket: ticket.wait": ["queue-check"],
    "AsyncConnectionPool._connect_inline: attempt.run": [f"inline-{s}" for s in CONNECT_STEPS],
    "AsyncConnectionPool.putconn: self._putconn_slow": ["return-rollback", "reset"],
    "AsyncConnectionPool._putconn_slow: self._clean_job": [
        "return-rollback",
        "return-active-close",
        "return-rollback-failed-close",
    ],
    "AsyncConnectionPool._clean_job: connector.clean": ["return-rollback", "reset"],
    "AsyncConnectionPool.check: self.check_connection": ["pool-check-execute"],
    "AsyncConnectionPool.check_connection: connector.check_connection": ["pool-check-execute"],
    "AsyncConnectionPool.reconnect_failed: aresolve": ["reconnect-failed"],
    "AsyncConnectionPool._close_job: connector.close": ["close-job"],
    "AsyncConnectionPool._connect_job: attempt.run": [f"bg-{s}" for s in CONNECT_STEPS],
    "_AsyncConnectionContext.__aenter__: self._pool.getconn": ["queue-context"],
    "_AsyncConnectionContext.__aexit__: conn.__aexit__": ["exit-commit", "exit-rollback"],
    "close: conn.cancel_safe": ["return-active-cancel"],
    "_AsyncConnectionContext.__aexit__: pool._putconn_slow": [
        "exit-commit",
        "test_cancelled_twice_while_ending_the_transaction",
    ],
    "_housekeeper: wakeup.wait": ["test_housekeeper_ends_with_the_pool"],
    "AsyncConnectAttempt.run: aresolve": ["inline-conninfo", "bg-conninfo"],
    "AsyncConnectAttempt.run: aresolve#2": ["inline-kwargs", "bg-kwargs"],
    "AsyncConnectAttempt.run: pool.connection_class.connect": ["inline-connect", "bg-connect"],
    "AsyncConnectAttempt.run: configure": ["inline-configure", "bg-configure"],
    "AsyncConnectAttempt.run: close": ["inline-close", "bg-close"],
    "clean: close": ["return-active-close"],
    "clean: conn.rollback": ["return-rollback", "reset-rollback", "exit-rollback"],
    "clean: close#2": ["return-rollback-failed-close"],
    "clean: reset": ["reset"],
    "clean: close#3": ["reset-failed-close"],
    "check_connection: conn.execute": ["pool-check-execute"],
    "check_connection: conn.set_autocommit": ["pool-check-autocommit-on"],
    "check_connection: conn.execute#2": ["pool-check-execute"],
    "check_connection: conn.set_autocommit#2": ["pool-check-autocommit-off"],
    "close: conn.close": ["close-job", "return-active-close"],
}


SHELL = Path(psycopg_pool.__file__).parent
SHELL_SOURCES = ("pool_async.py", "null_pool_async.py", "_connector_async.py")


def await_points(source: str) -> list[str]:
    """'function: awaited callable' for each await in `source`; repeats get '#n'."""
    found: list[str] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, (ast.AsyncWith, ast.AsyncFor)):
                found.append(f"{'.'.join(scope)}: <{type(child).__name__}>")
            if isinstance(child, ast.Await):
                value = child.value
                what = ast.unparse(value.func if isinstance(value, ast.Call) else value)
                key = f"{'.'.join(scope)}: {what}"
                n = sum(1 for f in found if f == key or f.startswith(key + "#"))
                found.append(key if not n else f"{key}#{n + 1}")
            visit(child, scope)

    visit(ast.parse(source), [])
    return found


def test_await_points_are_covered() -> None:
    points = [p for src in SHELL_SOURCES for p in await_points((SHELL / src).read_text())]
    assert len(points) == len(set(points))
    missing = [p for p in points if p not in COVERED]
    assert not missing, f"await points with no interruption scenario: {missing}"
    stale = [p for p in COVERED if p not in points]
    assert not stale, f"COVERED lists await points that are gone: {stale}"
    tests = {name for name in globals() if name.startswith("test_")}
    unknown = [s for ss in COVERED.values() for s in ss if s not in SPOTS and s not in tests]
    assert not unknown, f"COVERED names unknown scenarios: {unknown}"


@pytest.mark.parametrize("how", ["cancel", "error"])
@run_async
async def test_null_pool_waiter_after_a_failed_inline_attempt(how: str) -> None:
    """max_size=1: A connects inline, B queues; A's attempt ends without a connection."""
    async with scenario(null=True, max_size=1) as ctx:
        gate = ctx.fakes.block("connect")
        first = ctx.client("first")
        await reached(gate.reached, "the inline attempt")
        second = ctx.client("second", timeout=1.0)
        await until(lambda: ctx.pool._core.n_waiting, "the second client to queue")
        if how == "cancel":
            first.cancel()
        else:
            gate.open(raising=OperationalError("connection refused"))
        assert await first.finished() in (CANCELLED, "OperationalError")
        TALLY["interruptions"] += 1
        assert await second.finished() == "conn", repr(second.error)


def count_deadlines(pool: Any) -> list[float]:
    """Record the deadlines the housekeeper computes (it alone calls next_deadline())."""
    core = pool._core
    seen: list[float] = []
    real = core.next_deadline

    def next_deadline() -> float:
        seen.append(real())
        return seen[-1]

    core.next_deadline = next_deadline
    return seen


@run_async
async def test_refill_after_a_discard_while_waiting_to_retry() -> None:
    """min_size=2, both lent; an attempt fails; then one comes back broken."""
    async with scenario(min_size=2, max_size=3) as ctx:
        core = ctx.pool._core
        core.backoff.initial_delay = 0.2
        deadlines = count_deadlines(ctx.pool)
        first, second = await ctx.take(), await ctx.take()
        gate = ctx.fakes.block("connect")
        waiter = ctx.client("waiter")  # the pool grows for it
        await reached(gate.reached, "the attempt")
        waiter.cancel()
        assert await waiter.finished() == CANCELLED
        n = len(deadlines)
        gate.open(raising=OperationalError("connection refused"))
        await until(lambda: len(deadlines) > n, "the housekeeper to look at the failure")
        break_conn(first)
        await ctx.give_back(first)  # discarded: the pool is below min_size
        TALLY["interruptions"] += 2
        await until(lambda: len(core.live) >= 2, "the pool to refill", 2.0, hang=False)
        await ctx.give_back(second)


@run_async
async def test_interrupted_close_of_a_returned_connection_still_replaces_it() -> None:
    """A connection comes back in a transaction; its rollback is interrupted, and so
    is the close that follows, in the caller: the replacement must still be opened."""
    async with scenario(min_size=1) as ctx:
        conn = await ctx.take()
        conn.pgconn.transaction_status = INTRANS
        ctx.fakes.fail("rollback", Interrupt())
        ctx.fakes.fail("close", Interrupt())
        with pytest.raises(Interrupt):
            await ctx.give_back(conn)
        TALLY["interruptions"] += 2
        assert conn.closed
        await until(lambda: ctx.pool.get_stats()["pool_available"] == 1, "the replacement")
