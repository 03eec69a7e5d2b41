"""ConnectionPool (threads) interrupted at every blocking point, with fake connections.

The same spots as `test_torture_async.py` (the threaded shell is generated from
the async one, so its blocking points are the same lines), hit by what can
interrupt a thread:

    pool_timeout  the pool's own `timeout` of a waiting client expires
    wait_timeout  the timeout of `wait()` / `close()` expires
    error         the blocked call raises an Exception
    broken        the check finds the connection broken
    interrupt     the blocked call raises a BaseException, like KeyboardInterrupt
                  (in the client's thread, or in a worker's)
    close         pool.close() meanwhile (waiting for the workers)
    close_cancel  pool.close(timeout=0.01), which stops waiting for them

A waiting client is interrupted in `Waiter.wait()`, made a point the fakes can
block at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from psycopg import OperationalError

import psycopg_pool
from psycopg_pool._acompat import Waiter
from psycopg_pool._core import state as st

from .fakes import ACTIVE, INTRANS, Gate, Interrupt, break_conn
from .harness import (
    BACKGROUND,
    BG_CONNECT,
    BG_RETURN,
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
    WAIT,
    Spot,
    Spots,
    victim_timeout,
)
from .sharness import Actor, TCtx, reached, scenario, until
from .test_torture_async import count_deadlines

SPOTS = Spots()
spot = SPOTS
INTERRUPTIONS = {
    "pool_timeout",
    "wait_timeout",
    "error",
    "broken",
    "interrupt",
    "close",
    "close_cancel",
}

Reached = tuple[Actor | None, Gate | None]


def in_worker(expect: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Background work runs in worker threads: a BaseException raised there is the
    subject of `test_worker_survives_a_base_exception`, not of the table."""
    return {k: v for k, v in expect.items() if k != "interrupt"}


@pytest.fixture(autouse=True)
def blocking_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the retry sleep and a client's wait points the fakes can block at."""
    fakes_of: dict[str, Any] = {}
    real_wait = Waiter.wait

    def waiting(self: Waiter, *args: Any) -> bool:
        if "fakes" in fakes_of:
            fakes_of["fakes"].hit("wait", self)
        return real_wait(self, *args)

    def sleeping(delay: float) -> None:
        fakes_of["fakes"].hit("sleep")

    monkeypatch.setattr(Waiter, "wait", waiting)
    monkeypatch.setattr(psycopg_pool.pool, "sleep", sleeping)
    BLOCKING.append(fakes_of)
    yield
    BLOCKING.remove(fakes_of)


BLOCKING: list[dict[str, Any]] = []


def wait_gate(ctx: TCtx, how: str) -> Gate | None:
    return ctx.fakes.block("wait") if how == "interrupt" else None


# ----------------------------------------------------------------------
# Spots


def _queued(ctx: TCtx, how: str, **kwargs: Any) -> Reached:
    ctx.holder()
    gate = wait_gate(ctx, how)
    victim = ctx.client("victim", timeout=victim_timeout(how), **kwargs)
    until(lambda: ctx.pool._core.n_waiting or victim.done.is_set(), "the victim to queue")
    return victim, gate


@spot("queue", QUEUE, max_size=1)
def reach_queue(ctx: TCtx, how: str) -> Reached:
    return _queued(ctx, how)


@spot("queue-context", QUEUE, max_size=1)
def reach_queue_context(ctx: TCtx, how: str) -> Reached:
    return _queued(ctx, how, context=True)


@spot("queue-check", QUEUE, max_size=1, callbacks=("check",))
def reach_queue_check(ctx: TCtx, how: str) -> Reached:
    return _queued(ctx, how)


@spot("null-queue", QUEUE, null=True)
def reach_null_queue(ctx: TCtx, how: str) -> Reached:
    return _queued(ctx, how)


