"""Fault injection against a real PostgreSQL: a loopback proxy and the fault scenarios.

Used by `test_faults.py` (which asserts on what each scenario reports) and by
`bench/faults.py` (which runs this file as a program, once with our pool and once with
upstream psycopg-pool, and tabulates the reports). So this module needs only the
standard library, psycopg and *a* `psycopg_pool`, whichever one the interpreter has:
no pytest, no test helpers, nothing of ours beyond the public pool API (features only
ours has are used when the pool's signature offers them).

Every scenario returns a plain dict (JSON-able): what the user saw (errors, their
messages, how long calls took), whether anything was lost (the pool's `pool_size`
against the live server backends carrying the pool's `application_name`), and whether
a call outlived its deadline (a hang). Client calls run in daemon threads (or tasks)
bounded by a deadline, so a pool that hangs is reported instead of hanging the run.

As a program::

    python tests/integration/faults.py SCENARIO [--json]

runs one scenario against throw-away PostgreSQL clusters of its own (see
`psycopg_pool/_embedded_pg.py`, loaded by path: upstream's package has no such
module) and prints the report as one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.util
import inspect
import ipaddress
import json
import logging
import os
import random
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

import psycopg_pool
from psycopg_pool import AsyncConnectionPool, ConnectionPool

POOL_LOGGER = "psycopg.pool"
REPO = Path(__file__).resolve().parents[2]

#: Features only our pool has, found by signature so that upstream runs the same code.
POOL_PARAMS = frozenset(inspect.signature(ConnectionPool).parameters)
IS_OURS = "leak_timeout" in POOL_PARAMS


# ----------------------------------------------------------------------
# The proxy


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Flow:
    """One client connection through the proxy, and its connection to the server."""

    __slots__ = ("client", "due", "held", "server", "stranded")

    def __init__(self, client: socket.socket, due: float) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.due = due  # when to connect to the server (connect latency)
        self.held = False  # not forwarding (black hole)
        self.stranded = False  # never forwarding again (its route is gone)


class FaultProxy:
    """A loopback TCP proxy to a server, with faults on demand.

    - `blackhole()`: stop forwarding, in both directions, on every connection open
      or opened later; sockets stay open (the peers see silence, not an error). A
      new client's TCP handshake still completes (the kernel does it), but the
      server never hears of it.
    - `resume()`: forward again; bytes sent meanwhile are delivered then, like a
      network that heals. `resume(strand=True)`: only connections opened from now
      on are forwarded, the older ones stay silent for good (a route that changed,
      a NAT or firewall that lost their state).
    - `set_connect_delay(s)`: every new connection reaches the server `s` seconds
      after it was accepted.

    It listens on 127.0.0.1 only, forwards only to a loopback address, and stops by
    itself (closing every socket) after `lifetime` seconds. A single thread does
    all the work; the methods above return once the proxy applies them.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", lifetime: float = 120.0):
        if not _is_loopback(target_host):
            raise ValueError(f"the proxy only forwards to loopback addresses, not {target_host!r}")
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._flows: list[_Flow] = []
        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._lock = threading.Lock()
        self._forwarding = True
        self._delay = 0.0
        self._stop = False
        self._deadline = time.monotonic() + lifetime
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- what a test calls

    def conninfo(self, dsn: str, **kwargs: Any) -> str:
        """`dsn` (a server's conninfo) rerouted through the proxy, plus `kwargs`."""
        return make_conninfo(dsn, host="127.0.0.1", port=self.port, **kwargs)

    def blackhole(self) -> None:
        def apply() -> None:
            self._forwarding = False
            for flow in self._flows:
                self._hold(flow)

        self._call(apply)

    def resume(self, strand: bool = False) -> None:
        def apply() -> None:
            self._forwarding = True
            for flow in self._flows:
                if strand and flow.held:
                    flow.stranded = True
                if flow.held and not flow.stranded:
                    flow.held = False
                    self._forward(flow)

        self._call(apply)

    def set_connect_delay(self, seconds: float) -> None:
        def apply() -> None:
            self._delay = seconds

        self._call(apply)

    @property
    def open_connections(self) -> int:
        return len(self._flows)

    def close(self) -> None:
        """Stop at once: every socket is closed (the peers see the connection reset)."""
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(10.0)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the proxy's thread

    def _call(self, fn: Callable[[], None]) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((fn, done))
        self._wake_w.send(b"x")
        if not done.wait(10.0) and self._thread.is_alive():
            raise RuntimeError("the proxy did not answer")

    def _run(self) -> None:
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= self._deadline:
                    break
                timeout = self._deadline - now
                pending = [f.due for f in self._flows if f.server is None and not f.held]
                if pending:
                    timeout = max(0.0, min(timeout, min(pending) - now))
                for key, _ in self._sel.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._run_commands()
                    else:
                        self._pump(*key.data)
                now = time.monotonic()
                for flow in list(self._flows):
                    if flow.server is None and not flow.held and flow.due <= now:
                        self._connect(flow)
        finally:
            for flow in list(self._flows):
                self._drop(flow)
            self._sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
            with self._lock:
                for _, done in self._commands:
                    done.set()

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, done in commands:
            fn()
            done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(True)
            client.settimeout(5.0)
            self.accepted += 1
            flow = _Flow(client, time.monotonic() + self._delay)
            flow.held = not self._forwarding
            self._flows.append(flow)

    def _connect(self, flow: _Flow) -> None:
        try:
            flow.server = socket.create_connection(self.target, timeout=5.0)
        except OSError:
            self._drop(flow)  # the server is down: the client sees the connection close
            return
        self._forward(flow)

    def _forward(self, flow: _Flow) -> None:
        if flow.server is None:
            return  # connected (and registered) when due
        self._sel.register(flow.client, selectors.EVENT_READ, (flow, True))
        self._sel.register(flow.server, selectors.EVENT_READ, (flow, False))

    def _hold(self, flow: _Flow) -> None:
        if not flow.held:
            flow.held = True
            if flow.server is not None:
                self._sel.unregister(flow.client)
                self._sel.unregister(flow.server)

    def _pump(self, flow: _Flow, from_client: bool) -> None:
        src, dst = (flow.client, flow.server) if from_client else (flow.server, flow.client)
        assert src is not None and dst is not None
        try:
            data = src.recv(65536)
            if data:
                dst.sendall(data)
                return
        except OSError:
            pass
        self._drop(flow)

    def _drop(self, flow: _Flow) -> None:
        if flow in self._flows:
            self._flows.remove(flow)
        for sock in (flow.client, flow.server):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()


