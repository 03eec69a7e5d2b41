"""The threaded pool's hot path interrupted wherever a signal handler can raise.

An exception raised by a signal handler (KeyboardInterrupt, Celery's soft time
limit, gunicorn's worker timeout) surfaces where the interpreter runs pending
handlers: as a Python function starts, and as a call returns (before its result is
stored). The torture tests interrupt the pool where it blocks; here a trace
function raises `Interrupt` at the k-th such place the client's thread reaches in
the pool's checkout and return code, for every k. Afterwards no connection may be
stranded: either the pool has it back, or the client still holds it (its `_pool`
still says so) and can return it. None may need the garbage collector's help, be
closed, or be handed out twice, and a client waiting meanwhile must be served.

This found a bare `lock.acquire()` before its `try:` (an exception as acquire()
returns left the pool's lock held, and every later call hung) and a slot kept by
getconn() or putconn() when interrupted between two lock rounds.
"""

from __future__ import annotations

import dis
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

import pytest

from psycopg_pool import ConnectionPool
from psycopg_pool._acompat import Waiter
from psycopg_pool._core.state import INF
from psycopg_pool.pool import _ConnectionContext

from .fakes import INTRANS, Fakes, Interrupt
from .harness import PATIENCE, Ledger, pool_for, problems
from .sharness import reached, until

# The checkout and return path a client's thread runs through.
HOT_PATH: list[Callable[..., Any]] = [
    ConnectionPool.getconn,
    ConnectionPool._wait_ticket,
    ConnectionPool.putconn,
    ConnectionPool._put_back,
    # The slow paths: a check before lending, a return that needs a rollback or reset.
    ConnectionPool._getconn_slow,
    ConnectionPool._lend,
    ConnectionPool._check_before_lending,
    ConnectionPool._putconn_slow,
    ConnectionPool._clean_job,
    ConnectionPool._release,
    ConnectionPool._execute,
    ConnectionPool._not_queued,
    ConnectionPool._connect_inline,
    _ConnectionContext.__enter__,
    _ConnectionContext.__exit__,
    Waiter.wait,
    Waiter.wake,
]
CODES: set[CodeType] = {fn.__code__ for fn in HOT_PATH}
CALLS = {
    dis.opmap[name]
    for name in (
        "CALL",
        "CALL_KW",
        "CALL_FUNCTION",
        "CALL_METHOD",
        "CALL_FUNCTION_KW",
        "CALL_FUNCTION_EX",
    )
    if name in dis.opmap
}