@spot(
    "check",
    LEND_CHECK,
    max_size=1,
    callbacks=("check",),
)
def reach_check(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("check")
    return ctx.client("victim", timeout=victim_timeout(how)), gate


@spot(
    "alive-check",
    LEND_CHECK,
    max_size=1,
    alive_check_after=0.0,
)
def reach_alive_check(ctx: TCtx, how: str) -> Reached:
    ctx.pool._core.idle[0].conn.pgconn.server_says()
    gate = ctx.fakes.block("execute")
    return ctx.client("victim", timeout=victim_timeout(how)), gate


@spot(
    "check-sleep",
    {"interrupt": ("Interrupt",), "close": (CLOSED,)},
    max_size=1,
    callbacks=("check",),
)
def reach_check_sleep(ctx: TCtx, how: str) -> Reached:
    ctx.fakes.fail("check", OperationalError("check failed"), times=2)
    gate = ctx.fakes.block("sleep")
    return ctx.client("victim"), gate


def _connect_step(ctx: TCtx, step: str) -> Gate:
    if step == "close":
        ctx.fakes.fail("configure", OperationalError("configure failed"))
    return ctx.fakes.block(step)


def _connect_spots() -> None:
    for step in CONNECT_STEPS:
        failed = "OperationalError"

        def reach_inline(ctx: TCtx, how: str, step: str = step) -> Reached:
            gate = _connect_step(ctx, step)
            return ctx.client("victim"), gate

        spot(
            f"inline-{step}",
            {
                "error": (failed,),
                "interrupt": ("Interrupt",),
                "close": (failed,) if step == "close" else (CLOSED,),
            },
            null=True,
            callbacks=CONNECT_CALLBACKS,
        )(reach_inline)

        def reach_bg(ctx: TCtx, how: str, step: str = step) -> Reached:
            ctx.holder()
            gate = _connect_step(ctx, step)
            return ctx.client("victim", timeout=victim_timeout(how)), gate

        spot(f"bg-{step}", in_worker(BG_CONNECT), max_size=2, callbacks=CONNECT_CALLBACKS)(reach_bg)


_connect_spots()


@spot("return-rollback", RETURN, max_size=1)
def reach_return_rollback(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("rollback")
    return ctx.client("victim", tx=INTRANS), gate


@spot("return-active-close", RETURN, max_size=1)
def reach_return_active(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("close")
    return ctx.client("victim", tx=ACTIVE), gate


@spot("return-active-cancel", RETURN, max_size=1)
def reach_return_active_cancel(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("cancel")  # the query a closing connection still runs
    return ctx.client("victim", tx=ACTIVE), gate


@spot("return-rollback-failed-close", RETURN, max_size=1)
def reach_return_rollback_failed(ctx: TCtx, how: str) -> Reached:
    ctx.fakes.fail("rollback", OperationalError("rollback failed"))
    gate = ctx.fakes.block("close")
    return ctx.client("victim", tx=INTRANS), gate


def _waiter_behind(ctx: TCtx, how: str, gate: Gate, start: Callable[[], Any]) -> Reached:
    start()
    reached(gate.reached, f"the {gate.point}")
    waiting = wait_gate(ctx, how)
    return ctx.client("victim", timeout=victim_timeout(how)), waiting or gate


@spot("return-rollback-waiter", QUEUE, max_size=1)
def reach_return_waiter(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("rollback")
    return _waiter_behind(ctx, how, gate, lambda: ctx.client("returner", tx=INTRANS))


def _bg_return(ctx: TCtx, how: str, point: str, tx: Any = None) -> Reached:
    if point == "close":
        ctx.fakes.fail("reset", OperationalError("reset failed"))
    gate = ctx.fakes.block(point)
    return _waiter_behind(ctx, how, gate, lambda: ctx.client("returner", tx=tx))


@spot("reset", in_worker(BG_RETURN), max_size=1, callbacks=("reset",))
def reach_reset(ctx: TCtx, how: str) -> Reached:
    return _bg_return(ctx, how, "reset")


@spot("reset-rollback", in_worker(BG_RETURN), max_size=1, callbacks=("reset",))
def reach_reset_rollback(ctx: TCtx, how: str) -> Reached:
    return _bg_return(ctx, how, "rollback", INTRANS)


@spot("reset-failed-close", in_worker(BG_RETURN), max_size=1, callbacks=("reset",))
def reach_reset_failed(ctx: TCtx, how: str) -> Reached:
    return _bg_return(ctx, how, "close")


@spot("exit-commit", {**RETURN, "error": ("OperationalError",)}, max_size=1)
def reach_exit_commit(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("commit")
    return ctx.client("victim", context=True, tx=INTRANS), gate


@spot("exit-rollback", {**RETURN, "error": ("ValueError",), "close": ("ValueError",)}, max_size=1)
def reach_exit_rollback(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("rollback")
    victim = ctx.client("victim", context=True, tx=INTRANS, raise_in_block=ValueError("oops"))
    return victim, gate


@spot("pool-check-execute", CHECK, min_size=2)
def reach_pool_check_execute(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("execute")
    return ctx.op("checker", ctx.pool.check), gate


@spot("pool-check-autocommit-on", CHECK, min_size=2)
def reach_pool_check_on(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("set_autocommit")
    return ctx.op("checker", ctx.pool.check), gate


@spot("pool-check-autocommit-off", CHECK, min_size=2)
def reach_pool_check_off(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("set_autocommit", skip=1)
    return ctx.op("checker", ctx.pool.check), gate


@spot("pool-check-waiter", QUEUE, min_size=1)
def reach_pool_check_waiter(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("execute")
    return _waiter_behind(ctx, how, gate, lambda: ctx.op("checker", ctx.pool.check))


def _waiting(ctx: TCtx, how: str, fn: Callable[[float], Any]) -> Reached:
    connecting = ctx.fakes.gates[0]
    gate = wait_gate(ctx, how)
    timeout = SHORT if how == "wait_timeout" else 5.0
    victim = ctx.op("waiter", lambda: fn(timeout))
    until(lambda: ctx.pool._core.ready_waiters or victim.done.is_set(), "wait() to wait")
    return victim, gate or connecting


@spot("wait", WAIT, min_size=2, open_wait=False)
def reach_wait(ctx: TCtx, how: str) -> Reached:
    ctx.fakes.block("connect")
    ctx.pool.open()
    return _waiting(ctx, how, ctx.pool.wait)


@spot("open-wait", WAIT, min_size=2, open_wait=False)
def reach_open_wait(ctx: TCtx, how: str) -> Reached:
    ctx.fakes.block("connect")
    return _waiting(ctx, how, lambda t: ctx.pool.open(wait=True, timeout=t))


@spot("close", {"wait_timeout": ("ok",)}, max_size=2)
def reach_close(ctx: TCtx, how: str) -> Reached:
    ctx.holder()
    gate = ctx.fakes.block("connect")
    ctx.client("waiter")
    reached(gate.reached, "the connection attempt")
    victim = ctx.op("closer", lambda: ctx.pool.close(0.01))
    ctx.is_closed()
    return victim, gate


@spot(
    "reconnect-failed",
    in_worker(BACKGROUND),
    open_wait=False,
    reconnect_timeout=0.0,
    callbacks=("reconnect_failed",),
)
def reach_reconnect_failed(ctx: TCtx, how: str) -> Reached:
    ctx.fakes.fail("connect", OperationalError("server down"))
    gate = ctx.fakes.block("reconnect_failed")
    ctx.pool.open()
    return None, gate


@spot("close-job", in_worker(BACKGROUND))
def reach_close_job(ctx: TCtx, how: str) -> Reached:
    gate = ctx.fakes.block("close")
    ctx.pool.drain()
    return None, gate


# ----------------------------------------------------------------------
# Running the table


def interrupt(ctx: TCtx, how: str, victim: Actor | None, gate: Gate | None) -> None:
    TALLY["interruptions"] += 1
    if how == "pool_timeout" or (how == "wait_timeout" and victim and victim.name == "closer"):
        assert victim is not None
        victim.finished()
    elif how == "wait_timeout":
        assert victim is not None
        until(lambda: victim.done.is_set() or ctx.pool.closed, "wait() to time out")
    else:
        if gate is not None:
            reached(gate.reached, f"{gate.point} to block")
        if how in ("error", "broken", "interrupt"):
            assert gate is not None
            if how == "broken":
                break_conn(gate.conn)
            exc = Interrupt() if how == "interrupt" else OperationalError(f"{gate.point} failed")
            gate.open(raising=exc)
        elif how in ("close", "close_cancel"):
            closer = ctx.closer(0.01 if how == "close_cancel" else 5.0)
            ctx.is_closed()
            if how == "close_cancel":
                closer.finished()
        else:
            raise AssertionError(f"unknown interruption {how}")
    if gate is not None:
        gate.open(gate.raising)


@pytest.mark.parametrize(("spot", "how"), SPOTS.scenarios(INTERRUPTIONS))
def test_interrupted(spot: Spot, how: str) -> None:
    with scenario(**spot.pool) as ctx:
        BLOCKING[-1]["fakes"] = ctx.fakes
        victim, gate = spot.reach(ctx, how)
        interrupt(ctx, how, victim, gate)
        ctx.finish()
        if victim is not None:
            assert victim.result in spot.expect[how], f"victim: {victim.error!r}"


# ----------------------------------------------------------------------
# Races around the hand-off


def _granted_while_blocked(ctx: TCtx) -> tuple[Actor, Gate]:
    """A victim about to wait, granted the connection the test held."""
    held = ctx.take()
    gate = ctx.fakes.block("wait")
    victim = ctx.client("victim")
    reached(gate.reached, "the victim to wait")
    ctx.give_back(held)
    until(lambda: not ctx.pool._core.n_waiting, "the grant")
    return victim, gate


def test_interrupted_as_the_grant_arrives() -> None:
    """KeyboardInterrupt in the waiting thread just as it is handed a connection."""
    with scenario(max_size=1) as ctx:
        BLOCKING[-1]["fakes"] = ctx.fakes
        victim, gate = _granted_while_blocked(ctx)
        gate.open(raising=Interrupt())
        assert victim.finished() == "Interrupt"
        assert ctx.pool._core.counts()[st.IDLE] == 1
        TALLY["interruptions"] += 1


def test_timed_out_as_the_grant_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait times out at the moment the connection is handed over: passed on."""
    with scenario(max_size=1) as ctx:
        fakes = BLOCKING[-1]["fakes"] = ctx.fakes

        def timing_out(self: Waiter, *args: Any) -> bool:
            fakes.hit("wait", self)
            return False

        waiting = Waiter.wait
        monkeypatch.setattr(Waiter, "wait", timing_out)
        victim, gate = _granted_while_blocked(ctx)
        gate.open()
        assert victim.finished() == POOL_TIMEOUT
        monkeypatch.setattr(Waiter, "wait", waiting)
        assert ctx.pool._core.counts()[st.IDLE] == 1
        TALLY["interruptions"] += 1


def test_close_as_the_grant_arrives() -> None:
    """The grant is the hand-over: a client granted a connection before close() keeps
    it (as upstream does), and the connection is closed when it comes back."""
    with scenario(max_size=1) as ctx:
        BLOCKING[-1]["fakes"] = ctx.fakes
        victim, gate = _granted_while_blocked(ctx)
        ctx.pool.close()
        gate.open()
        assert victim.finished() == "conn"
        until(lambda: not ctx.fakes.open_conns(), "the connection closed on return")
        TALLY["interruptions"] += 1


def test_close_while_clients_wait_connect_check_and_return() -> None:
    """pool.close() with a client at each stage at once: no hang, every waiter PoolClosed."""
    with scenario(max_size=3, callbacks=("check", "reset")) as ctx:
        fakes = ctx.fakes
        holder = ctx.holder()
        checking = fakes.block("check")
        checked = ctx.client("checked")
        reached(checking.reached, "the check")
        connecting = fakes.block("connect")
        connector = ctx.client("connector")
        reached(connecting.reached, "the connection attempt")
        waiters = [ctx.client(f"waiter-{i}") for i in range(3)]
        until(lambda: ctx.pool._core.n_waiting >= 3, "the waiters to queue")
        resetting = fakes.block("reset")
        holder.go.set()
        reached(resetting.reached, "the reset")
        ctx.closer(5.0)
        ctx.is_closed()
        for w in [connector, *waiters]:
            assert w.finished() == CLOSED
        fakes.clear()
        assert checked.finished() == "conn"
        TALLY["interruptions"] += 1


# ----------------------------------------------------------------------
# A BaseException in a worker thread


WORKER_POINTS = {
    "connect": {},
    "configure": {"callbacks": ("configure",)},
    "reset": {"callbacks": ("reset",)},
    "reconnect_failed": {"callbacks": ("reconnect_failed",), "reconnect_timeout": 0.0},
}


@pytest.mark.parametrize("point", list(WORKER_POINTS))
def test_worker_survives_a_base_exception(point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SystemExit or a KeyboardInterrupt-like exception in a callback run by a worker.

    With one worker, the pool must still be able to open the next connection.
    """
    died: list[str] = []
    monkeypatch.setattr("threading.excepthook", lambda args: died.append(str(args.thread)))
    with scenario(max_size=2, num_workers=1, **WORKER_POINTS[point]) as ctx:
        fakes = BLOCKING[-1]["fakes"] = ctx.fakes
        if point == "reconnect_failed":
            fakes.fail("connect", OperationalError("server down"))
        fakes.fail(point, Interrupt())
        holder = ctx.holder()
        if point == "reset":  # the reset runs in the worker once the holder returns
            holder.go.set()
            holder.finished()
        second = ctx.client("second", timeout=1.0)  # needs a new connection
        assert second.finished() == "conn", f"{second.error!r}; dead threads: {died}"
        TALLY["interruptions"] += 1


@pytest.mark.parametrize("how", ["interrupt", "error"])
def test_null_pool_waiter_after_a_failed_inline_attempt(how: str) -> None:
    """max_size=1: A connects inline, B queues; A's attempt ends without a connection."""
    with scenario(null=True, max_size=1) as ctx:
        gate = ctx.fakes.block("connect")
        first = ctx.client("first")
        reached(gate.reached, "the inline attempt")
        second = ctx.client("second", timeout=1.0)
        until(lambda: ctx.pool._core.n_waiting, "the second client to queue")
        exc = Interrupt() if how == "interrupt" else OperationalError("connection refused")
        gate.open(raising=exc)
        assert first.finished() in ("Interrupt", "OperationalError")
        TALLY["interruptions"] += 1
        assert second.finished() == "conn", repr(second.error)


def test_refill_after_a_discard_while_waiting_to_retry() -> None:
    """min_size=2, both lent; an attempt fails; then one comes back broken."""
    with scenario(min_size=2, max_size=3) as ctx:
        core = ctx.pool._core
        core.backoff.initial_delay = 0.2
        deadlines = count_deadlines(ctx.pool)
        first, second = ctx.take(), ctx.take()
        gate = ctx.fakes.block("connect")
        waiter = ctx.client("waiter", timeout=SHORT)  # the pool grows for it
        reached(gate.reached, "the attempt")
        assert waiter.finished() == POOL_TIMEOUT
        n = len(deadlines)
        gate.open(raising=OperationalError("connection refused"))
        until(lambda: len(deadlines) > n, "the housekeeper to look at the failure")
        break_conn(first)
        ctx.give_back(first)
        TALLY["interruptions"] += 2
        until(lambda: len(core.live) >= 2, "the pool to refill", 2.0, hang=False)
        ctx.give_back(second)


def test_broken_return_while_others_take_idle_connections() -> None:
    """A broken connection comes back; the pool polls the idle ones (are they dead
    too?) while other clients take them: those must be left alone, and putconn()
    must not fail."""
    with scenario(min_size=3) as ctx:
        BLOCKING[-1]["fakes"] = ctx.fakes
        returner = ctx.holder("returner")
        polling = ctx.fakes.block("socket")  # the poll of the first idle connection
        broken = returner.conn
        break_conn(broken)
        returner.go.set()
        reached(polling.reached, "the poll of the idle connections")
        taken = [ctx.holder(f"taker-{i}") for i in range(2)]  # both idle ones
        polling.open()
        assert returner.finished() == "conn", repr(returner.error)
        for t in taken:
            t.go.set()
        TALLY["interruptions"] += 1


def test_interrupted_close_of_a_returned_connection_still_replaces_it() -> None:
    """A connection comes back in a transaction; its rollback is interrupted, and so
    is the close that follows, in the caller: the replacement must still be opened."""
    with scenario(min_size=1) as ctx:
        conn = ctx.take()
        conn.pgconn.transaction_status = INTRANS
        ctx.fakes.fail("rollback", Interrupt())
        ctx.fakes.fail("close", Interrupt())
        with pytest.raises(Interrupt):
            ctx.give_back(conn)
        TALLY["interruptions"] += 2
        assert conn.closed
        until(lambda: ctx.pool.get_stats()["pool_available"] == 1, "the replacement")
