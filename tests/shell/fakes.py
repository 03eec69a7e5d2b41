"""Fake psycopg connections that the shell tests can stop or break at named points.

`FakeConnection` and `FakeAsyncConnection` subclass the real psycopg classes (so
the pool's `connection_class` check accepts them) but never open a socket: their
`pgconn` is a `FakePGconn` whose status and transaction status the tests set.
Everything the pool touches is overridden: the `connect()` classmethod, `close()`,
`rollback()`, `commit()`, `execute()`, `set_autocommit()`; `closed`, `autocommit`,
`__exit__`/`__aexit__` are psycopg's own, running on top of them.

A `Fakes` object, passed to the pool in `kwargs={"fakes": fakes}`, scripts them
and keeps the tally. Each overridden method, and each user callback the tests
write (`configure`, `check`, `reset`, `reconnect_failed`, a callable conninfo or
kwargs, the pool's retry sleep), passes through a named *point*
(`fakes.hit(point)` / `await fakes.ahit(point)`). A test can plan, for the next
calls reaching a point:

- `fakes.block(point)`: stop there until the returned `Gate` is opened. The gate
  says when a caller has arrived (`gate.reached`); `gate.open(raising=exc)` lets it
  go on, or raise `exc` there.
- `fakes.fail(point, exc)`: raise `exc` there at once.
- `fakes.then(point, fn)`: call `fn(conn)` there (e.g. break the connection).

The tally: every connection a fake `connect()` returned is in `fakes.conns`;
`closed` is true once `close()` really closed it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from psycopg import AsyncConnection, Connection, OperationalError, ProgrammingError
from psycopg.pq import ConnStatus, TransactionStatus

IDLE = TransactionStatus.IDLE
INTRANS = TransactionStatus.INTRANS
ACTIVE = TransactionStatus.ACTIVE
INERROR = TransactionStatus.INERROR
UNKNOWN = TransactionStatus.UNKNOWN

# Every point a fake or a test callback can stop at.
POINTS = frozenset(
    {
        "conninfo",  # a callable conninfo, called before each attempt
        "kwargs",  # a callable kwargs, called before each attempt
        "connect",  # FakeConnection.connect(): before the connection exists
        "configure",  # the pool's configure callback
        "check",  # the pool's check callback (getconn)
        "reset",  # the pool's reset callback
        "rollback",
        "commit",
        "execute",  # conn.execute(): what check_connection() runs
        "set_autocommit",
        "cancel",  # conn.cancel_safe(): a query still running as the connection closes
        "close",  # conn.close(): after the connection is closed (a slow teardown)
        "reconnect_failed",  # the pool's reconnect_failed callback
        "sleep",  # the pool's retry sleep after failed checks (monkeypatched)
        "wait",  # a waiting ticket (monkeypatched Waiter.wait, sync only)
        "socket",  # pgconn.socket, read to poll an idle connection (sync only)
    }
)


class Interrupt(BaseException):
    """Like KeyboardInterrupt, but only where a test raises it (a thread, a callback)."""


class FakePGconn:
    """The part of `psycopg.pq.PGconn` that psycopg's connection and the pool read.

    `socket` is a real file descriptor (one end of a socket pair, made when first
    asked for) on which nothing arrives unless the test calls `server_says()`.
    """

    def __init__(self) -> None:
        self.status = ConnStatus.OK
        self.transaction_status = IDLE
        self.notice_handler: Any = None
        self.notify_handler: Any = None
        self.owner: Any = None  # the fake connection
        self._lock = threading.Lock()
        self._pair: tuple[socket.socket, socket.socket] | None = None

    @property
    def socket(self) -> int:
        owner = self.owner
        if owner is not None and not owner.fakes.asynchronous:
            owner.fakes.hit("socket", owner)
        with self._lock:
            if self.status == ConnStatus.BAD:
                raise OperationalError("the connection is lost")
            if self._pair is None:
                self._pair = socket.socketpair()
            return self._pair[0].fileno()

    def consume_input(self) -> None:
        pass

    def is_busy(self) -> bool:
        return self.transaction_status == ACTIVE  # a fake query never ends

    def fd(self) -> int | None:
        """The socket, made if needed (without passing through the "socket" point)."""
        with self._lock:
            if self.status == ConnStatus.BAD:
                return None
            if self._pair is None:
                self._pair = socket.socketpair()
            return self._pair[0].fileno()

    def was_cut(self) -> bool:
        """Was the socket shut down under us (the pool's watchdog cutting a check)?

        Then nothing can be sent any more, as a query on a real connection.
        """
        with self._lock:
            if self._pair is None:
                return False
            try:
                self._pair[0].send(b"")
            except BlockingIOError:
                return False
            except OSError:
                return True
            return False

    def server_says(self, data: bytes = b"E") -> None:
        """Something arrives on the idle connection (the server saying goodbye)."""
        self.socket  # noqa: B018 (makes the pair)
        assert self._pair is not None
        self._pair[1].send(data)

    def finish(self) -> None:
        with self._lock:
            self.status = ConnStatus.BAD
            self.transaction_status = UNKNOWN
            if self._pair is not None:
                for s in self._pair:
                    s.close()
                self._pair = None


class Gate:
    """Where a blocked caller waits. Sync gates use threading events, async ones asyncio's."""

    def __init__(self, point: str, asynchronous: bool) -> None:
        self.point = point
        self.asynchronous = asynchronous
        self.reached: Any = asyncio.Event() if asynchronous else threading.Event()
        self.opened: Any = asyncio.Event() if asynchronous else threading.Event()
        self.raising: BaseException | None = None
        self.conn: Any = None  # the connection the blocked call is about, if any

    def open(self, raising: BaseException | None = None) -> None:
        self.raising = raising
        self.opened.set()

    def __repr__(self) -> str:
        return f"<Gate {self.point} reached={self.reached.is_set()}>"


class _Plan:
    __slots__ = ("action", "times")

    def __init__(self, action: Any, times: int | None) -> None:
        self.action = action
        self.times = times  # None: every call


class Fakes:
    """Script and tally of the fake connections of one test."""

    def __init__(self, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self.lock = threading.Lock()
        self.plans: dict[str, deque[_Plan]] = {}
        self.gates: list[Gate] = []
        self.conns: list[Any] = []
        self.hits: dict[str, int] = dict.fromkeys(POINTS, 0)
        self.connect_calls = 0
        self.connect_errors = 0
        self.serial = itertools.count(1)
        self.rng: random.Random | None = None
        self.chaos_odds = (0.0, 0.0)
        self.may_interrupt: Callable[[], bool] = lambda: True
        self.injected = 0

    # -- planning

    def _plan(self, point: str, action: Any, times: int | None, skip: int) -> None:
        assert point in POINTS, point
        with self.lock:
            q = self.plans.setdefault(point, deque())
            if skip:
                q.append(_Plan(None, skip))
            q.append(_Plan(action, times))

    def block(self, point: str, *, skip: int = 0) -> Gate:
        """The next call reaching `point` (after `skip` others) stops there."""
        gate = Gate(point, self.asynchronous)
        self.gates.append(gate)
        self._plan(point, gate, 1, skip)
        return gate

    def fail(self, point: str, exc: BaseException, *, times: int | None = 1) -> None:
        """The next `times` calls (None: all) reaching `point` raise `exc`."""
        self._plan(point, exc, times, 0)

    def then(self, point: str, fn: Callable[[Any], None], *, times: int | None = 1) -> None:
        """The next `times` calls reaching `point` run `fn(conn)` there."""
        self._plan(point, fn, times, 0)

    def chaos(
        self,
        rng: random.Random,
        fail: float,
        interrupt: float = 0.0,
        may_interrupt: Callable[[], bool] | None = None,
    ) -> None:
        """Unplanned calls fail at random (an Exception, or an `Interrupt` where
        `may_interrupt()` allows), and yield to the others a random number of times."""
        self.rng = rng
        self.chaos_odds = (fail, interrupt)
        if may_interrupt is not None:
            self.may_interrupt = may_interrupt

    def clear(self) -> None:
        """Forget the plans not carried out yet, stop the chaos, open every gate."""
        with self.lock:
            self.rng = None
            self.plans.clear()
        for gate in self.gates:
            if not gate.opened.is_set():
                gate.open()

    def _next(self, point: str) -> Any:
        with self.lock:
            self.hits[point] += 1
            q = self.plans.get(point)
            if not q:
                return self._chaos(point)
            plan = q[0]
            if plan.times is not None:
                plan.times -= 1
                if plan.times <= 0:
                    q.popleft()
            return plan.action

    def _chaos(self, point: str) -> Any:
        rng = self.rng
        if rng is None:
            return None
        r = rng.random()
        fail, interrupt = self.chaos_odds
        if r < fail:
            self.injected += 1
            return OperationalError(f"chaos at {point}")
        if r < fail + interrupt and self.may_interrupt():
            self.injected += 1
            return Interrupt()
        return None

    def _yields(self) -> int:
        rng = self.rng
        return rng.randrange(3) if rng is not None else 0

    # -- passing through a point

    def hit(self, point: str, conn: Any = None) -> None:
        for _ in range(self._yields()):
            time.sleep(0)
        action = self._next(point)
        if isinstance(action, Gate):
            action.conn = conn
            pg = _watched(conn)
            action.reached.set()
            deadline = time.monotonic() + 10.0
            while not action.opened.wait(0.005 if pg else 10.0):
                if pg is not None and pg.was_cut():
                    _cut_off(pg)
                if time.monotonic() > deadline:
                    raise AssertionError(f"{action} never opened by the test")
            action = action.raising
        self._act(action, conn)

    async def ahit(self, point: str, conn: Any = None) -> None:
        for _ in range(self._yields()):
            await asyncio.sleep(0)
        action = self._next(point)
        if isinstance(action, Gate):
            action.conn = conn
            pg = _watched(conn)
            action.reached.set()
            while not action.opened.is_set():
                try:
                    await asyncio.wait_for(action.opened.wait(), 0.005 if pg else None)
                except asyncio.TimeoutError:
                    if pg is not None and pg.was_cut():
                        _cut_off(pg)
            action = action.raising
        self._act(action, conn)

    @staticmethod
    def _act(action: Any, conn: Any) -> None:
        if action is None:
            return
        if isinstance(action, BaseException):
            # A fresh copy each time: a shared instance would pile up tracebacks.
            raise action.with_traceback(None)
        action(conn)

    # -- the tally

    def _connecting(self) -> None:
        with self.lock:
            self.connect_calls += 1

    def _connect_failed(self) -> None:
        with self.lock:
            self.connect_errors += 1

    def _connected(self, conn: _FakeMixin) -> None:
        conn.fakes = self
        conn.serial = next(self.serial)
        with self.lock:
            self.conns.append(conn)

    @property
    def opened(self) -> int:
        return len(self.conns)

    def open_conns(self) -> list[Any]:
        return [c for c in self.conns if not c.closed]

    @property
    def closed(self) -> int:
        return sum(1 for c in self.conns if c.closed)


def _watched(conn: Any) -> FakePGconn | None:
    """A blocked call about a connection fails if the connection is cut meanwhile."""
    pg = getattr(conn, "pgconn", None)
    if isinstance(pg, FakePGconn) and pg.fd() is not None:
        return pg
    return None


def _cut_off(pg: FakePGconn) -> None:
    pg.finish()
    raise OperationalError("server closed the connection unexpectedly")


# ----------------------------------------------------------------------
# The fake connections


class _FakeMixin:
    """What the sync and async fakes share: state changes, no I/O."""

    fakes: Fakes
    serial: int
    pgconn: Any
    closed: bool
    _autocommit: bool
    _closed: bool

    def __repr__(self) -> str:
        tx = TransactionStatus(self.pgconn.transaction_status).name
        return f"<fake conn {self.serial} {tx}{' closed' if self.closed else ''}>"

    def __del__(self) -> None:
        pass  # the tally, not a ResourceWarning at some later collection, finds leaks

    def _check_usable(self) -> None:
        if self.closed:
            raise OperationalError("the connection is closed")

    def _close_now(self) -> None:
        self._closed = True
        self.pgconn.finish()

    def _executed(self) -> None:
        if not self._autocommit:
            self.pgconn.transaction_status = INTRANS

    def _transaction_ended(self) -> None:
        self.pgconn.transaction_status = IDLE

    def _setting_autocommit(self, value: bool) -> None:
        if self.pgconn.transaction_status != IDLE:
            raise ProgrammingError("can't change autocommit now: connection in transaction")
        self._autocommit = bool(value)

    def _returns_to_pool(self) -> Any:
        pool = getattr(self, "_pool", None)
        return pool if pool is not None and getattr(pool, "close_returns", False) else None


def _make(cls: type[Any], fakes: Fakes, kwargs: dict[str, Any]) -> Any:
    conn = cls(FakePGconn())
    conn.pgconn.owner = conn
    conn._autocommit = bool(kwargs.get("autocommit", False))
    fakes._connected(conn)
    return conn


class FakeConnection(_FakeMixin, Connection[Any]):
    @classmethod
    def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, fakes: Fakes, **kwargs: Any
    ) -> FakeConnection:
        fakes._connecting()
        try:
            fakes.hit("connect")
        except BaseException:
            fakes._connect_failed()
            raise
        return _make(cls, fakes, kwargs)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.closed:
            return
        pool = self._returns_to_pool()
        if pool is not None:
            pool.putconn(self)
            return
        self._close_now()
        self.fakes.hit("close", self)

    def cancel_safe(self, *, timeout: float = 30.0) -> None:
        self.fakes.hit("cancel", self)

    def rollback(self) -> None:
        self._check_usable()
        self.fakes.hit("rollback", self)
        self._transaction_ended()

    def commit(self) -> None:
        self._check_usable()
        self.fakes.hit("commit", self)
        self._transaction_ended()

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        self._check_usable()
        self.fakes.hit("execute", self)
        self._executed()
        return None

    def set_autocommit(self, value: bool) -> None:
        self._check_usable()
        self.fakes.hit("set_autocommit", self)
        self._setting_autocommit(value)


class FakeAsyncConnection(_FakeMixin, AsyncConnection[Any]):
    @classmethod
    async def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, fakes: Fakes, **kwargs: Any
    ) -> FakeAsyncConnection:
        fakes._connecting()
        try:
            await fakes.ahit("connect")
        except BaseException:
            fakes._connect_failed()
            raise
        return _make(cls, fakes, kwargs)  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self.closed:
            return
        pool = self._returns_to_pool()
        if pool is not None:
            await pool.putconn(self)
            return
        self._close_now()
        await self.fakes.ahit("close", self)

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:
        await self.fakes.ahit("cancel", self)

    async def rollback(self) -> None:
        self._check_usable()
        await self.fakes.ahit("rollback", self)
        self._transaction_ended()

    async def commit(self) -> None:
        self._check_usable()
        await self.fakes.ahit("commit", self)
        self._transaction_ended()

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        self._check_usable()
        await self.fakes.ahit("execute", self)
        self._executed()
        return None

    async def set_autocommit(self, value: bool) -> None:
        self._check_usable()
        await self.fakes.ahit("set_autocommit", self)
        self._setting_autocommit(value)


def break_conn(conn: Any) -> None:
    """A `then` action: the server went away under this connection."""
    conn.pgconn.finish()