class Injector:
    """Raise Interrupt at the k-th place a signal handler could run (once).

    The places are those of CPython >= 3.11: where a function starts, and where a
    call to a C function returns (a Python function's return is not one).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = 0
        self.where: tuple[str, int, str] | None = None
        self.started = 0  # Python frames started in this thread
        self.calling: dict[FrameType, int] = {}  # hot frame: `started` at its last CALL

    def tracer(self, frame: FrameType, event: str, arg: Any) -> Any:
        self.started += 1
        if self.where is not None:
            return None
        if frame.f_code not in CODES:
            caller = frame.f_back
            if caller is not None and caller.f_code in CODES:
                # A function the hot path calls (the core's, logging's): one that
                # raises as it starts stands for one interrupted anywhere before it
                # changed anything.
                self._place(frame, "as it starts")
            return None
        frame.f_trace_opcodes = True
        self._place(frame, "as it starts")
        return self.local

    def local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.where is not None:
            return None
        # Set again here: Python 3.13 ignores it when set at the call event.
        frame.f_trace_opcodes = True
        if event == "opcode":
            called = self.calling.pop(frame, None)
            if called is not None and called == self.started:  # no Python frame: C
                self._place(frame, "as a C call returns")
            if frame.f_code.co_code[frame.f_lasti] in CALLS:
                self.calling[frame] = self.started
        return self.local

    def _place(self, frame: FrameType, how: str) -> None:
        self.seen += 1
        if self.seen == self.k:
            self.where = (frame.f_code.co_name, frame.f_lineno, how)
            self.calling.clear()
            raise Interrupt(f"line {frame.f_lineno}, {how}")

    @property
    def fired(self) -> bool:
        return self.where is not None


class Run:
    """One client's checkout and return, interrupted at line k."""

    def __init__(self, api: str, setup: str, k: int, slow: str = "") -> None:
        self.api, self.setup, self.slow = api, setup, slow
        self.fakes = Fakes(asynchronous=False)
        callbacks = (slow,) if slow in ("check", "reset") else ()
        if slow == "null":  # each client connects (inline) and its return closes
            self.pool = pool_for(self.fakes, null=True, max_size=1)
        else:
            self.pool = pool_for(self.fakes, min_size=1, max_size=1, callbacks=callbacks)
        self.inj = Injector(k)
        self.conn: Any = None  # what the client got (getconn)
        self.ctx: Any = None  # its context (connection())
        self.got = threading.Event()
        self.waiter_queued = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.waiter_outcome: str | None = None

    def client(self) -> None:
        previous = sys.gettrace()
        sys.settrace(self.inj.tracer)
        try:
            if self.api == "getconn":
                self.conn = self.pool.getconn()
                self.got.set()
                self.waiter_queued.wait(PATIENCE)
                if self.slow == "dirty":
                    self.conn.pgconn.transaction_status = INTRANS  # needs a rollback
                self.pool.putconn(self.conn)
            else:
                self.ctx = self.pool.connection()
                with self.ctx:
                    self.got.set()
                    self.waiter_queued.wait(PATIENCE)
        except Interrupt as ex:
            self.error = ex
        finally:
            sys.settrace(previous)
            self.done.set()

    def held(self) -> Any:
        """The connection the client still holds, if any."""
        conn = self.conn if self.api == "getconn" else getattr(self.ctx, "_conn", None)
        return conn if conn is not None and conn._pool is self.pool else None

    def waiter(self) -> None:
        try:
            conn = self.pool.getconn(timeout=PATIENCE)
        except BaseException as ex:
            self.waiter_outcome = type(ex).__name__
            return
        self.waiter_outcome = "conn"
        self.pool.putconn(conn)

    def play(self) -> None:
        pool = self.pool
        pool.open(wait=True)
        holder = pool.getconn() if self.setup == "queued" else None
        client = threading.Thread(target=self.client)
        client.start()
        if holder is not None:
            # Give it back once the client waits for it (or gave up before).
            until(lambda: pool._core.n_waiting or self.done.is_set(), "the client to queue")
            pool.putconn(holder)
        waiter = None
        if self.setup == "waiter":
            # Someone queues behind the client, to be served by its return.
            until(lambda: self.got.is_set() or self.done.is_set(), "the client to get")
            if self.got.is_set():
                waiter = threading.Thread(target=self.waiter)
                waiter.start()
                until(lambda: pool._core.n_waiting or waiter is None, "the waiter to queue")
        self.waiter_queued.set()
        reached(self.done, "the client's end")
        client.join()
        held = self.held()
        if held is not None:
            pool.putconn(held)  # what the client would still do with it
        if waiter is not None:
            waiter.join(PATIENCE)
            assert self.waiter_outcome == "conn", f"the waiter got {self.waiter_outcome}"

    def lock_free(self) -> bool:
        lock = self.pool._lock
        if not lock.acquire(timeout=PATIENCE):
            return False
        lock.release()
        return True

    def check(self) -> None:
        pool = self.pool
        assert self.lock_free(), "the pool's lock was left held: every call would hang"
        self.conn = self.ctx = None
        gc.collect()
        pool._reap(INF)  # a connection dropped without being returned would show now
        last: list[str] = []

        def balanced() -> bool:
            last[:] = problems(pool, self.fakes, Ledger())
            return not last

        try:
            until(balanced, "the books to balance", hang=False)
        except BaseException:
            pytest.fail("the pool's books disagree:\n  " + "\n  ".join(last))
        stats = pool.get_stats()
        assert stats.get("connections_lost", 0) == 0, f"{self.inj.where}: {stats}"
        if not self.slow:
            assert self.fakes.closed == 0, f"{self.inj.where}: a connection was closed"
        if self.slow != "null":
            # (Interrupted, a rollback leaves the connection in doubt: it is replaced.)
            assert self.fakes.opened == 1 + self.fakes.closed, f"{self.inj.where}"
        conn = pool.getconn(timeout=PATIENCE)
        pool.putconn(conn)


@pytest.fixture(scope="module", autouse=True)
def _young_heap() -> Iterator[None]:
    # check() collects garbage after every run, hundreds of times a test: with the
    # heap the earlier tests leave frozen, a collection walks only this test's objects
    # (it took 4x longer in the whole suite than alone).
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    made: list[Run] = []
    yield made
    for run in made:
        if run.lock_free():
            run.pool.close()


@pytest.mark.parametrize("setup", ["idle", "queued", "waiter"])
@pytest.mark.parametrize(
    "api, slow",
    [
        ("getconn", ""),
        ("connection", ""),
        ("getconn", "check"),  # a check callback before lending
        ("getconn", "dirty"),  # returned in a transaction: rolled back
        ("getconn", "reset"),  # a reset callback (in a worker)
        ("getconn", "null"),  # a NullConnectionPool
    ],
)
def test_interrupted_anywhere(api: str, slow: str, setup: str, runs: list[Run]) -> None:
    places: set[tuple[str, int, str]] = set()
    for k in range(1, 500):
        run = Run(api, setup, k, slow)
        runs.append(run)
        try:
            run.play()
            if not run.inj.fired:
                break
            assert run.error is not None
            run.check()
        except BaseException as ex:
            raise AssertionError(f"interrupted at {run.inj.where}: {ex}") from ex
        assert run.inj.where is not None
        places.add(run.inj.where)
    else:
        pytest.fail("the client never got through")
    # Each of getconn and the return path was interrupted at several places.
    names = {name for name, _, _ in places}
    assert {"getconn", "_put_back"} <= names
    assert len(places) >= 10, sorted(places)
