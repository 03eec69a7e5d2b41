"""Helpers shared by the integration tests (real PostgreSQL, no mocks of the database).

Several test modules use this file: add functions, don't rewrite the existing ones.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import pytest

POOL_LOGGER = "psycopg.pool"


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Poll `predicate` every few ms until it is true; fail the test at the deadline.

    For conditions that have nothing to wait on (the pool's background work, the
    server's view of a connection). The deadline is generous: it only bounds a
    failing test, a passing one returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    return conn.info.backend_pid


def terminate_backends(dsn: str, *pids: int) -> None:
    """Kill server processes (as an admin would) and wait until they are gone."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])

        def gone() -> bool:
            cur = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)]
            )
            row = cur.fetchone()
            return row is not None and row[0] == 0

        wait_until(gone, f"backends {pids} to terminate")


def server_pids(dsn: str, application_name: str) -> set[int]:
    """The backend pids of the server connections opened with this application_name."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        cur = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name]
        )
        return {row[0] for row in cur}


def refused_conninfo() -> str:
    """A conninfo whose connection attempts fail at once (nobody listens on the port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2"


def pool_threads(name: str) -> list[threading.Thread]:
    """The live threads a pool called `name` started (they are named after it)."""
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}-")]


def log_messages(
    caplog: pytest.LogCaptureFixture, level: int, logger: str = POOL_LOGGER
) -> list[str]:
    """The messages logged by `logger` at exactly `level`, in order, as formatted then.

    (A `%s` of a connection shows the state it had when the message was logged.)
    """
    return [
        getattr(r, "message", None) or r.getMessage()
        for r in caplog.records
        if r.name == logger and r.levelno == level
    ]


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return log_messages(caplog, logging.WARNING)


# The keys get_stats() always has.
GAUGES = {
    "pool_min",
    "pool_max",
    "pool_size",
    "pool_available",
    "requests_waiting",
    "pool_connecting",  # ours: upstream has no way to tell attempts from connections
}


class ConnectGate:
    """Makes connection attempts of a pool block until released, and counts them.

    `gate.connection_class` is a `psycopg.Connection` subclass to pass to the pool:
    its `connect()` records how many attempts are in flight (and the peak), then
    blocks until `release()` (or `hold=False`) before really connecting.
    """

    def __init__(self, hold: bool = True) -> None:
        self.lock = threading.Lock()
        self.open_gate = threading.Event()
        if not hold:
            self.open_gate.set()
        self.in_flight = 0
        self.peak = 0
        self.attempts = 0
        self.connections: list[psycopg.Connection[Any]] = []
        gate = self

        class GatedConnection(psycopg.Connection[Any]):
            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                with gate.lock:
                    gate.attempts += 1
                    gate.in_flight += 1
                    gate.peak = max(gate.peak, gate.in_flight)
                try:
                    if not gate.open_gate.wait(10.0):
                        raise psycopg.OperationalError("test gate never opened")
                    conn = super().connect(conninfo, **kwargs)
                finally:
                    with gate.lock:
                        gate.in_flight -= 1
                with gate.lock:
                    gate.connections.append(conn)
                return conn

        self.connection_class = GatedConnection

    def release(self) -> None:
        self.open_gate.set()


@contextmanager
def running_threads(*targets: Callable[[], Any]) -> Iterator[list[threading.Thread]]:
    """Run each target in a daemon thread; join them all (bounded) at the end."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    try:
        yield threads
    finally:
        for t in threads:
            t.join(10.0)
        alive = [t for t in threads if t.is_alive()]
        if alive:
            pytest.fail(f"{len(alive)} client threads still running")


class PoolClient:
    """A client thread of a sync pool: getconn(), optionally hold, putconn().

    It records what happened instead of raising in its thread: `conn` (the
    connection it got), `error` (the exception getconn raised), and sets `got`
    once it has a connection, `done` when it is finished. With `hold`, it keeps
    its connection until `hold` is set.
    """

    def __init__(
        self, pool: Any, timeout: float | None = None, hold: threading.Event | None = None
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.hold = hold
        self.conn: Any = None
        self.error: BaseException | None = None
        self.got = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PoolClient:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            conn = self.pool.getconn(self.timeout)
        except Exception as ex:
            self.error = ex
            self.done.set()
            return
        self.conn = conn
        self.got.set()
        try:
            if self.hold is not None:
                self.hold.wait(10.0)
            self.pool.putconn(conn)
        finally:
            self.done.set()

    def join(self) -> None:
        if not self.done.wait(10.0):
            pytest.fail("a pool client thread did not finish")
        self.thread.join(1.0)


# ----------------------------------------------------------------------
# Async tests (no pytest-asyncio: each test body runs in its own asyncio.run())


def run_async(fn: Callable[..., Any]) -> Callable[..., None]:
    """Decorate an `async def` test: pytest sees a plain function running it in a new loop.

    The signature is kept (`functools.wraps`), so fixtures still reach the body.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), ASYNC_TEST_TIMEOUT))

    return wrapper


# A hung async test fails with a TimeoutError instead of blocking the run.
ASYNC_TEST_TIMEOUT = 20.0


