"""The threaded side of the torture tests: a pool of fakes, clients as threads, the checks."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .fakes import Fakes
from .harness import PATIENCE, TALLY, ActorBase, ClientBase, CtxBase, pool_for


def until(
    pred: Callable[[], object], what: str, timeout: float = PATIENCE, *, hang: bool = True
) -> None:
    """Poll `pred` until true; fail after `timeout` (counted as a hang if `hang`)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            TALLY["hangs"] += hang
            pytest.fail(f"HANG: timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


def reached(event: threading.Event, what: str) -> None:
    if not event.wait(PATIENCE):
        TALLY["hangs"] += 1
        pytest.fail(f"HANG: {what} never happened")


class Actor(ActorBase):
    """A thread of the test."""

    def __init__(self, ctx: TCtx, name: str) -> None:
        super().__init__(ctx, name)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            self.body()
        except BaseException as ex:
            self.error = ex
        finally:
            self.done.set()

    def body(self) -> None:
        raise NotImplementedError

    def finished(self) -> str:
        reached(self.done, f"the end of {self.name}")
        self.thread.join()
        return self.result


class Op(Actor):
    def __init__(self, ctx: TCtx, name: str, fn: Callable[[], Any]) -> None:
        super().__init__(ctx, name)
        self.fn = fn

    def body(self) -> None:
        self.fn()


class Client(ClientBase, Actor):
    event = threading.Event

    def body(self) -> None:
        pool = self.ctx.pool
        if self.context:
            with pool.connection(self.timeout) as conn:
                self._hold(conn)
        else:
            conn = pool.getconn(self.timeout)
            try:
                self._hold(conn)
            finally:
                try:
                    if self.close_instead:  # close_returns gives it back, else it is closed
                        conn.close()
                finally:
                    if not (self.close_instead and pool.close_returns):
                        pool.putconn(conn)

    def _hold(self, conn: Any) -> None:
        self._got(conn)
        try:
            reached(self.go, f"{self.name} to be told to go on")
            self._used()
        finally:
            self.ctx.ledger.returning(conn)


class TCtx(CtxBase):
    client_class = Client
    op_class = Op

    def holder(self, name: str = "holder") -> Client:
        c: Client = self.client(name, hold=True)
        reached(c.got, f"{name} to get a connection")
        return c

    def take(self) -> Any:
        conn = self.pool.getconn()
        self.ledger.got("the test", conn)
        return conn

    def give_back(self, conn: Any) -> None:
        self.ledger.returning(conn)
        self.pool.putconn(conn)

    def is_closed(self) -> None:
        until(self.shut, "the pool to be closed")

    def finish(self) -> None:
        self.let_go()
        for a in self.actors:
            a.finished()
        self.count_handouts()
        last: list[str] = []
        deadline = time.monotonic() + PATIENCE
        while not self.balanced(last):
            if time.monotonic() > deadline:
                self.unbalanced(last)
            time.sleep(0.001)

    def serves_at_once(self) -> None:
        if self.pool.closed:
            return
        queued = self.queued_count()
        conn = self.pool.getconn(PATIENCE)
        self.served_at_once(queued, conn)
        self.pool.putconn(conn)

    def close_and_count(self) -> None:
        self.pool.close()
        until(self.all_closed, "every connection to be closed")
        self.counted()
        # A closed pool can be opened again, and works as new.
        self.pool.open(wait=not self.pool._null, timeout=PATIENCE)
        self.serves_at_once()
        self.pool.close()
        until(self.all_closed, "every connection to be closed again")
        self.counted()


@contextlib.contextmanager
def scenario(*, open_wait: bool = True, **kwargs: Any) -> Iterator[TCtx]:
    fakes = Fakes(asynchronous=False)
    pool = pool_for(fakes, **kwargs)
    if open_wait:
        pool.open(wait=not pool._null, timeout=PATIENCE)
    ctx = TCtx(pool, fakes)
    try:
        yield ctx
        ctx.finish()
        ctx.serves_at_once()
        ctx.close_and_count()
    finally:
        fakes.clear()
        if not pool.closed:
            pool.close(0.1)
    TALLY["scenarios"] += 1
