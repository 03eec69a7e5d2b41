"""The async side of the torture tests: a pool of fakes, clients as tasks, the checks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from .fakes import Fakes
from .harness import PATIENCE, TALLY, ActorBase, ClientBase, CtxBase, pool_for

HAS_TIMEOUT = sys.version_info >= (3, 11)


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an `async def` test in its own loop; a hang fails it instead of blocking."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def guarded() -> None:
            try:
                await asyncio.wait_for(fn(*args, **kwargs), 3 * PATIENCE)
            except asyncio.TimeoutError:
                TALLY["hangs"] += 1
                raise

        asyncio.run(guarded())

    return wrapper


async def until(
    pred: Callable[[], object], what: str, timeout: float = PATIENCE, *, hang: bool = True
) -> None:
    """Poll `pred` until true; fail after `timeout` (counted as a hang if `hang`)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            TALLY["hangs"] += hang
            pytest.fail(f"HANG: timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)


async def reached(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), PATIENCE)
    except asyncio.TimeoutError:
        TALLY["hangs"] += 1
        pytest.fail(f"HANG: {what} never happened")


class Actor(ActorBase):
    """A task of the test (a client, a `pool.check()`, a `pool.close()`...).

    It runs inside `asyncio.timeout(None)` so that the test can make that deadline
    expire at the moment it chooses (`expire()`).
    """

    def __init__(self, ctx: ACtx, name: str) -> None:
        super().__init__(ctx, name)
        self.cm: Any = None
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._main(), name=self.name)
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and self.error is None:  # cancelled before it started
            self.error = asyncio.CancelledError()
        self.done.set()

    async def _main(self) -> None:
        try:
            if HAS_TIMEOUT:
                async with asyncio.timeout(None) as self.cm:
                    await self.body()
            else:
                await self.body()
        except BaseException as ex:
            self.error = ex
        finally:
            self.done.set()

    async def body(self) -> None:
        raise NotImplementedError

    def cancel(self, again: bool = False) -> None:
        """Cancel the task; `again`: at each step it takes until it ends, as anyio's
        cancel scopes do (every wait of its clean-up is cancelled too)."""
        task = self.task
        assert task is not None
        task.cancel()
        if again:
            loop = asyncio.get_running_loop()

            def cancel_again() -> None:
                if not task.done():
                    task.cancel()
                    loop.call_soon(cancel_again)

            loop.call_soon(cancel_again)

    def expire(self) -> None:
        """Make the actor's `asyncio.timeout` expire now (if it is running)."""
        if self.cm is not None and not self.done.is_set() and not self.cm.expired():
            self.cm.reschedule(asyncio.get_running_loop().time())

    async def finished(self) -> str:
        try:
            await asyncio.wait_for(self.done.wait(), PATIENCE)
        except asyncio.TimeoutError:
            TALLY["hangs"] += 1
            pytest.fail(f"HANG: {self.name} never ended, awaiting:\n{self.awaiting()}")
        return self.result

    def awaiting(self) -> str:
        """Where the task is suspended: its chain of awaited coroutines."""
        lines = []
        coro: Any = self.task.get_coro() if self.task is not None else None
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                code = frame.f_code
                lines.append(f"  {code.co_filename}:{frame.f_lineno} {code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        return "\n".join(lines)


class Op(Actor):
    """An actor running one pool method."""

    def __init__(self, ctx: ACtx, name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(ctx, name)
        self.fn = fn

    async def body(self) -> None:
        await self.fn()


class Client(ClientBase, Actor):
    event = asyncio.Event

    async def body(self) -> None:
        pool = self.ctx.pool
        if self.context:
            async with pool.connection(self.timeout) as conn:
                await self._hold(conn)
        else:
            conn = await pool.getconn(self.timeout)
            try:
                await self._hold(conn)
            finally:
                try:
                    if self.close_instead:  # close_returns gives it back, else it is closed
                        await conn.close()
                finally:
                    if not (self.close_instead and pool.close_returns):
                        await pool.putconn(conn)

    async def _hold(self, conn: Any) -> None:
        self._got(conn)
        try:
            await self.go.wait()
            self._used()
        finally:
            self.ctx.ledger.returning(conn)


class ACtx(CtxBase):
    client_class = Client
    op_class = Op

    async def holder(self, name: str = "holder") -> Client:
        c: Client = self.client(name, hold=True)
        await reached(c.got, f"{name} to get a connection")
        return c

    async def take(self) -> Any:
        """getconn() by the test itself."""
        conn = await self.pool.getconn()
        self.ledger.got("the test", conn)
        return conn

    async def give_back(self, conn: Any) -> None:
        self.ledger.returning(conn)
        await self.pool.putconn(conn)

    async def is_closed(self) -> None:
        await until(self.shut, "the pool to be closed")

    async def finish(self) -> None:
        """Open every gate, let every actor end, check the books once settled."""
        self.let_go()
        for a in self.actors:
            await a.finished()
        self.count_handouts()
        last: list[str] = []

        def ok() -> bool:
            bg = self.pool._bg
            if bg is not None and any(not t.done() for t in bg.tasks):
                return False
            return self.balanced(last)

        deadline = time.monotonic() + PATIENCE
        while not ok():
            if time.monotonic() > deadline:
                self.unbalanced(last)
            await asyncio.sleep(0.001)

    async def serves_at_once(self) -> None:
        """An open pool with idle connections hands one out without queueing."""
        if self.pool.closed:
            return
        queued = self.queued_count()
        conn = await asyncio.wait_for(self.pool.getconn(PATIENCE), PATIENCE)
        self.served_at_once(queued, conn)
        await self.pool.putconn(conn)

    async def close_and_count(self) -> None:
        """Close the pool: every connection ever opened ends up closed."""
        await asyncio.wait_for(self.pool.close(), 2 * PATIENCE)
        await until(self.all_closed, "every connection to be closed")
        self.counted()
        # A closed pool can be opened again, and works as new.
        await self.pool.open(wait=not self.pool._null, timeout=PATIENCE)
        await self.serves_at_once()
        await asyncio.wait_for(self.pool.close(), 2 * PATIENCE)
        await until(self.all_closed, "every connection to be closed again")
        self.counted()


@contextlib.asynccontextmanager
async def scenario(*, open_wait: bool = True, **kwargs: Any) -> AsyncIterator[ACtx]:
    """A context for one scenario: checks the books at the end, then closes the pool."""
    fakes = Fakes(asynchronous=True)
    pool = pool_for(fakes, **kwargs)
    if open_wait:
        await pool.open(wait=not pool._null, timeout=PATIENCE)
    ctx = ACtx(pool, fakes)
    try:
        yield ctx
        await ctx.finish()
        await ctx.serves_at_once()
        await ctx.close_and_count()
    finally:
        fakes.clear()
        if not pool.closed:
            await pool.close(0.1)
    TALLY["scenarios"] += 1