async def await_until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """`wait_until` for coroutines: poll without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def query_running(dsn: str, query: str) -> bool:
    """Is a statement with exactly this text running on the server (any backend)?"""
    with psycopg.connect(dsn, autocommit=True) as admin:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'active'"
        row = admin.execute(sql, [query]).fetchone()
    return row is not None and row[0] > 0


async def cancel_twice_mid_query(pool: Any, query: str, api: str, dsn: str) -> None:
    """Run `query` from a task in an anyio cancel scope, and cancel the scope once the
    server runs it: anyio cancels the task again while psycopg asks the server to
    cancel the query, and psycopg closes the connection instead (the case the pool's
    own cancel request is for). `api`: "connection" or "getconn"."""
    anyio = pytest.importorskip("anyio")

    async def run() -> None:
        if api == "connection":
            async with pool.connection() as conn:
                await conn.execute(query.encode())
        else:
            conn = await pool.getconn()
            try:
                await conn.execute(query.encode())
            finally:
                await pool.putconn(conn)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await await_until(lambda: query_running(dsn, query), "the query to start")
        tg.cancel_scope.cancel()


@contextmanager
def silent_server() -> Iterator[str]:
    """A local TCP server that accepts connections and never says a word.

    Yields a conninfo pointing at it: a client connecting there waits for the
    server's first message until its own timeout.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # the accept timeout, or the listener closed
                continue

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        stop.set()
        thread.join(5.0)
        listener.close()
        for s in accepted:
            s.close()


@asynccontextmanager
async def async_pool(conninfo: Any, **kwargs: Any) -> AsyncIterator[Any]:
    """An open `AsyncConnectionPool` (min_size 1, timeout 2 s unless given), closed at exit.

    Built with open=False and opened with `await pool.open(wait=True)`: no warning.
    """
    from psycopg_pool import AsyncConnectionPool

    kwargs.setdefault("min_size", 1)
    kwargs.setdefault("timeout", 2.0)
    pool: Any = AsyncConnectionPool(conninfo, open=False, **kwargs)
    try:
        await pool.open(wait=True, timeout=5.0)
        yield pool
    finally:
        await pool.close()


async def afetchval(conn: psycopg.AsyncConnection[Any], sql: str) -> Any:
    """The first column of the first row of `sql`, on an async connection."""
    cur = await conn.execute(sql)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


def messages_as_logged(
    caplog: pytest.LogCaptureFixture, level: int = logging.WARNING, logger: str = POOL_LOGGER
) -> list[str]:
    """Like `log_messages`, but each message as formatted when it was logged.

    `record.getMessage()` formats again on every call, so a `%s` of a connection
    shows its state *now* (e.g. `[IDLE]` after the rollback the message announced).
    """
    return [
        getattr(r, "message", r.getMessage())
        for r in caplog.records
        if r.name == logger and r.levelno == level
    ]


def pool_stat(pool: Any, key: str) -> int:
    """One entry of `pool.get_stats()`; 0 for a counter never touched."""
    value: int = pool.get_stats().get(key, 0)
    return value


async def await_stat(pool: Any, key: str, value: int) -> None:
    """Wait until the stat `key` of a pool (sync or async) equals `value`."""
    await await_until(lambda: pool_stat(pool, key) == value, f"{key} == {value}")


class GatedAsyncConnection(psycopg.AsyncConnection[Any]):
    """Its `connect()` waits for `gate` and counts the attempts in flight (and the peak).

    Subclass it in each test, giving the subclass its own `gate = asyncio.Event()`.
    """

    gate: asyncio.Event
    in_flight = 0
    peak = 0

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        cls.in_flight += 1
        cls.peak = max(cls.peak, cls.in_flight)
        try:
            await cls.gate.wait()
            return await super().connect(*args, **kwargs)
        finally:
            cls.in_flight -= 1


def release_all(hold: threading.Event, clients: list[PoolClient]) -> None:
    """Let holding clients give their connections back; all must have succeeded."""
    hold.set()
    for c in clients:
        c.join()
        assert c.error is None, f"a client failed: {c.error!r}"


def set_backoff(pool: Any, initial: float, max_delay: float) -> None:
    """Tune the reconnection schedule of a pool (as upstream's tests patch theirs).

    These are private knobs: the defaults (1 s doubling, 10 s cap) make tests slow.
    """
    backoff = pool._core.backoff
    backoff.initial_delay = initial
    backoff.max_delay = max_delay


@contextmanager
def pool_after_giving_up(
    conninfo: Any,
    on_failed: Callable[[Any], object] | None = None,
    backoff: tuple[float, float] | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """An open `ConnectionPool` that failed to connect until it called reconnect_failed.

    `reconnect_timeout` defaults to 0.1 s and `min_size` to 1. `on_failed(pool)` runs
    inside the reconnect_failed callback (it may raise); `backoff` is
    `(initial, max_delay)` for `set_backoff()`. The pool is closed at exit.
    """
    from psycopg_pool import ConnectionPool

    fired = threading.Event()

    def reconnect_failed(pool: Any) -> None:
        fired.set()
        if on_failed is not None:
            on_failed(pool)

    kwargs.setdefault("reconnect_timeout", 0.1)
    kwargs.setdefault("min_size", 1)
    pool: Any = ConnectionPool(conninfo, reconnect_failed=reconnect_failed, open=False, **kwargs)
    if backoff is not None:
        set_backoff(pool, *backoff)
    with pool:
        if not fired.wait(5.0):
            pytest.fail("reconnect_failed was not called")
        yield pool


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    """SIGTERM a server the test started (gunicorn, a Celery worker) and wait for it;
    SIGKILL it if it does not exit in time. False if it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return False
    return True