# ----------------------------------------------------------------------
# Small tools


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout` passes; return its last verdict."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)
    return True


def secs(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def first_line(ex: BaseException) -> str:
    text = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {text[0] if text else ''}"


class LogRecorder(logging.Handler):
    """Collects what psycopg and the pool log (WARNING and above by default), as formatted then."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.records: list[dict[str, str]] = []
        self._fmt = logging.Formatter()
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self._fmt.formatException(record.exc_info)
        with self._lock2:
            self.records.append({"logger": record.name, "level": record.levelname, "text": text})

    def texts(self, logger: str | None = None) -> list[str]:
        with self._lock2:
            return [r["text"] for r in self.records if logger is None or r["logger"] == logger]

    @contextlib.contextmanager
    def attached(self) -> Iterator[LogRecorder]:
        log = logging.getLogger("psycopg")  # psycopg.pool propagates here
        saved = log.level
        if log.getEffectiveLevel() > self.level:
            log.setLevel(self.level)
        log.addHandler(self)
        try:
            yield self
        finally:
            log.removeHandler(self)
            log.setLevel(saved)


class Admin:
    """A superuser connection of the scenario's own, to look at the server's side."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="faults-admin")

    def pids(self, app: str) -> list[int]:
        cur = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app]
        )
        return [row[0] for row in cur]

    def live(self, app: str) -> int:
        return len(self.pids(app))

    def terminate(self, pid: int) -> bool:
        row = self.conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        self.conn.close()


def live_backends(dsn: str, app: str) -> int:
    admin = Admin(dsn)
    try:
        return admin.live(app)
    finally:
        admin.close()


def settle(
    pool: Any, server: str | Admin, app: str, want: int | None, timeout: float = 5.0
) -> dict[str, Any]:
    """Wait until the pool's `pool_size` equals the server's live backends (and `want`).

    `server`: a dsn, or an `Admin` connection to use. Returns both numbers as last
    seen, and `lost`: connections of `want` (else of `pool_size`) missing on the
    server (capacity the pool believes it has, or lost for good).
    """
    seen: dict[str, Any] = {}
    admin = Admin(server) if isinstance(server, str) else server

    def agreed() -> bool:
        seen["pool_size"] = pool.get_stats()["pool_size"]
        seen["live"] = admin.live(app)
        target = seen["pool_size"] if want is None else want
        return bool(seen["pool_size"] == seen["live"] == target)

    try:
        seen["settled"] = wait_for(agreed, timeout, 0.02)
    finally:
        if admin is not server:
            admin.close()
    seen["lost"] = max(0, (want if want is not None else seen["pool_size"]) - seen["live"])
    return seen


def pool_kwargs(app: str, **kwargs: Any) -> dict[str, Any]:
    """Constructor arguments for either pool: ours-only ones are dropped for upstream."""
    kwargs.setdefault("kwargs", {})["application_name"] = app
    kwargs.setdefault("name", app)
    kwargs["open"] = False
    return {k: v for k, v in kwargs.items() if k in POOL_PARAMS}


def make_pool(cls: Any, conninfo: str, app: str, check: bool, **kwargs: Any) -> Any:
    """A pool of class `cls` (not open), with its `check_connection` as `check` if asked."""
    kwargs.setdefault("timeout", REQUEST_TIMEOUT)
    kwargs["check"] = cls.check_connection if check else None
    return cls(conninfo, **pool_kwargs(app, **kwargs))


REQUEST_TIMEOUT = 10.0
GRACE = 1.0  # how much later than the caller's deadline a call counts as hung


@dataclass
class Call:
    """The outcome of one client call run under a deadline."""

    ok: bool = False
    value: Any = None
    error: BaseException | None = None
    elapsed: float | None = None
    hung: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": first_line(self.error) if self.error is not None else None,
            "elapsed": secs(self.elapsed),
            "hung": self.hung,
        }


class Running:
    """Client calls started together in daemon threads; `join()` waits under one deadline."""

    def __init__(self, fns: list[Callable[[], Any]]) -> None:
        self.calls = [Call() for _ in fns]
        self._done = [threading.Event() for _ in fns]
        for i, fn in enumerate(fns):
            threading.Thread(
                target=self._run, args=(i, fn), daemon=True, name=f"client-{i}"
            ).start()

    def _run(self, i: int, fn: Callable[[], Any]) -> None:
        call = self.calls[i]
        t0 = time.monotonic()
        try:
            call.value = fn()
            call.ok = True
        except BaseException as ex:
            call.error = ex
        call.elapsed = time.monotonic() - t0
        self._done[i].set()

    def finished(self) -> bool:
        return all(done.is_set() for done in self._done)

    def join(self, limit: float) -> list[Call]:
        """The calls; those still running after `limit` s are marked hung."""
        deadline = time.monotonic() + limit
        for call, done in zip(self.calls, self._done, strict=True):
            call.hung = not done.wait(max(0.0, deadline - time.monotonic()))
        return self.calls


def bounded(fn: Callable[[], Any], limit: float) -> Call:
    """Run `fn` in a daemon thread; stop waiting for it after `limit` s (a hang)."""
    return Running([fn]).join(limit)[0]


def close_pool(pool: Any, limit: float = 10.0) -> bool:
    """Close a sync pool without risking the run: False if close() itself hung."""
    return not bounded(lambda: pool.close(timeout=2.0), limit).hung


async def aclose_pool(pool: Any, limit: float = 10.0) -> bool:
    try:
        await asyncio.wait_for(pool.close(timeout=2.0), limit)
    except asyncio.TimeoutError:
        return False
    return True


def request(pool: Any, timeout: float, sql: str = "SELECT 1") -> Any:
    with pool.connection(timeout=timeout) as conn:
        return conn.execute(sql).fetchone()


async def arequest(pool: Any, timeout: float, sql: str = "SELECT 1") -> Any:
    async with pool.connection(timeout=timeout) as conn:
        cur = await conn.execute(sql)
        return await cur.fetchone()


def embedded_pg_class() -> Any:
    """`EmbeddedPostgres`, from our package, or loaded by path when upstream's is installed."""
    try:
        from psycopg_pool._embedded_pg import EmbeddedPostgres
    except ImportError:
        path = REPO / "psycopg_pool" / "_embedded_pg.py"
        spec = importlib.util.spec_from_file_location("faults_embedded_pg", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look it up there
        spec.loader.exec_module(module)
        return module.EmbeddedPostgres
    return EmbeddedPostgres


# ----------------------------------------------------------------------
# Scenario: the server rejects the pool's credentials or database

PASSWORD = "Pool-s3cret-pw"  # the role's password while password authentication is on
WRONG_PASSWORD = "Wr0ng-s3cret-pw"
PASSWORD_HBA = ["local all all trust", "host all all 127.0.0.1/32 scram-sha-256"]
# The rest of a password with a space, unquoted: libpq reads it as a key of its own and
# quotes it in its error ('missing "=" after "..."').
MISREAD_PIECE = "Piece-s3cret"
SECRETS = (PASSWORD, WRONG_PASSWORD, MISREAD_PIECE)

#: case -> (conninfo from the server's dsn, what the server or libpq says)
AUTH_CASES: dict[str, tuple[Callable[[str], str], str]] = {
    "wrong_password": (
        lambda dsn: make_conninfo(dsn, password=WRONG_PASSWORD),
        "password authentication failed",
    ),
    "no_password": (lambda dsn: dsn, "no password supplied"),
    "missing_database": (
        lambda dsn: make_conninfo(dsn, dbname="no_such_db", password=PASSWORD),
        'database "no_such_db" does not exist',
    ),
    "misread_password": (
        lambda dsn: f"{dsn} password={PASSWORD} {MISREAD_PIECE}",
        'missing "=" after',
    ),
}
#: getconn() or wait() right after open(), or once the first attempt has failed;
#: open(wait=True).
AUTH_CALLS = ("getconn", "getconn_later", "wait", "wait_later", "open_wait")


@contextlib.contextmanager
def password_auth(server: Any) -> Iterator[None]:
    """TCP connections need the superuser's password (`PASSWORD`) while inside."""
    hba = server.hba_lines
    server.set_password(PASSWORD)
    server.set_hba(PASSWORD_HBA)
    try:
        yield
    finally:
        server.set_hba(hba)
        server.set_password(None)


def scenario_auth(server: Any, timeout: float = 10.0) -> dict[str, Any]:
    """`getconn`, `wait`, `open(wait=True)` on pools whose connections are refused for good.

    The server must ask for a password (`password_auth()`). Every case of
    `AUTH_CASES` and every call of `AUTH_CALLS` gets a pool of its own, all at the
    same time; each call should raise `PoolTimeout` with the reason, long before
    `timeout`, and no password may show in any message or pool log record.
    """
    res: dict[str, Any] = {"scenario": "auth", "timeout": timeout, "cases": {}}
    with LogRecorder(logging.DEBUG).attached() as rec:
        runs = []
        for case, (make, _) in AUTH_CASES.items():
            for what in AUTH_CALLS:
                app = f"faults-auth-{case}-{what}"
                pool = ConnectionPool(
                    make(server.dsn), **pool_kwargs(app, min_size=1, timeout=timeout)
                )
                runs.append((case, what, pool))
        running = Running(
            [functools.partial(_auth_call, what, pool, timeout) for _, what, pool in runs]
        )
        calls = running.join(timeout + 5.0)
        leaks: list[str] = []
        for (case, what, pool), call in zip(runs, calls, strict=True):
            server_says = AUTH_CASES[case][1]
            ex = call.error
            cause = getattr(ex, "__cause__", None)
            message = str(ex) if ex is not None else ""
            res["cases"].setdefault(case, {})[what] = {
                **call.summary(),
                "type": type(ex).__name__ if ex is not None else None,
                "message": message,
                "says_why": server_says in message,
                "cause": first_line(cause) if cause is not None else None,
                "cause_is_psycopg_error": isinstance(cause, psycopg.Error),
                "cause_says_why": cause is not None and server_says in str(cause),
                "attempts": pool.get_stats().get("connections_errors", 0),
            }
            texts = [message, repr(ex), str(cause), repr(pool)]
            leaks += [t for t in texts if any(s in t for s in SECRETS)]
            if call.ok:
                pool.putconn(call.value)
            close_pool(pool)
        pool_logged = rec.texts(POOL_LOGGER)
        other_logged = [t for t in rec.texts() if t not in pool_logged]
    res["secret_leaks"] = leaks + [t for t in pool_logged if any(s in t for s in SECRETS)]
    res["secret_leaks_psycopg_log"] = [t for t in other_logged if any(s in t for s in SECRETS)]
    res["pool_log_records"] = len(pool_logged)
    return res


def _auth_call(what: str, pool: Any, timeout: float) -> Any:
    if what == "open_wait":
        return pool.open(wait=True, timeout=timeout)
    pool.open()
    if what.endswith("_later"):  # a pool opened at start-up, used later
        wait_for(lambda: pool.get_stats().get("connections_errors"), 5.0)
    if what.startswith("getconn"):
        return pool.getconn()
    return pool.wait(timeout)


# ----------------------------------------------------------------------
# Scenario: nothing listens when the pool opens; the server starts a few seconds later


def scenario_refused(
    server: Any, outage: float = 3.0, clients: int = 2, min_size: int = 4
) -> dict[str, Any]:
    """The server is stopped when the pool opens and starts `outage` s later.

    (At the first failed attempt after `outage` s, to be exact.)

    `clients` clients ask for a connection (timeout `outage` + 17 s) while it is down.
    `reconnect_timeout` is 1 s, so the pool gives up (`reconnect_failed`) during the
    outage. Afterwards nobody asks: the pool should get back to `min_size` by itself.
    """
    app = "faults-refused"
    failed_calls: list[float] = []
    timeout = outage + 17.0
    server.stop()
    pool = ConnectionPool(
        server.dsn,
        **pool_kwargs(
            app,
            min_size=min_size,
            timeout=timeout,
            reconnect_timeout=1.0,
            reconnect_failed=lambda pool: failed_calls.append(time.monotonic()),
        ),
    )
    res: dict[str, Any] = {"scenario": "refused", "outage": outage, "min_size": min_size}
    try:
        pool.open()
        t_open = time.monotonic()

        def client() -> float:
            request(pool, timeout)
            return time.monotonic()

        running = Running([client] * clients)
        time.sleep(outage)  # the outage (the scenario's pace, not a synchronisation)
        # Start right after a failed attempt: the worst moment for a pool that
        # waits for its next backoff step before trying again.
        errors = pool.get_stats().get("connections_errors", 0)
        wait_for(lambda: pool.get_stats().get("connections_errors", 0) > errors, 15.0)
        server.start()
        t_up = time.monotonic()
        calls = running.join(timeout + 2.0)
        admin = Admin(server.dsn)
        try:
            refilled = wait_for(
                lambda: (
                    pool.get_stats()["pool_available"] >= min_size and admin.live(app) >= min_size
                ),
                5.0,
            )
            t_refilled = time.monotonic()
        finally:
            admin.close()
        served = [c.value - t_up for c in calls if c.ok]
        res.update(
            clients=[c.summary() for c in calls],
            errors=sum(not c.ok for c in calls),
            hangs=sum(c.hung for c in calls),
            first_served_after_up=secs(min(served, default=None)),
            last_served_after_up=secs(max(served, default=None)),
            reconnect_failed_calls=len(failed_calls),
            reconnect_failed_after=[secs(t - t_open) for t in failed_calls],
            refilled=refilled,
            refilled_after_up=secs(t_refilled - t_up) if refilled else None,
        )
        res.update(settle(pool, server.dsn, app, min_size))
    finally:
        server.start()
        res["closed"] = close_pool(pool)
    return res


# ----------------------------------------------------------------------
# Scenario: the server restarts while the pool is idle


def scenario_restart_idle(
    server: Any, check: bool = False, use_async: bool = False, requests: int = 8, idle: float = 1.0
) -> dict[str, Any]:
    """A pool of 4 idle connections, a server restart, then `requests` requests one by one.

    Idle means nobody asked for a connection for `idle` s before the restart. No
    request should get a dead connection (with or without a `check` callback).
    """
    app = f"faults-restart-idle{'-check' if check else ''}{'-async' if use_async else ''}"
    res: dict[str, Any] = {"scenario": "restart_idle", "check": check, "async": use_async}
    if use_async:
        outcomes = asyncio.run(_restart_idle_async(server, app, check, requests, idle, res))
    else:
        outcomes = _restart_idle_sync(server, app, check, requests, idle, res)
    res.update(
        requests=[c.summary() for c in outcomes],
        errors=sum(not c.ok for c in outcomes),
        hangs=sum(c.hung for c in outcomes),
        slowest=secs(max((c.elapsed or 0.0 for c in outcomes), default=None)),
        all_served_after=secs(sum(c.elapsed or 0.0 for c in outcomes)),
    )
    return res


def _restart_idle_sync(
    server: Any, app: str, check: bool, requests: int, idle: float, res: dict[str, Any]
) -> list[Call]:
    pool = make_pool(ConnectionPool, server.dsn, app, check, min_size=4)
    try:
        pool.open(wait=True, timeout=10.0)
        time.sleep(idle)  # the scenario: an idle pool
        server.restart("fast")
        outcomes = [
            bounded(functools.partial(request, pool, REQUEST_TIMEOUT), REQUEST_TIMEOUT + GRACE)
            for _ in range(requests)
        ]
        res.update(settle(pool, server.dsn, app, 4))
    finally:
        server.start()
        res["closed"] = close_pool(pool)
    return outcomes


async def abounded(coro: Any, limit: float) -> Call:
    """`bounded()` for a coroutine: cancelled (and marked hung) after `limit` s."""
    call = Call()
    t0 = time.monotonic()
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=limit)
    call.elapsed = time.monotonic() - t0
    if not done:
        call.hung = True
        task.cancel()
        await asyncio.wait({task}, timeout=5.0)
        return call
    if task.cancelled():
        call.error = asyncio.CancelledError()
    elif task.exception() is not None:
        call.error = task.exception()
    else:
        call.ok = True
        call.value = task.result()
    return call


async def _restart_idle_async(
    server: Any, app: str, check: bool, requests: int, idle: float, res: dict[str, Any]
) -> list[Call]:
    pool = make_pool(AsyncConnectionPool, server.dsn, app, check, min_size=4)
    try:
        await pool.open(wait=True, timeout=10.0)
        await asyncio.sleep(idle)  # the scenario: an idle pool
        await asyncio.to_thread(server.restart, "fast")
        outcomes = [
            await abounded(arequest(pool, REQUEST_TIMEOUT), REQUEST_TIMEOUT + GRACE)
            for _ in range(requests)
        ]
        res.update(await asyncio.to_thread(settle, pool, server.dsn, app, 4))
    finally:
        await asyncio.to_thread(server.start)
        res["closed"] = await aclose_pool(pool)
    return outcomes


# ----------------------------------------------------------------------
# Scenario: the server restarts under load


class Books:
    """What busy clients saw around a server restart, by backend pid.

    Connections in use at some moment of the shutdown (lent when it began, or lent
    before the server was down) may fail once: their statement was cut. An error on
    any other connection means the pool lent out a connection that was idle when
    the server went away: one it could have known was dead.
    """

    def __init__(self, clients: int) -> None:
        self.lock = threading.Lock()
        self.lent: set[int] = set()
        self.in_use_at_shutdown: set[int] = set()
        self.shutting_down = False
        self.errors: list[tuple[int | None, float, str]] = []  # pid, when, what
        self.requests = 0
        self.first_ok_after: list[float | None] = [None] * clients
        self.t_up: float | None = None

    def acquired(self, pid: int) -> None:
        with self.lock:
            self.lent.add(pid)
            if self.shutting_down:
                self.in_use_at_shutdown.add(pid)

    def finished(self, client: int, pid: int | None, error: BaseException | None) -> None:
        now = time.monotonic()
        with self.lock:
            self.requests += 1
            if pid is not None:
                self.lent.discard(pid)
            if error is not None:
                self.errors.append((pid, now, first_line(error)))
            elif self.t_up is not None and self.first_ok_after[client] is None:
                self.first_ok_after[client] = now - self.t_up

    def shutdown_begins(self) -> None:
        with self.lock:
            self.shutting_down = True
            self.in_use_at_shutdown = set(self.lent)

    def server_down(self) -> None:
        with self.lock:
            self.shutting_down = False

    def server_up(self) -> None:
        with self.lock:
            self.t_up = time.monotonic()

    def all_served_again(self) -> bool:
        with self.lock:
            return all(t is not None for t in self.first_ok_after)

    def report(self) -> dict[str, Any]:
        with self.lock:
            in_use = [e for e in self.errors if e[0] in self.in_use_at_shutdown]
            other = [e for e in self.errors if e[0] not in self.in_use_at_shutdown]
            served = [t for t in self.first_ok_after if t is not None]
            return {
                "requests": self.requests,
                "errors": len(self.errors),
                "errors_in_use_at_restart": len(in_use),
                "errors_other": len(other),
                "errors_other_detail": [e[2] for e in other][:5],
                "in_use_at_restart": len(self.in_use_at_shutdown),
                "first_served_after_up": secs(min(served, default=None)),
                "full_service_after_up": secs(max(served))
                if len(served) == len(self.first_ok_after)
                else None,
                "clients_never_served_again": len(self.first_ok_after) - len(served),
            }


BUSY_SQL = "SELECT pg_sleep(0.002)"
THINK = 0.005  # seconds a busy client waits between requests


def scenario_restart_busy(
    server: Any, use_async: bool = False, clients: int = 8, warmup: float = 0.5
) -> dict[str, Any]:
    """`clients` clients run short queries back to back; the server restarts (fast).

    Only connections in use at the time may fail; every client is served again soon.
    """
    app = f"faults-restart-busy{'-async' if use_async else ''}"
    res: dict[str, Any] = {"scenario": "restart_busy", "async": use_async, "clients": clients}
    books = Books(clients)
    if use_async:
        asyncio.run(_restart_busy_async(server, app, books, clients, warmup, res))
    else:
        _restart_busy_sync(server, app, books, clients, warmup, res)
    res.update(books.report())
    return res


def _restart(server: Any, books: Books) -> None:
    books.shutdown_begins()
    server.stop("fast")
    books.server_down()
    server.start()
    books.server_up()


def _restart_busy_sync(
    server: Any, app: str, books: Books, clients: int, warmup: float, res: dict[str, Any]
) -> None:
    pool = ConnectionPool(
        server.dsn, **pool_kwargs(app, min_size=4, max_size=clients, timeout=REQUEST_TIMEOUT)
    )
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            pid = None
            error = None
            try:
                with pool.connection() as conn:
                    pid = conn.info.backend_pid
                    books.acquired(pid)
                    conn.execute(BUSY_SQL)
            except Exception as ex:
                error = ex
            books.finished(i, pid, error)
            time.sleep(THINK)  # pacing the load

    try:
        pool.open(wait=True, timeout=10.0)
        running = Running([functools.partial(client, i) for i in range(clients)])
        time.sleep(warmup)  # pacing: let the load run before the restart
        _restart(server, books)
        wait_for(books.all_served_again, REQUEST_TIMEOUT)
        stop.set()
        calls = running.join(REQUEST_TIMEOUT + GRACE)
        res["hangs"] = sum(c.hung for c in calls)
        res.update(settle(pool, server.dsn, app, None))
    finally:
        stop.set()
        server.start()
        res["closed"] = close_pool(pool)


async def _restart_busy_async(
    server: Any, app: str, books: Books, clients: int, warmup: float, res: dict[str, Any]
) -> None:
    pool = AsyncConnectionPool(
        server.dsn, **pool_kwargs(app, min_size=4, max_size=clients, timeout=REQUEST_TIMEOUT)
    )
    stop = asyncio.Event()

    async def client(i: int) -> None:
        while not stop.is_set():
            pid = None
            error = None
            try:
                async with pool.connection() as conn:
                    pid = conn.info.backend_pid
                    books.acquired(pid)
                    await conn.execute(BUSY_SQL)
            except Exception as ex:
                error = ex
            books.finished(i, pid, error)
            await asyncio.sleep(THINK)  # pacing the load

    try:
        await pool.open(wait=True, timeout=10.0)
        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(warmup)  # pacing: let the load run before the restart
        await asyncio.to_thread(_restart, server, books)
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while not books.all_served_again() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + GRACE)
        res["hangs"] = len(pending)
        for t in pending:
            t.cancel()
        res.update(await asyncio.to_thread(settle, pool, server.dsn, app, None))
    finally:
        stop.set()
        await asyncio.to_thread(server.start)
        res["closed"] = await aclose_pool(pool)


# ----------------------------------------------------------------------
# Scenario: an admin (or an idle-session killer) terminates pool connections


def scenario_terminate(
    server: Any,
    duration: float = 3.0,
    interval: float = 0.1,
    clients: int = 2,
    size: int = 8,
    check: bool = False,
) -> dict[str, Any]:
    """`pg_terminate_backend()` of a random pool connection every `interval` s.

    The pool (`size` connections) is mostly idle: `clients` clients run a query
    every 20 ms. Reports the user errors per kill, and the request latencies.
    """
    app = f"faults-terminate{'-check' if check else ''}"
    pool = make_pool(ConnectionPool, server.dsn, app, check, min_size=size)
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[str] = []
    latencies: list[float] = []

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                request(pool, REQUEST_TIMEOUT)
            except Exception as ex:
                with lock:
                    errors.append(first_line(ex))
            else:
                with lock:
                    latencies.append(time.monotonic() - t0)
            time.sleep(0.02)  # pacing the load

    res: dict[str, Any] = {"scenario": "terminate", "check": check, "duration": duration}
    admin = Admin(server.dsn)
    rng = random.Random(4)
    kills = 0
    try:
        pool.open(wait=True, timeout=10.0)
        running = Running([client] * clients)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            pids = admin.pids(app)
            if pids and admin.terminate(rng.choice(pids)):
                kills += 1
            time.sleep(interval)  # pacing the kills
        stop.set()
        calls = running.join(REQUEST_TIMEOUT + GRACE)
        latencies.sort()
        res.update(
            kills=kills,
            requests=len(latencies) + len(errors),
            errors=len(errors),
            errors_per_kill=round(len(errors) / kills, 3) if kills else None,
            error_samples=errors[:3],
            hangs=sum(c.hung for c in calls),
            latency_p50_ms=round(1000 * latencies[len(latencies) // 2], 3) if latencies else None,
            latency_p99_ms=round(1000 * latencies[int(len(latencies) * 0.99)], 3)
            if latencies
            else None,
        )
        # Idle connections killed last are found when looked at: check() does.
        res["before_check"] = {"pool_size": pool.get_stats()["pool_size"], "live": admin.live(app)}
        res["check_hung"] = bounded(pool.check, REQUEST_TIMEOUT).hung
        res.update(settle(pool, server.dsn, app, size))
    finally:
        stop.set()
        admin.close()
        res["closed"] = close_pool(pool)
    return res


# ----------------------------------------------------------------------
# Scenario: the network silently stops forwarding, later heals


def _borrow(pool: Any, timeout: float, got: list[Any]) -> bool:
    got.append(pool.getconn(timeout=timeout))  # kept until all borrowers are done
    return True


def scenario_blackhole(
    server: Any,
    check: bool = False,
    heal: str = "resume",
    clients: int = 4,
    timeout: float = 1.0,
    after: int = 3,
    after_timeout: float = 5.0,
) -> dict[str, Any]:
    """The pool (2 to 4 connections) talks to the server through a `FaultProxy`.

    The proxy black-holes: `clients` clients each `getconn(timeout)` at the same time
    (and later give the connection back unused): the idle ones can be lent, the others
    cannot be opened; none may take longer than `timeout`. The network then
    heals: `heal="resume"` (the same connections work again) or `"strand"` (only new
    connections get through, the old ones stay silent for good). Then `after`
    requests, one by one, each with an `after_timeout` timeout, should all succeed.
    """
    app = f"faults-blackhole{'-check' if check else ''}-{heal}"
    res: dict[str, Any] = {"scenario": "blackhole", "check": check, "heal": heal}
    proxy = FaultProxy(server.port, lifetime=120.0)
    pool = make_pool(
        ConnectionPool,
        proxy.conninfo(server.dsn),
        app,
        check,
        min_size=2,
        max_size=4,
        timeout=timeout,
    )
    try:
        pool.open(wait=True, timeout=10.0)
        proxy.blackhole()
        got: list[Any] = []
        during = Running([functools.partial(_borrow, pool, timeout, got)] * clients).join(
            timeout + GRACE
        )
        for conn in got:
            pool.putconn(conn)
        proxy.resume(strand=heal == "strand")
        t_heal = time.monotonic()
        recovered_at = None
        later = []
        for _ in range(after):
            call = bounded(functools.partial(request, pool, after_timeout), after_timeout + GRACE)
            if call.ok and recovered_at is None:
                recovered_at = time.monotonic() - t_heal
            later.append(call)
        res.update(
            during=[c.summary() for c in during],
            during_got_connection=sum(c.ok for c in during),
            during_timed_out=sum(isinstance(c.error, psycopg_pool.PoolTimeout) for c in during),
            during_slowest=secs(max((c.elapsed or 0.0 for c in during if not c.hung), default=0)),
            hangs=sum(c.hung for c in during) + sum(c.hung for c in later),
            after=[c.summary() for c in later],
            after_ok=sum(c.ok for c in later),
            recovered_after_heal=secs(recovered_at),
        )
        if heal == "resume":
            res.update(settle(pool, server.dsn, app, None))
    finally:
        proxy.close()  # the silent sockets get an error: whatever still waits on them ends
        res["closed"] = close_pool(pool)
    return res


# ----------------------------------------------------------------------
# Scenario: the server accepts fewer connections than max_size


def scenario_max_connections(
    server: Any,
    max_connections: int = 6,
    max_size: int = 8,
    clients: int = 8,
    requests: int = 40,
) -> dict[str, Any]:
    """A server of its own with `max_connections` slots (none reserved), one of them
    taken by an admin connection: the pool (max_size `max_size`) can only get
    `max_connections - 1`. `clients` clients make `requests` requests each: none
    should fail. Then a pool with min_size `max_size` cannot fill: its `wait()`
    should say why.
    """
    del server  # this scenario needs a server of its own
    app = "faults-max-conn"
    res: dict[str, Any] = {
        "scenario": "max_connections",
        "max_connections": max_connections,
        "max_size": max_size,
        "available": max_connections - 1,
    }
    own = embedded_pg_class()(
        max_connections=max_connections, settings={"superuser_reserved_connections": "0"}
    )
    try:
        own.start()
        admin = Admin(own.dsn)  # holds its slot for the whole scenario
        pool = ConnectionPool(
            own.dsn, **pool_kwargs(app, min_size=2, max_size=max_size, timeout=REQUEST_TIMEOUT)
        )
        errors: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            for _ in range(requests):
                try:
                    request(pool, REQUEST_TIMEOUT, "SELECT pg_sleep(0.005)")
                except Exception as ex:
                    with lock:
                        errors.append(first_line(ex))

        try:
            pool.open(wait=True, timeout=10.0)
            running = Running([client] * clients)
            samples = []
            while not running.finished():
                stats = pool.get_stats()
                # pool_connecting is ours; upstream cannot tell attempts apart.
                real = stats["pool_size"] - stats.get("pool_connecting", 0)
                samples.append((stats["pool_size"], real, admin.live(app)))
                time.sleep(0.02)  # pacing the samples
            calls = running.join(REQUEST_TIMEOUT + GRACE)
            res.update(
                errors=len(errors),
                error_samples=errors[:3],
                hangs=sum(c.hung for c in calls),
                max_pool_size_seen=max((p for p, _, _ in samples), default=None),
                max_live_seen=max((n for _, _, n in samples), default=None),
                samples_pool_size_above_live=sum(p > n for p, _, n in samples),
                # A backend exists before its client knows it is connected, and lives
                # on a moment after the pool closed it: real <= live at every sample.
                samples_real_above_live=sum(r > n for _, r, n in samples),
                samples=len(samples),
                stats=pool.get_stats(),
            )
            res.update(settle(pool, admin, app, None))
        finally:
            res["closed"] = close_pool(pool)
        # A pool that cannot fill: min_size above what the server allows.
        wait_for(lambda: admin.live(app) == 0, 5.0)
        pool2 = ConnectionPool(own.dsn, **pool_kwargs(app + "-wait", min_size=max_size))
        pool2.open()
        call = bounded(functools.partial(pool2.wait, 2.0), 2.0 + 5.0)
        res["wait"] = call.summary()
        res["wait_message"] = str(call.error) if call.error is not None else None
        res["wait_says_too_many"] = "too many clients" in str(call.error)
        res["closed2"] = close_pool(pool2)
        admin.close()
    finally:
        own.cleanup()
    return res


# ----------------------------------------------------------------------
# Scenario: connections taken and never given back


def _leaker(pool: Any, taken: threading.Event, release: threading.Event) -> None:
    conn = pool.getconn()  # and never putconn(): a leak
    taken.set()
    release.wait(30.0)
    del conn  # the reference dies with the frame anyway; this says so


def scenario_leak(server: Any, leak_timeout: float | None = None, size: int = 4) -> dict[str, Any]:
    """`size` threads (leaker-0 first) take a connection each and never return it.

    A getconn then times out: its message should name the pool, say `size` of `size`
    in use and name the oldest holder. Then the leakers end without returning
    anything: once their connections are garbage-collected the pool should get its
    capacity back, with a WARNING (naming where they were taken, with `leak_timeout`).
    """
    app = f"faults-leak{'-tracked' if leak_timeout else ''}"
    res: dict[str, Any] = {"scenario": "leak", "leak_timeout": leak_timeout}
    pool = ConnectionPool(
        server.dsn,
        **pool_kwargs(app, min_size=size, max_size=size, timeout=1.0, leak_timeout=leak_timeout),
    )
    release = threading.Event()
    with LogRecorder().attached() as rec:
        try:
            pool.open(wait=True, timeout=10.0)
            threads = []
            t_first = time.monotonic()
            for i in range(size):
                taken = threading.Event()
                t = threading.Thread(
                    target=_leaker, args=(pool, taken, release), name=f"leaker-{i}", daemon=True
                )
                t.start()
                taken.wait(10.0)
                threads.append(t)
            if leak_timeout and IS_OURS:
                warned = wait_for(
                    lambda: any("has been out" in t for t in rec.texts()), leak_timeout + 2.0
                )
                res["held_warning_after"] = secs(time.monotonic() - t_first) if warned else None
            call = bounded(functools.partial(pool.getconn, 0.5), 0.5 + 5.0)
            message = str(call.error) if call.error is not None else ""
            res.update(
                timeout=call.summary(),
                message=message,
                names_pool=app in message,
                says_all_in_use=f"{size} of {size}" in message,
                names_holder="leaker-0" in message,
                names_where="_leaker" in message or "faults.py" in message,
            )
            if call.ok:
                pool.putconn(call.value)
            release.set()
            for t in threads:
                t.join(10.0)
            gc.collect()
            back = bounded(functools.partial(request, pool, 5.0), 5.0 + GRACE)
            res["served_after_drop"] = back.summary()
            res.update(settle(pool, server.dsn, app, size, timeout=3.0))
        finally:
            release.set()
            res["closed"] = close_pool(pool)
        texts = rec.texts(POOL_LOGGER)
    collected = [t for t in texts if "garbage" in t or "collected" in t]
    res.update(
        warnings=len(texts),
        held_too_long_warnings=sum("has been out" in t for t in texts),
        collected_warnings=len(collected),
        collected_warning_names_where=any("_leaker" in t for t in collected),
        held_warning_names_where=any("has been out" in t and "_leaker" in t for t in texts),
        warning_sample=texts[:1],
    )
    return res


# ----------------------------------------------------------------------
# Scenario: asyncio tasks cancelled while they use a connection, twice


def scenario_cancel_storm(
    server: Any, duration: float = 2.0, workers: int = 16, size: int = 4
) -> dict[str, Any]:
    """`workers` loops: start a task using a pooled connection, cancel it after a
    random moment, cancel it again a moment later (during its clean-up), wait for
    it (bounded). Nothing may be lost and nothing may hang."""
    app = "faults-cancel-storm"
    res: dict[str, Any] = {"scenario": "cancel_storm", "duration": duration, "workers": workers}
    with LogRecorder().attached() as rec:
        asyncio.run(_cancel_storm(server, app, duration, workers, size, res))
        res["warnings_pool"] = len(rec.texts(POOL_LOGGER))
        res["warnings_psycopg"] = len(rec.texts("psycopg"))
        res["warning_samples"] = sorted({t.split(":")[0][:80] for t in rec.texts()})[:4]
    return res


async def _cancel_storm(
    server: Any, app: str, duration: float, workers: int, size: int, res: dict[str, Any]
) -> None:
    pool = AsyncConnectionPool(
        server.dsn, **pool_kwargs(app, min_size=size, timeout=REQUEST_TIMEOUT)
    )
    counts = {"runs": 0, "cancelled": 0, "completed": 0, "errors": 0, "hangs": 0}
    errors: list[str] = []

    async def victim() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.005)")
            await conn.execute("SELECT 1")

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            task = asyncio.create_task(victim())
            await asyncio.sleep(rng.uniform(0.0, 0.012))  # pacing: when to cancel
            task.cancel()
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)  # let the clean-up start...
            task.cancel()  # ...and interrupt it
            done, _ = await asyncio.wait({task}, timeout=REQUEST_TIMEOUT)
            counts["runs"] += 1
            if not done:
                counts["hangs"] += 1
            elif task.cancelled():
                counts["cancelled"] += 1
            elif task.exception() is not None:
                counts["errors"] += 1
                errors.append(first_line(task.exception()))  # type: ignore[arg-type]
            else:
                counts["completed"] += 1

    try:
        await pool.open(wait=True, timeout=10.0)
        opened = pool.get_stats().get("connections_num", 0)
        await asyncio.gather(*(worker(i) for i in range(workers)))
        res.update(counts)
        res["error_samples"] = errors[:3]
        res.update(await asyncio.to_thread(settle, pool, server.dsn, app, size))
        # Every connection can be had at once: none is stuck half returned.
        conns = [await abounded(pool.getconn(5.0), 5.0 + GRACE) for _ in range(size)]
        res["all_lendable"] = all(c.ok for c in conns)
        for c in conns:
            if c.ok:
                await pool.putconn(c.value)
        res["reconnects"] = pool.get_stats().get("connections_num", 0) - opened
    finally:
        res["closed"] = await aclose_pool(pool)


# ----------------------------------------------------------------------
# As a program (bench/faults.py runs it with our interpreter and with upstream's)

SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "auth": scenario_auth,
    "refused": scenario_refused,
    "restart_idle": scenario_restart_idle,
    "restart_busy": scenario_restart_busy,
    "terminate": scenario_terminate,
    "blackhole": scenario_blackhole,
    "max_connections": scenario_max_connections,
    "leak": scenario_leak,
    "cancel_storm": scenario_cancel_storm,
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run one fault scenario; print its report as JSON.")
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--params", default="{}", help="the scenario's keyword arguments, as JSON")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    server = embedded_pg_class()()
    try:
        server.start()
        if args.scenario == "auth":
            with password_auth(server):
                res = scenario_auth(server, **params)
        else:
            res = SCENARIOS[args.scenario](server, **params)
    finally:
        server.cleanup()
    res["pool"] = "ours" if IS_OURS else "upstream"
    res["pool_version"] = getattr(psycopg_pool, "__version__", "?")
    res["params"] = params
    print(json.dumps(res), flush=True)
    # A client thread still hung in the pool must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
