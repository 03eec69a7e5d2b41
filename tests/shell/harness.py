"""What the torture tests check after every scenario, for both shells.

`Ledger` follows the connections in the hands of the test's clients: a connection
handed to a second client before the first gave it back, or a closed one, is a
violation recorded on the spot. `problems()` compares the fakes' tally, the core's
books, the pool's stats and the ledger, and returns what disagrees (an empty list
when all is well); the tests poll it until it is empty, since the pool finishes
some work (closing, refilling) in the background.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from psycopg import OperationalError

from psycopg_pool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
)
from psycopg_pool._core import state as st

from .fakes import FakeAsyncConnection, FakeConnection, Fakes

# The pool's own timeout used where a scenario wants it to expire while the pool is
# blocked somewhere else. It must expire: it is short, but the tests only wait on it.
SHORT = 0.1
# Bounds a failing test only; a passing one never waits for it.
PATIENCE = 5.0

# Counted over the session and printed by tests/shell/conftest.py.
TALLY: Counter[str] = Counter()


def outcome(error: BaseException | None, got: bool) -> str:
    """A client's outcome as a short name: "conn", "ok" or the exception class name."""
    if error is not None:
        return type(error).__name__
    return "conn" if got else "ok"


class Ledger:
    """Which connection each client of the test holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holding: dict[int, tuple[str, Any]] = {}
        self.handed = 0
        self.violations: list[str] = []

    def got(self, who: str, conn: Any) -> None:
        with self.lock:
            self.handed += 1
            if conn.closed:
                self.violations.append(f"{who} was handed the closed {conn!r}")
            other = self.holding.get(id(conn))
            if other is not None:
                self.violations.append(f"{conn!r} handed to {who} while {other[0]} holds it")
            self.holding[id(conn)] = (who, conn)

    def returning(self, conn: Any) -> None:
        with self.lock:
            self.holding.pop(id(conn), None)

    def held(self) -> set[int]:
        with self.lock:
            return set(self.holding)


def problems(pool: Any, fakes: Fakes, ledger: Ledger, *, settled: bool = True) -> list[str]:
    """What disagrees between the fakes, the core, the stats and the ledger.

    With `settled`, the pool must also have finished its background work: nothing
    connecting, checking or granted, nobody waiting, `min_size` reached if open.
    """
    core = pool._core
    with pool._lock:
        live = list(core.live)
        counts = core.counts()
        n_idle = len(core.idle)
        n_waiting = core.n_waiting
        books = (core.n_busy, core.n_checking, core.n_connecting + core.n_inline)
        is_open = core.status == st.OPEN
    stats = pool.get_stats()
    held = ledger.held()
    res = list(ledger.violations)

    # The core agrees with itself.
    if sum(counts.values()) != len(live):
        res.append(f"core: {counts} do not add up to {len(live)} live slots")
    if counts[st.IDLE] != n_idle:
        res.append(f"core: {counts[st.IDLE]} idle slots but {n_idle} in the idle deque")
    expected = (counts[st.IN_USE], counts[st.CHECKING], counts[st.CONNECTING])
    if books != expected:
        res.append(f"core: busy/checking/connecting counters {books}, slots say {expected}")

    # The fakes agree with the core: each open connection is either in a slot of the
    # pool (idle, being checked or cleaned, or granted to a client not woken yet: in
    # use, not lent) or held by a client, never both, and back.
    open_conns = {id(c): c for c in fakes.open_conns()}
    pooled = {id(s.conn): s for s in live if s.conn is not None}
    granted = sum(1 for s in pooled.values() if s.state == st.IN_USE)
    both = pooled.keys() & held
    if both:
        res.append(f"connections both in the pool and held by a client: {both}")
    lost = [c for k, c in open_conns.items() if k not in pooled and k not in held]
    if lost:
        res.append(f"LOST: open connections the pool forgot: {lost}")
    dead = [s for k, s in pooled.items() if k not in open_conns]
    if dead:
        res.append(f"slots holding closed connections: {dead}")
    if counts[st.IN_USE] != len(held) + granted:
        res.append(
            f"{counts[st.IN_USE]} connections in use for the core, clients hold {len(held)}"
            f" and {granted} are granted"
        )
    n_closed = fakes.closed
    if fakes.opened != counts[st.IN_USE] + counts[st.IDLE] + n_closed + counts[st.CHECKING]:
        res.append(
            f"opened {fakes.opened} != idle {counts[st.IDLE]} + in use {counts[st.IN_USE]}"
            f" + checking {counts[st.CHECKING]} + closed {n_closed}"
        )

    # The stats agree with the core and with themselves.
    if is_open:
        busy = len(live) - counts[st.IDLE]
        if stats["pool_size"] != len(live) or stats["pool_available"] != counts[st.IDLE]:
            res.append(f"stats {stats} disagree with the core {counts}")
        if stats["pool_size"] != stats["pool_available"] + busy:
            res.append(f"stats: pool_size != pool_available + {busy} busy: {stats}")
    if stats["requests_waiting"] != n_waiting:
        res.append(f"stats: requests_waiting {stats['requests_waiting']} != {n_waiting}")
    if stats.get("connections_errors", 0) != fakes.connect_errors:
        res.append(
            f"stats: connections_errors {stats.get('connections_errors', 0)}"
            f" != {fakes.connect_errors} failed connect() calls"
        )
    if stats.get("connections_num", 0) < fakes.connect_calls:
        res.append(f"stats: connections_num {stats.get('connections_num')} < connect() calls")

    if settled:
        busy_slots = counts[st.CONNECTING] + counts[st.CHECKING] + granted
        if busy_slots or n_waiting:
            res.append(f"not settled: {counts}, {n_waiting} waiting")
        if is_open and len(live) < core.min_size:
            res.append(f"not refilled: {len(live)} < min_size {core.min_size}")
    return res


# ----------------------------------------------------------------------
# The scenario table: where to block the pool, and what its victim may see

CANCELLED = "CancelledError"
TIMEOUT = "TimeoutError"
CLOSED = "PoolClosed"
POOL_TIMEOUT = "PoolTimeout"

# Clients waiting in the queue.
QUEUE = {
    "cancel": (CANCELLED,),
    "timeout": (TIMEOUT,),
    "pool_timeout": (POOL_TIMEOUT,),
    "interrupt": ("Interrupt",),  # sync: raised in the waiting thread
    "close": (CLOSED,),
}
# A connection attempt in the background while a client waits for it.
BG_CONNECT = {
    "cancel": (CANCELLED,),
    "timeout": (TIMEOUT,),
    "pool_timeout": (POOL_TIMEOUT,),
    "error": ("conn",),  # the next attempt serves it
    "interrupt": ("conn",),
    "close": (CLOSED,),
    "close_cancel": (CLOSED,),
}
# The client giving a connection back, blocked while the pool cleans it.
RETURN = {
    "cancel": (CANCELLED,),
    "timeout": (TIMEOUT,),
    "error": ("conn",),
    "interrupt": ("Interrupt",),
    "close": ("conn",),
}
# A client waiting while the pool cleans a returned connection in the background.
BG_RETURN = {**BG_CONNECT}
# getconn() blocked in the check before lending (a check callback, or a liveness
# check): a failed check gives the connection back and tries again.
LEND_CHECK = {
    "cancel": (CANCELLED,),
    "timeout": (TIMEOUT,),
    "pool_timeout": (POOL_TIMEOUT,),  # the check is cut at the client's deadline
    "error": ("conn",),  # given back, the next check passes
    "broken": ("conn",),  # thrown away, a new connection is made
    "interrupt": ("Interrupt",),
    "close": ("conn", CLOSED),
}
# pool.check() blocked checking a connection.
CHECK = {
    "cancel": (CANCELLED,),
    "timeout": (TIMEOUT,),
    "error": ("ok",),
    "interrupt": ("Interrupt",),
    "close": ("ok",),
}
# wait() / open(wait=True) while the pool connects.
WAIT = {
    "cancel": (CANCELLED,),
    "timeout": (TIMEOUT,),
    "wait_timeout": (POOL_TIMEOUT,),
    "interrupt": ("Interrupt",),
    "close": (CLOSED,),
}
# Background work nobody waits for.
BACKGROUND = {"error": ("ok",), "interrupt": ("ok",), "close": ("ok",), "close_cancel": ("ok",)}

# The steps of a connection attempt, in order ("close": configure failed).
CONNECT_STEPS = ("conninfo", "kwargs", "connect", "configure", "close")
CONNECT_CALLBACKS = ("conninfo", "kwargs", "configure")


@dataclass
class Spot:
    """How to get the pool blocked at one await point, and what the victim may see."""

    name: str
    reach: Callable[..., Any]
    expect: dict[str, tuple[str, ...]]
    pool: dict[str, Any] = field(default_factory=dict)


class Spots(dict[str, Spot]):
    """A table of spots, filled by decorating the functions that reach them."""

    def __call__(self, name: str, expect: dict[str, tuple[str, ...]], **pool: Any) -> Any:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            assert name not in self, name
            self[name] = Spot(name, fn, expect, pool)
            return fn

        return deco

    def scenarios(self, interruptions: set[str]) -> list[Any]:
        return [
            pytest.param(s, how, id=f"{s.name}-{how}")
            for s in self.values()
            for how in s.expect
            if how in interruptions
        ]


def victim_timeout(how: str) -> float | None:
    """The pool timeout of a victim: short when the interruption is its expiry."""
    return SHORT if how == "pool_timeout" else None


# ----------------------------------------------------------------------
# What the sync and async harnesses share


class ActorBase:
    """A task or thread of a test; records how it ended instead of raising."""

    done: Any

    def __init__(self, ctx: CtxBase, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.error: BaseException | None = None
        self.n_got = 0

    @property
    def result(self) -> str:
        return outcome(self.error, self.n_got > 0)


class ClientBase(ActorBase):
    """getconn() (or `pool.connection()`), use, hold until `go`, give back."""

    event: Callable[[], Any]

    def __init__(
        self,
        ctx: CtxBase,
        name: str,
        *,
        timeout: float | None = None,
        hold: bool = False,
        context: bool = False,
        tx: Any = None,
        raise_in_block: BaseException | None = None,
        close_instead: bool = False,
    ) -> None:
        super().__init__(ctx, name)
        self.timeout = timeout
        self.close_instead = close_instead  # conn.close() instead of putconn()
        self.context = context
        self.tx = tx  # a transaction status to leave the connection in
        self.raise_in_block = raise_in_block
        self.got = self.event()
        self.go = self.event()
        if not hold:
            self.go.set()
        self.conn: Any = None

    def _got(self, conn: Any) -> None:
        self.n_got += 1
        self.conn = conn
        self.ctx.ledger.got(self.name, conn)
        if self.tx is not None:
            conn.pgconn.transaction_status = self.tx
        self.got.set()

    def _used(self) -> None:
        if self.raise_in_block is not None:
            raise self.raise_in_block


class CtxBase:
    """One scenario: the pool, its fakes, the test's actors."""

    client_class: Any
    op_class: Any

    def __init__(self, pool: Any, fakes: Fakes) -> None:
        self.pool = pool
        self.fakes = fakes
        self.ledger = Ledger()
        self.actors: list[Any] = []

    def _started(self, actor: Any) -> Any:
        self.actors.append(actor)
        actor.start()
        return actor

    def client(self, name: str = "client", **kwargs: Any) -> Any:
        return self._started(self.client_class(self, name, **kwargs))

    def op(self, name: str, fn: Callable[[], Any]) -> Any:
        return self._started(self.op_class(self, name, fn))

    def closer(self, timeout: float = PATIENCE) -> Any:
        return self.op("closer", lambda: self.pool.close(timeout))

    def shut(self) -> bool:
        return bool(self.pool._core.status == st.SHUT)

    def let_go(self) -> None:
        """Open every gate and let every client give its connection back."""
        self.fakes.clear()
        for a in self.actors:
            if isinstance(a, ClientBase):
                a.go.set()

    def count_handouts(self) -> None:
        for a in self.actors:
            if a.n_got > 1:
                self.ledger.violations.append(f"{a.name} got {a.n_got} connections")

    def balanced(self, last: list[str]) -> bool:
        """True when the books balance; else `last` says what disagrees."""
        last[:] = problems(self.pool, self.fakes, self.ledger)
        return not last

    @staticmethod
    def unbalanced(last: list[str]) -> None:
        if any("LOST" in p for p in last):
            TALLY["lost"] += 1
        pytest.fail("the pool's books disagree:\n  " + "\n  ".join(last))

    def queued_count(self) -> int | None:
        """Requests queued so far; None if the next one may have to queue anyway
        (no idle connection: a null pool, a pool with min_size 0, or one whose idle
        connections are about to expire)."""
        core = self.pool._core
        with self.pool._lock:
            soon = time.monotonic() + 1.0
            if not any(s.expire_at > soon for s in core.idle):
                return None
        return int(self.pool.get_stats().get("requests_queued", 0))

    def served_at_once(self, queued: int | None, conn: Any) -> None:
        if queued is not None:
            assert self.pool.get_stats().get("requests_queued", 0) == queued, "had to wait"
        assert not conn.closed

    def all_closed(self) -> bool:
        return not self.fakes.open_conns()

    def counted(self) -> None:
        assert self.fakes.opened == self.fakes.closed
        assert not self.pool._core.live


def pool_for(
    fakes: Fakes,
    *,
    null: bool = False,
    callbacks: tuple[str, ...] = (),
    custom: Callable[[Fakes], dict[str, Any]] | None = None,
    **kwargs: Any,
) -> Any:
    """A pool of fakes, not open; `callbacks` names the user callbacks to install.

    Each callback passes through the point of the same name; the check callback
    also fails on a connection found closed, as a real check would. `custom`
    returns more pool arguments, made with the fakes.
    """
    cbs = {
        "configure": _callback(fakes, "configure"),
        "check": _callback(fakes, "check", check=True),
        "reset": _callback(fakes, "reset"),
        "reconnect_failed": _callback(fakes, "reconnect_failed", conn=False),
    }
    for name in callbacks:
        if name in cbs:
            kwargs[name] = cbs[name]
    if custom is not None:
        kwargs.update(custom(fakes))
    kwargs.setdefault("max_size" if null else "min_size", 1)
    kwargs.setdefault("timeout", PATIENCE)
    if fakes.asynchronous:
        cls: Any = AsyncNullConnectionPool if null else AsyncConnectionPool
        conn_class: Any = FakeAsyncConnection
    else:
        cls = NullConnectionPool if null else ConnectionPool
        conn_class = FakeConnection
    pool = cls(
        _callback(fakes, "conninfo", result="") if "conninfo" in callbacks else "",
        connection_class=conn_class,
        kwargs=(
            _callback(fakes, "kwargs", result={"fakes": fakes})
            if "kwargs" in callbacks
            else {"fakes": fakes}
        ),
        open=False,
        **kwargs,
    )
    # Reconnection attempts after a failure are retried at once, not after a second.
    pool._core.backoff.initial_delay = 0.001
    return pool


def _callback(
    fakes: Fakes, point: str, *, result: Any = None, check: bool = False, conn: bool = True
) -> Callable[..., Any]:
    """A user callback passing through `point`: sync or async like the fakes."""

    def after(*args: Any) -> Any:
        if check and args[0].closed:
            raise OperationalError("the connection is closed")
        return result

    if fakes.asynchronous:

        async def acb(*args: Any) -> Any:
            await fakes.ahit(point, args[0] if args and conn else None)
            return after(*args)

        return acb

    def cb(*args: Any) -> Any:
        fakes.hit(point, args[0] if args and conn else None)
        return after(*args)

    return cb
