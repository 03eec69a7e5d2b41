"""AsyncConnectionPool: the shell that runs the pool core and does its I/O.

The threaded twin is generated from this file by `tools/unasync.py`: keep to the
names it knows how to translate (see its table), and put anything that must
really differ between threads and asyncio in `_acompat.py`.

The shell's rules: the core is only ever called under `self._lock` (a plain lock
costs nothing uncontended, and makes the threaded twin correct); no `await` under
it; every command the core leaves in its outbox is executed after the lock is
released; all I/O goes through `_connector_async`.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from time import monotonic
from types import TracebackType
from typing import Any, Generic, cast

from psycopg import AsyncConnection, ProgrammingError
from psycopg.errors import ConnectionTimeout
from psycopg.pq import TransactionStatus
from typing_extensions import Self, TypeVar

from . import _config
from . import _connection_facts as facts
from . import _connector_async as connector
from . import _orphan_queries as orphan_queries
from ._acompat import (
    AsyncBackground,
    AsyncDeadlines,
    AsyncPoolMixin,
    AsyncReturningConnection,
    AsyncWaiter,
    AsyncWakeup,
    AsyncWatchdog,
    acancelled,
    acancelling,
    acheck_cancelled,
    aresolve,
    arun_now,
    asleep,
)
from ._core import state as core_state
from ._core.backoff import AttemptWithBackoff
from ._core.commands import (
    Close,
    Collect,
    Command,
    Connect,
    LeakSuspected,
    Log,
    Rearm,
    ReconnectFailed,
    Wake,
)
from ._core.state import INF, PoolCore, Slot
from ._core.stats import snapshot
from ._explain import (
    HOLDERS,
    capture_stack,
    describe_owner,
    error_text,
    fill_holders,
    init_failure_message,
    mask,
    oldest_holders,
    timeout_message,
    wait_timeout_message,
    where_taken,
)
from .base import BasePool
from .errors import PoolClosed, PoolTimeout, TooManyRequests

logger = logging.getLogger("psycopg.pool")
_INFO = logging.INFO
# The logger's own cache of isEnabledFor() answers, a dict that logging clears in
# place when levels change. Reading it is a C-level lookup; the Python-level call
# costs ~0.4 us per hand-off with a thousand tasks queued. Where there is no such
# cache, an empty dict sends every check to isEnabledFor(). (A disabled logger
# keeps its entries, but then logger.info() filters the record itself.)
_cache = getattr(logger, "_cache", None)
_LEVELS: dict[int, bool] = _cache if isinstance(_cache, dict) else {}

ACT = TypeVar("ACT", bound=AsyncConnection[Any], default=AsyncConnection[Any])

# Plain ints: comparing with an IntEnum member is measurably slower on the hot path.
_IDLE = int(TransactionStatus.IDLE)
_ACTIVE = int(TransactionStatus.ACTIVE)
_UNKNOWN = int(TransactionStatus.UNKNOWN)
_IN_USE = core_state.IN_USE


class AsyncConnectionPool(AsyncPoolMixin, BasePool, Generic[ACT]):
    """A pool of `AsyncConnection` objects, lent to one caller at a time."""

    _null = False

    def __init__(
        self,
        conninfo: str | Callable[[], Any] = "",
        *,
        connection_class: type[ACT] = cast(type[ACT], AsyncConnection),
        kwargs: dict[str, Any] | Callable[[], Any] | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: Callable[[ACT], Awaitable[None]] | None = None,
        check: Callable[[ACT], Awaitable[None]] | None = None,
        reset: Callable[[ACT], Awaitable[None]] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[Self], Any] | None = None,
        num_workers: int = 3,
        leak_timeout: float | None = None,
        alive_check_after: float | None = 0.05,
    ) -> None:
        _config.check_connection_class(connection_class, AsyncConnection)
        if close_returns and not self._null:
            # psycopg < 3.3 does not ask the pool in close(), and later versions skip
            # asking when the connection is already broken, so a broken connection
            # closed by its user (SQLAlchemy invalidating it) would never come back:
            # the default class is replaced by one that always asks.
            if connection_class is AsyncConnection:
                connection_class = cast(type[ACT], AsyncReturningConnection)
            elif not _config.PSYCOPG_CLOSE_RETURNS:
                raise TypeError(
                    "close_returns=True with a custom connection_class needs psycopg >= 3.3"
                )
        _config.check_conninfo(conninfo)
        _config.check_kwargs(kwargs)
        min_size, max_size = _config.check_sizes(min_size, max_size, null=self._null)
        self.name = _config.pool_name(name)
        num_workers = _config.check_num_workers(num_workers)
        for param, cb in (
            ("configure", configure),
            ("check", check),
            ("reset", reset),
            ("reconnect_failed", reconnect_failed),
        ):
            _config.check_callable(param, cb)

        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connection_class
        # Null pools close every connection handed back to them, so `conn.close()`
        # must really close: the option is accepted and ignored there.
        self.close_returns = bool(close_returns) and not self._null
        self._configure = configure
        self._check = check
        self._reset = reset
        self._reconnect_failed: Callable[[Any], Any] | None = reconnect_failed

        self._core = PoolCore(
            min_size=min_size,
            max_size=max_size,
            num_workers=num_workers,
            max_waiting=_config.check_int("max_waiting", max_waiting),
            max_lifetime=_config.check_seconds("max_lifetime", max_lifetime, positive=True),
            max_idle=_config.check_seconds("max_idle", max_idle, positive=True),
            reconnect_timeout=_config.check_seconds("reconnect_timeout", reconnect_timeout),
            null=self._null,
            name=self.name,
        )
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 (unlimited) or more, got {max_waiting}")
        self.timeout = _config.check_seconds("timeout", timeout)
        # Opt-in leak tracking: where each connection is taken is recorded, and one
        # held longer than this is reported. Off, it costs nothing on the hot path.
        if leak_timeout is not None:
            self._core.leak_timeout = _config.check_seconds(
                "leak_timeout", leak_timeout, positive=True
            )
        self._track = leak_timeout is not None
        self._slow_lend = self._track or check is not None
        # A connection idle longer than this is looked at before it is lent: a
        # non-blocking poll of its socket (no round trip) shows a server that closed
        # it (restart, idle timeout, pg_terminate_backend); only then is it checked.
        self._alive_after = (
            INF
            if alive_check_after is None
            else _config.check_seconds("alive_check_after", alive_check_after)
        )
        # Slots whose lent connection was garbage-collected without being returned:
        # (slot, its taken_at then, when).
        self._collected: deque[tuple[Slot, float, float]] = deque()
        # Reentrant only so that a lock round can be written out by hand safely (see
        # getconn()): its release() refuses a lock the thread does not hold.
        self._lock = threading.RLock()
        self._bg: AsyncBackground | None = None
        self._wakeup = AsyncWakeup()
        self._deadlines = AsyncDeadlines(weakref.ref(self))
        self._hk_finalizer: weakref.finalize[Any, Any] | None = None
        self._watchdog = AsyncWatchdog()
        self._stopping = False
        self._open_implicit = False

        _live_pools.add(self)
        if open is None:
            self._open_implicit = True
            self._open_now()
        elif open:
            self._ctor_open_warning(open)
            self._open_now()

    def __repr__(self) -> str:
        cls = type(self)
        return f"<{cls.__module__}.{cls.__qualname__} {self.name!r} at 0x{id(self):x}>"

    # ------------------------------------------------------------------
    # Settings that live in the core

    @property
    def min_size(self) -> int:
        return self._core.min_size

    @property
    def max_size(self) -> int:
        return self._core.max_size

    @property
    def closed(self) -> bool:
        return self._core.status != core_state.OPEN

    max_waiting: _config.CoreSetting[int] = _config.CoreSetting()
    max_lifetime: _config.CoreSetting[float] = _config.CoreSetting()
    max_idle: _config.CoreSetting[float] = _config.CoreSetting()
    reconnect_timeout: _config.CoreSetting[float] = _config.CoreSetting()
    num_workers: _config.CoreSetting[int] = _config.CoreSetting()

    # ------------------------------------------------------------------
    # Opening and closing

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Start the pool (again, if it was closed); with `wait`, until it is filled."""
        if self._core.status != core_state.OPEN:
            self._open_now()
        if wait:
            await self.wait(timeout)

    def _open_now(self) -> None:
        with self._lock:
            core = self._core
            if core.status == core_state.OPEN:
                return
            bg = AsyncBackground(self.name, core.num_workers)
            bg.start(type(self).__name__)
            self._bg = bg
            self._stopping = False
            self._start_housekeeper(bg)
            core.open(monotonic())
            cmds = self._swap_out()
        self._execute(cmds)

    def _start_housekeeper(self, bg: AsyncBackground) -> None:
        """Start the housekeeper, with a wake-up and client deadlines of its own."""
        old = self._wakeup
        self._wakeup = wakeup = AsyncWakeup()
        self._deadlines = AsyncDeadlines(weakref.ref(self))
        bg.daemon(f"{self.name}-scheduler", _housekeeper, weakref.ref(self), wakeup)
        # Wake the housekeeper when the pool goes away, so that it notices and ends;
        # one that is replaced ends by itself (it is no longer the pool's).
        if self._hk_finalizer is not None:
            self._hk_finalizer.detach()
        self._hk_finalizer = weakref.finalize(self, wakeup.set)
        # A housekeeper left in a loop that stopped ends as soon as that loop runs
        # again (close() may wait for it there).
        old.set_threadsafe()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the pool: waiting clients get PoolClosed, idle connections are closed.

        Connections in use are closed when they are returned.
        """
        with self._lock:
            out = [s for s in self._core.live if s.state == core_state.IN_USE]
            if not self._core.close(monotonic()):
                return
            cmds = self._swap_out()
        if self._track:
            for slot in out:
                self._report_unreturned(slot)
        self._execute(cmds)
        await self._stop_background(timeout)

    async def _stop_background(self, timeout: float) -> None:
        bg, self._bg = self._bg, None
        self._stopping = True
        self._wakeup.set()
        if bg is None:
            return
        for name in await bg.stop(timeout):
            logger.warning(
                "couldn't stop %r within %s sec: background work still running", name, timeout
            )

    async def __aenter__(self) -> Self:
        self._open_implicit = False
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait(self, timeout: float = 30.0) -> None:
        """Wait until the pool holds `min_size` idle connections.

        If that does not happen within `timeout`, close the pool and raise PoolTimeout.
        """
        if self._open_implicit:
            self._warn_implicit()
        self._check_open()
        logger.info("waiting for pool %r initialization", self.name)
        ticket = AsyncWaiter(monotonic() + timeout)
        with self._lock:
            ready = self._core.wait_ready(ticket, monotonic())
            cmds = self._swap_out()
        self._execute(cmds)
        if not ready:
            woken = False
            if ticket.tstate != core_state.T_FAILED:  # else it failed already: no waiting
                try:
                    woken = await ticket.wait()
                finally:
                    with self._lock:
                        self._core.withdraw_ready(ticket)
            if ticket.error is not None and ticket.error.kind == core_state.F_CONNECT:
                with self._lock:
                    ex = PoolTimeout(init_failure_message(self.name, self._core, monotonic()))
                await self.close()
                if isinstance(ticket.error.cause, BaseException):
                    raise ex from ticket.error.cause
                raise ex
            if ticket.error is not None:
                raise PoolClosed(f"the pool {self.name!r} is closed")
            if not woken:
                with self._lock:
                    msg = wait_timeout_message(self.name, timeout, self._core, monotonic())
                    cause = self._core.last_error if self._core.backoff.failing else None
                await self.close()
                if isinstance(cause, BaseException):
                    raise PoolTimeout(msg) from cause
                raise PoolTimeout(msg)
        logger.info("pool %r is ready to use", self.name)

    def _check_open(self) -> None:
        status = self._core.status
        if status == core_state.NEW:
            raise PoolClosed(f"the pool {self.name!r} is not open yet")
        if status != core_state.OPEN:
            raise PoolClosed(f"the pool {self.name!r} is already closed")

    # ------------------------------------------------------------------
    # Lending connections

    def connection(self, timeout: float | None = None) -> _AsyncConnectionContext[ACT]:
        """`async with pool.connection() as conn:` borrow a connection for the block.

        The transaction is committed (or rolled back on error) at the end of the
        block, then the connection goes back to the pool.
        """
        # Made without calling the class: an `__init__` run from C costs a frame of
        # its own, a tenth of a checkout without a query.
        ctx: _AsyncConnectionContext[ACT] = _new_object(_AsyncConnectionContext)
        ctx._pool = self
        ctx._timeout = timeout
        return ctx

    async def getconn(self, timeout: float | None = None) -> ACT:
        """Take a connection from the pool; give it back with `putconn()`."""
        if self._open_implicit:
            self._warn_implicit()
        info = _LEVELS.get(_INFO)
        if info is None:
            info = logger.isEnabledFor(_INFO)
        if info:
            logger.info("connection requested from %r", self.name)
        now = monotonic()
        core = self._core
        slot: Slot | None = None
        ticket: AsyncWaiter = None  # type: ignore[assignment]  # bound once queued
        taken_at = now  # when the slot was taken: see _abandon()
        # Whatever stops this call before the connection is handed over (an exception
        # from a signal handler, a worker that cannot start) must not keep the slot or
        # the queued request: see _abandon(). The slow path gives back the slots it
        # takes itself.
        lock = self._lock
        try:
            # acquire/release rather than `with`: 0.2 us cheaper per round. The acquire
            # is inside the `try`: an exception raised by a signal handler as it returns
            # (they run there) must not leave the lock held, as it would after a bare
            # `lock.acquire()`. `with` is safe from that, at twice the cost.
            try:
                lock.acquire()
                slot = core.take(now)
                if slot is None:
                    # Under load, the usual case: queue in the same lock round.
                    timeout = limit = self.timeout if timeout is None else timeout
                    ticket = AsyncWaiter(now + limit)
                    res = core.request(ticket, now, limit > 0)
                # Take the outbox only if it has something: an empty one stays the
                # core's, and must not be looked at once the lock is released (another
                # thread may be filling it by then, and would execute the same commands).
                cmds = core.out
                if cmds:
                    core.out = []
                else:
                    cmds = _NO_COMMANDS
            finally:
                try:
                    lock.release()
                except RuntimeError:  # acquire() itself was interrupted: not ours
                    pass
            if cmds:
                self._execute(cmds)
            if slot is None:
                # Queued, the usual case under load, is waited for in this frame; the
                # rest (not queued, timed out, failed) below.
                if res == _QUEUED and await ticket.wait(self._deadlines):
                    # Granted, the slot is ours already (None: the request failed).
                    # Up to `slot`, _abandon() finds the grant through the ticket, from
                    # `taken_at` on by it; in between no call, so no signal handler.
                    slot = ticket.slot
                    if slot is None:
                        raise self._not_served(ticket, limit)
                    taken_at = slot.taken_at
                    # Granted fresh from use (or from connecting): nothing to look at
                    # unless the pool checks every connection it lends.
                    slow = self._slow_lend
                else:
                    slot = await self._wait_ticket(ticket, res, now, limit, None)
                    taken_at = slot.taken_at
                    slow = self._slow_lend or taken_at - slot.idle_since > self._alive_after
            else:
                slow = self._slow_lend or now - slot.idle_since > self._alive_after
            if slow:
                return await self._getconn_slow(slot, now, timeout)
            conn: ACT = slot.conn
            if info:
                logger.info("connection given by %r", self.name)
            conn._pool = self
            # While lent, the client holds the only strong reference (see _adopt()).
            slot.conn = None
            return conn
        except BaseException:
            self._abandon(slot, ticket, taken_at, now)
            raise

    def _abandon(
        self, slot: Slot | None, ticket: AsyncWaiter | None, taken_at: float, t0: float
    ) -> None:
        """getconn() fails before handing its connection over: give back what it has.

        `slot` is the one it took at `taken_at`, `ticket` its queued request (which
        may have been granted meanwhile: then the slot is passed on). A slot still in
        use since `taken_at` is this call's own: given back (by the slow path) and lent
        again, it would have been taken at another time.
        """
        if slot is None:
            if ticket is None:
                return
            tstate = ticket.tstate
            if tstate == core_state.T_WAITING or tstate == core_state.T_GRANTED:
                self._withdraw(ticket, t0)
                return
            if tstate != core_state.T_DONE or ticket.slot is None:
                return
            slot = ticket.slot  # accepted, and handed nowhere since
            if slot.inline and slot.state == core_state.CONNECTING:
                # A null pool's place to connect in, stopped before the attempt began.
                self._inline_failed(slot, False, sys.exc_info()[1])
                return
            taken_at = slot.taken_at
        if slot.state == core_state.IN_USE and slot.taken_at == taken_at:
            self._give_back_held(slot)

    def _give_back_held(self, slot: Slot) -> None:
        """Give back a slot taken by a client that is failing, lent or not."""
        # Lent, the connection is only weakly referenced by the slot; it is still alive
        # in the failing frame.
        conn = slot.conn if slot.conn is not None else slot.wref()
        if conn is not None:
            self._give_back(slot, conn, "connections_lost")

    def _lend(self, slot: Slot) -> ACT:
        """Hand `slot`'s connection to the calling client (the slow path's way)."""
        conn: ACT = slot.conn
        slot.conn = None
        if self._track:
            slot.trace = capture_stack()
            if slot.taken_at + self._core.leak_timeout < self._core.sleep_until:
                self._wakeup.set()  # the housekeeper must be awake to report it on time
        conn._pool = self
        return conn

    async def _getconn_slow(self, slot: Slot, t0: float, timeout: float | None) -> ACT:
        """Lend `slot` once it passes its check; on failure, ask again until the deadline."""
        # Whatever raises while a slot is held (not given back) gives it back.
        holding = True
        outer = sys.exc_info()[1]  # being handled by the caller (see acheck_cancelled)
        try:
            if timeout is None:
                timeout = self.timeout
            deadline = t0 + timeout
            failures = 0
            check_error: Exception | None = None
            while True:
                conn = self._lend(slot)
                if self._check is None and slot.taken_at - slot.idle_since <= self._alive_after:
                    # Nothing to check (the common case after a wait): skip the call.
                    logger.info("connection given by %r", self.name)
                    return conn
                try:
                    await self._check_before_lending(slot, conn, deadline)
                    logger.info("connection given by %r", self.name)
                    return conn
                except Exception as ex:
                    logger.info("connection failed check: %s", error_text(ex))
                    check_error = ex
                    healthy = self._give_back(slot, conn, "connections_lost")
                    holding = False
                    acheck_cancelled(ex, outer)
                failures += 1
                # A dead connection is replaced and the next one tried at once; only a
                # check that fails on healthy connections (a broken callback) backs off.
                if healthy and failures > 1:
                    remaining = deadline - monotonic()
                    knobs = AttemptWithBackoff
                    delay = knobs.INITIAL_DELAY * knobs.DELAY_BACKOFF ** (failures - 2)
                    delay *= 1.0 + knobs.DELAY_JITTER * (2.0 * self._core.rng.random() - 1.0)
                    if delay >= remaining:
                        raise self._timeout_error(timeout, check_error)
                    await asleep(delay)
                slot = await self._wait_slot(t0, timeout, check_error)
                holding = True
        except BaseException:
            if holding:
                self._give_back_held(slot)
            raise

    async def _check_before_lending(self, slot: Slot, conn: ACT, deadline: float) -> None:
        """Run the check the connection needs before it is lent; raise if it fails.

        A connection idle for a while is first polled,
        without a round trip: if the server wrote to it (most likely to say
        goodbye), it gets a real check even when the pool has no `check` callback.
        """
        check = self._check
        if check is None:
            if not (slot.taken_at - slot.idle_since > self._alive_after and facts.has_input(conn)):
                return
            check = self.check_connection
        # Bounded by the client's deadline: past it the connection is cut and the check
        # fails (a silent network would otherwise block it for minutes).
        guard = self._watchdog.arm(conn, deadline - monotonic())
        try:
            await check(conn)
        finally:
            self._watchdog.disarm(guard)

    def _timeout_error(self, timeout: float, check_error: Exception | None = None) -> PoolTimeout:
        now = monotonic()
        with self._lock:
            msg = timeout_message(self.name, timeout, self._core, now, check_error)
            holders = oldest_holders(self._core) if HOLDERS in msg else []
            self._core.sample("timeout", timeout)
        ex = PoolTimeout(msg)
        if holders:
            ex._complete = lambda: fill_holders(msg, holders, now)
        return ex

    def _connect_error(self, ticket: AsyncWaiter, timeout: float) -> PoolTimeout:
        """Connecting fails for good: say why at once, with the server's error as cause."""
        assert ticket.error is not None
        cause = ticket.error.cause
        ex = self._timeout_error(timeout)
        if isinstance(cause, BaseException):
            ex.__cause__ = cause
        return ex

    async def _wait_slot(self, t0: float, timeout: float, check_error: Exception | None) -> Slot:
        """Ask again after a failed check: queue, or connect inline (null pools)."""
        ticket = AsyncWaiter(t0 + timeout)
        try:
            with self._lock:
                now = monotonic()
                # Past the deadline (checks took the time): an idle connection or nothing.
                res = self._core.request(ticket, now, t0 + timeout > now)
                cmds = self._swap_out()
            self._execute(cmds)
            return await self._wait_ticket(ticket, res, t0, timeout, check_error)
        except BaseException:
            self._abandon(None, ticket, 0.0, t0)
            raise

    async def _wait_ticket(
        self,
        ticket: AsyncWaiter,
        res: int,
        t0: float,
        timeout: float,
        check_error: Exception | None,
    ) -> Slot:
        """Wait for the outcome of a request that take() could not serve.

        Also where getconn() ends a wait of its own that timed out: `wait()` then
        returns at once.
        """
        if res != _QUEUED:
            return await self._not_queued(res, ticket, timeout, check_error)
        try:
            if await ticket.wait(self._deadlines):
                slot = ticket.slot  # granted: ours already
                if slot is not None:
                    return slot
                raise self._not_served(ticket, timeout)
        except BaseException:
            if ticket.tstate != core_state.T_FAILED:
                self._withdraw(ticket, t0)
            raise
        # Timed out. Granted since the timer fired, the slot is passed on: the client
        # was told it waited too long, and the next one is served.
        self._withdraw(ticket, t0)
        raise self._timeout_error(timeout, check_error)

    def _not_served(self, ticket: AsyncWaiter, timeout: float) -> Exception:
        """What a woken client gets whose request failed instead of being served."""
        if ticket.error is not None and ticket.error.kind == core_state.F_CONNECT:
            return self._connect_error(ticket, timeout)
        return PoolClosed(f"the pool {self.name!r} is closed")

    async def _not_queued(
        self, res: int, ticket: AsyncWaiter, timeout: float, check_error: Exception | None
    ) -> Slot:
        """The other outcomes of a request that take() could not serve."""
        if res == core_state.GOT:
            assert ticket.slot is not None
            return ticket.slot
        if res == core_state.FAILING:
            raise self._connect_error(ticket, timeout)
        if res == core_state.INLINE:
            return await self._connect_inline(ticket, ticket.deadline)
        if res == core_state.TOO_MANY:
            raise TooManyRequests(
                f"the pool {self.name!r} has already {self._core.n_waiting} requests waiting"
            )
        if res == core_state.NO_WAIT:
            raise self._timeout_error(timeout, check_error)
        self._check_open()
        raise AssertionError(f"unexpected request outcome {res}")

    def _withdraw(self, ticket: AsyncWaiter, t0: float) -> None:
        now = monotonic()
        with self._lock:
            self._core.withdraw(ticket, now, int(1000.0 * (now - t0)))
            cmds = self._swap_out()
        self._execute(cmds)

    async def _connect_inline(self, ticket: AsyncWaiter, deadline: float) -> Slot:
        """Null pools: the caller opens its own connection, bounded by its deadline."""
        slot = ticket.slot
        assert slot is not None
        attempt: connector.AsyncConnectAttempt | None = None
        conn: ACT | None = None
        try:
            timeout = max(round(deadline - monotonic()), 1)
            attempt = connector.AsyncConnectAttempt()
            conn = await attempt.run(self, {"connect_timeout": timeout})
            self._adopt(slot, conn)
            with self._lock:
                self._core.connected(slot, conn, monotonic(), attempt.ms)
                cmds = self._swap_out()
            self._execute(cmds)
        except BaseException as ex:
            if slot.state == core_state.CONNECTING:  # failed, or stopped before connected()
                self._inline_failed(slot, attempt is not None and attempt.connect_failed, ex)
                if conn is not None:  # opened all the same: close it in the background
                    slot.conn = conn
                    self._spawn(self._close_job, slot)
            if isinstance(ex, ConnectionTimeout):
                raise PoolTimeout(str(ex)) from None
            raise
        if slot.state != core_state.IN_USE:  # the pool was closed meanwhile
            raise PoolClosed(f"the pool {self.name!r} is already closed")
        return slot

    def _inline_failed(self, slot: Slot, counted: bool, cause: BaseException | None) -> None:
        """A null pool's client did not get its own connection: free its place."""
        with self._lock:
            self._core.connect_failed(slot, monotonic(), counted, cause)
            cmds = self._swap_out()
        self._execute(cmds)

    # ------------------------------------------------------------------
    # Taking connections back

    async def putconn(self, conn: ACT) -> None:
        """Give back a connection obtained with `getconn()`."""
        if not self._put_back(conn):
            await self._putconn_slow(conn)

    def _put_back(self, conn: ACT) -> bool:
        """putconn() up to the first I/O: False if `_putconn_slow()` must follow.

        A plain function, so that `connection()` gives back without a coroutine.
        """
        pool = getattr(conn, "_pool", None)
        if pool is not self:
            self._foreign(conn, pool)
            return True
        info = _LEVELS.get(_INFO)
        if info is None:
            info = logger.isEnabledFor(_INFO)
        if info:
            logger.info("returning connection to %r", self.name)
        slot: Slot = conn._pool_slot  # type: ignore[attr-defined]
        if (slot.state != _IN_USE or slot.orphaned) and self._put_back_odd(slot, conn):
            return True
        if conn.pgconn.transaction_status != _IDLE or self._reset is not None:
            return False
        taken_at = slot.taken_at
        core = self._core
        lock = self._lock
        ticket: Any = _PENDING
        cmds = _NO_COMMANDS
        # Once started, the return completes even if something raises on the way (a
        # signal handler's exception, as a call returns): see _put_back_anyway().
        try:
            slot.conn = conn
            conn._pool = None
            try:
                lock.acquire()  # in the `try`: see getconn()
                ticket = core.release(slot, monotonic())
                cmds = core.out
                if cmds:
                    core.out = []
                else:
                    cmds = _NO_COMMANDS  # see getconn(): never the core's own list
            finally:
                try:
                    lock.release()
                except RuntimeError:  # see getconn()
                    pass
            if ticket is not None:
                ticket.wake()
            if cmds:
                self._execute(cmds, slot)
        except BaseException:
            self._put_back_anyway(slot, conn, taken_at, ticket, cmds)
            raise
        return True

    def _put_back_anyway(
        self, slot: Slot, conn: ACT, taken_at: float, ticket: Any, cmds: list[Command]
    ) -> None:
        """Finish a `_put_back()` that something interrupted, from where it stopped."""
        with self._lock:
            if ticket is _PENDING:  # release() did not return: how far did it get?
                if slot.state == core_state.IN_USE and slot.taken_at == taken_at:
                    # Not released (in use since this client took it): release it now.
                    slot.conn = conn
                    conn._pool = None
                    ticket = self._core.release(slot, monotonic())
                elif slot.state == core_state.IN_USE:
                    # Released, maybe granted to a waiter not woken yet (a grant is a
                    # hand-over: in use since another time). Waking one twice is a no-op.
                    ticket = slot.ticket
                else:
                    ticket = None  # released
            # (Stopped before taking the outbox, `cmds` is the core's own list.)
            cmds = self._swap_out() if cmds is self._core.out else cmds + self._swap_out()
        if ticket is not None:
            ticket.wake()  # a second wake is a no-op
        self._execute(cmds, slot)  # what it had not carried out yet

    def _put_back_odd(self, slot: Slot, conn: ACT) -> bool:
        """A connection comes back that the garbage collector took for dropped.

        A generator abandoned in a `connection()` block (a streaming response whose
        client went away) is closed by its finalizer, which runs after the collector
        cleared the weak references to its garbage: the connection comes back with
        its weak reference dead. If the pool has not given it up yet (see _reap()),
        it gets a new one and the return goes on (False); else it is closed (True).
        """
        if slot.state != _IN_USE:
            logger.info("closing a connection of %r returned after it was replaced", self.name)
            conn._pool = None
            slot.conn = conn
            self._close_now(slot)
            return True
        where = where_taken(slot)
        logger.warning(
            "a connection of pool %r was given back only when the garbage collector"
            " finalized what held it (an abandoned generator?)%s",
            self.name,
            where,
        )
        self._adopt(slot, conn)
        return False

    def _put_back_later(self, conn: ACT) -> None:
        """Give back a connection that a cancellation leaves in a transaction.

        The rollback the block's exit owes runs in the background. Run here, it would
        be interrupted by a cancellation that fires again (anyio's cancel scopes do,
        each time the task waits, until the scope is left), and psycopg would close
        the connection: one reconnection per cancelled request. (A connection psycopg
        closed already, cancelled again while it cancelled a query, may have left that
        query running: see _orphan_queries.)
        """
        if logger.isEnabledFor(_INFO):
            logger.info("returning connection to %r", self.name)
        slot: Slot = conn._pool_slot  # type: ignore[attr-defined]
        if (slot.state != _IN_USE or slot.orphaned) and self._put_back_odd(slot, conn):
            return
        if conn.pgconn.transaction_status == _UNKNOWN:
            orphan_queries.cancel(conn, self.name)  # closed by psycopg mid-query, maybe
        if self._null and not self._core.n_waiting:
            # As in _putconn_slow(): nobody will reuse it, close it without cleaning.
            slot.conn = conn
            conn._pool = None
            self._discard(slot, None)
            return
        self._give_back(slot, conn, "returns_bad", quiet=True)

    def _foreign(self, conn: Any, pool: Any) -> None:
        if pool is _FORKED:
            # Taken before this process was forked: the connection belongs to the
            # parent, its socket here is a dead end (see _after_fork). Drop it quietly.
            conn._pool = None
            return
        if pool is None:
            raise ValueError(
                f"can't return connection to pool {self.name!r}, it doesn't come from any pool:"
                f" {conn}"
            )
        raise ValueError(
            f"can't return connection to pool {self.name!r}, it comes from pool"
            f" {pool.name!r}: {conn}"
        )

    async def _putconn_slow(self, conn: ACT) -> None:
        """The rest of putconn() for a connection that needs I/O (or closing)."""
        slot: Slot = conn._pool_slot  # type: ignore[attr-defined]
        taken_at = slot.taken_at
        spawned = False
        # Once started, the return completes even if something raises on the way: a
        # connection not cleaned yet is closed and replaced (see the except clause).
        try:
            slot.conn = conn
            conn._pool = None
            status = conn.pgconn.transaction_status
            # Closed by psycopg as the task was cancelled again mid-query?
            orphaned = status == _UNKNOWN and acancelling()
            if orphaned:
                orphan_queries.cancel(conn, self.name)  # see _put_back_later()
            if self._core.status != core_state.OPEN:
                self._discard(slot, None)  # closing it is all there is left to do
                return
            if status == _UNKNOWN:
                # (psycopg has warned about an orphaned one: see _give_back())
                log = logger.info if orphaned else logger.warning
                log("discarding closed connection: %s", conn)
                self._discard(slot, "returns_bad")
                self._sweep_idle(conn)
                return
            if self._null and not self._core.n_waiting:
                # Nobody will reuse it: no point in rolling back a connection about to close.
                self._discard(slot, None)
                return
            with self._lock:
                self._core.begin_io(slot, monotonic())
            if self._reset is not None or acancelling():
                # In the background: a reset is the user's code, and a task being
                # cancelled may be cancelled again whenever it waits (see _put_back_later).
                # (The pool may have been closed since the check above, in another
                # thread: _spawn() then runs the job here.)
                self._spawn(self._clean_job, slot, conn, "returns_bad")
                spawned = True
            else:
                await self._clean_job(slot, conn, "returns_bad")
        except BaseException:
            # Neither discarded nor cleaned (a clean job that ended released or
            # discarded it; lent again, it would have been taken at another time).
            state = slot.state
            if (
                not spawned
                and slot.taken_at == taken_at
                and (state == core_state.IN_USE or state == core_state.CHECKING)
            ):
                self._discard(slot, None)
            raise

    def _give_back(self, slot: Slot, conn: ACT, counter: str, quiet: bool = False) -> bool:
        """Return a connection, never awaiting.

        Used where the caller is failing (a failed check, a cancellation): any I/O
        the connection needs is done in the background, `quiet` if a rollback is
        expected. Returns False if the connection was found broken.
        """
        slot.conn = conn
        conn._pool = None
        status = conn.pgconn.transaction_status
        if status == _UNKNOWN:
            # INFO, not upstream's WARNING: closed by psycopg, which has warned already
            # (a cancellation it could not finish), or found broken by a failed check.
            logger.info("discarding closed connection: %s", conn)
            self._discard(slot, counter)
            self._sweep_idle(conn)
            return False
        if status == _IDLE and self._reset is None:
            self._release(slot)
            return True
        with self._lock:
            self._core.begin_io(slot, monotonic())
        bg = self._bg  # read once: close() in another thread sets it to None
        if bg is not None:
            bg.spawn(self._clean_job, slot, conn, counter, quiet)
        else:
            self._discard(slot, counter)
        return True

    async def _clean_job(self, slot: Slot, conn: ACT, counter: str, quiet: bool = False) -> None:
        ok = False
        try:
            ok = await connector.clean(self, conn, conn.pgconn.transaction_status, quiet)
        finally:
            # Also on cancellation: the connection is closed and replaced, never lost.
            if ok:
                self._release(slot)
            else:
                if counter == "returns_bad":
                    logger.warning("discarding closed connection: %s", conn)
                else:
                    logger.info("discarding closed connection: %s", conn)
                self._discard(slot, counter)

    def _sweep_idle(self, dead: Any) -> None:
        """A connection was found broken: look at the idle ones, which may be too.

        After a server restart or failover every idle connection is dead: find them
        now, without a round trip each (a closed socket is readable), and replace
        them all at once rather than lending them one by one to clients. A broken
        connection that says its server became read-only means a failover: drain.
        """
        if facts.read_only_error(dead) and facts.wants_read_write(self):
            logger.warning("pool %r: the server is now read-only: draining", self.name)
            with self._lock:
                self._core.drain(monotonic())
                cmds = self._swap_out()
            self._execute(cmds)
            return
        with self._lock:
            # The connections too: a slot may be lent (its `conn` cleared) meanwhile.
            idle = [(slot, slot.conn) for slot in self._core.idle]
        gone = [slot for slot, conn in idle if facts.has_input(conn)]
        if not gone:
            return
        logger.info("pool %r: %d idle connections closed by the server", self.name, len(gone))
        with self._lock:
            now = monotonic()
            for slot in gone:
                self._core.evict(slot, now)
            cmds = self._swap_out()
        self._execute(cmds)

    def _release(self, slot: Slot) -> None:
        ticket = None
        cmds = _NO_COMMANDS
        try:
            with self._lock:
                ticket = self._core.release(slot, monotonic())
                cmds = self._swap_out()
            if ticket is not None:
                ticket.wake()
            self._execute(cmds, slot)
        except BaseException:
            # Released: its waiter must still be woken, and the commands carried out.
            if ticket is not None:
                ticket.wake()
            self._execute(cmds, slot)
            raise

    def _discard(self, slot: Slot, counter: str | None) -> None:
        with self._lock:
            self._core.discard(slot, monotonic(), counter)
            cmds = self._swap_out()
        self._execute(cmds, slot)

    # ------------------------------------------------------------------
    # Maintenance

    async def check(self) -> None:
        """Check every idle connection now; replace the broken ones."""
        if self._null:
            return
        with self._lock:
            slots = self._core.begin_check(monotonic())
            cmds = self._swap_out()
        self._execute(cmds)
        pending = list(reversed(slots))
        try:
            while pending:
                slot = pending.pop()
                conn = slot.conn
                try:
                    await self.check_connection(conn)
                except Exception:
                    logger.warning("discarding broken connection: %s", conn)
                    self._discard(slot, "connections_lost")
                except BaseException:
                    self._discard(slot, "connections_lost")
                    raise
                else:
                    self._release(slot)
        finally:
            for slot in pending:  # interrupted: put the unchecked ones back as they were
                self._release(slot)

    @staticmethod
    async def check_connection(conn: ACT) -> None:
        """A `check` callback that runs an empty query; raises if the connection is dead."""
        await connector.check_connection(conn)

    async def drain(self) -> None:
        """Replace every connection: idle ones now, the ones in use when they return."""
        with self._lock:
            self._core.drain(monotonic())
            cmds = self._swap_out()
        self._execute(cmds)

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool size; growing happens now, shrinking as connections idle."""
        min_size, max_size = _config.check_sizes(min_size, max_size, null=self._null)
        logger.info("resizing %r to min_size=%s max_size=%s", self.name, min_size, max_size)
        with self._lock:
            self._core.resize(min_size, max_size, monotonic())
            cmds = self._swap_out()
        self._execute(cmds)

    def get_stats(self) -> dict[str, int]:
        """The pool's gauges and counters."""
        with self._lock:
            return snapshot(self._core)

    def pop_stats(self) -> dict[str, int]:
        """Like `get_stats()`, then reset the counters."""
        with self._lock:
            return snapshot(self._core, reset=True)

    async def reconnect_failed(self) -> None:
        """Called when connecting keeps failing for `reconnect_timeout` seconds."""
        cb = self._reconnect_failed
        if cb is not None:
            await aresolve(cb(self))

    # ------------------------------------------------------------------
    # Carrying out the core's commands

    def _swap_out(self) -> list[Command]:
        """Take the core's commands; call under the lock, execute after it."""
        core = self._core
        cmds = core.out
        if not cmds:
            return _NO_COMMANDS  # never the core's own list: see getconn()
        core.out = []
        return cmds

    def _execute(self, cmds: list[Command], own: Slot | None = None) -> None:
        """Carry out the core's commands; `own`: the slot the caller is giving back.

        The caller's own connection, if it is to be closed, is closed before the
        call returns, as psycopg_pool 3.3 does: once `putconn()` (or the `with`
        block) is over, `conn.closed` is true. Other connections are closed in the
        background.
        """
        bg = self._bg
        if bg is not None and bg.stranded():
            # Used from a new event loop, the one it was opened in gone: the
            # housekeeper (expiry, refills, retries) carries on in this one.
            self._start_housekeeper(bg)
        # Consumed as carried out: if something interrupts this, what is left can
        # still be executed (see _put_back_anyway()). A command is dropped once it
        # is done: one interrupted as it started is done again.
        while cmds:
            cmd = cmds[0]
            kind = type(cmd)
            if kind is Wake:
                cast(Wake, cmd).ticket.wake()
            elif kind is Close:
                slot = cast(Close, cmd).slot
                if slot is own:
                    try:
                        self._close_now(slot)
                    except BaseException:
                        # Interrupted (a signal handler's exception, a cancellation):
                        # this close, again, and the commands after it (a replacement's
                        # Connect) are carried out in the background before it goes on.
                        self._execute(cmds)
                        raise
                else:
                    self._spawn(self._close_job, slot)
            elif kind is Connect:
                connect = cast(Connect, cmd)
                if connect.extra and bg is not None:
                    bg.extra(self._connect_job, connect.slot)
                else:
                    self._spawn(self._connect_job, connect.slot)
            elif kind is Log:
                log = cast(Log, cmd)
                if logger.isEnabledFor(log.level):
                    logger.log(log.level, log.msg, *log.args)
            elif kind is Rearm:
                self._wakeup.set()
            elif kind is ReconnectFailed:
                self._spawn(self.reconnect_failed)
            elif kind is LeakSuspected:
                self._report_leak(cast(LeakSuspected, cmd).slot)
            elif kind is Collect:
                self._collect()
            del cmds[0]

    def _collect(self) -> None:
        """Run the garbage collection the core asked for; tell it what came of it.

        Finalizers return what garbage held: an abandoned generator's block (its close
        is scheduled in its loop), a dropped connection (_adopt()). Either way the
        weak reference's callback reports it to `_collected`, which only the
        housekeeper, running this, takes from.
        """
        before = len(self._collected)
        t0 = monotonic()
        gc.collect()
        took = monotonic() - t0
        with self._lock:
            self._core.collect_done(took, len(self._collected) - before)
            cmds = self._swap_out()
        self._execute(cmds)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        bg = self._bg
        if bg is None:
            bg = AsyncBackground(self.name, 1)
            bg.stopped = True
        bg.spawn(fn, *args)

    async def _close_job(self, slot: Slot) -> None:
        if slot.conn is not None:
            await connector.close(slot.conn)

    def _close_now(self, slot: Slot) -> None:
        if slot.conn is not None:
            arun_now(self._spawn, connector.close, slot.conn)

    async def _connect_job(self, slot: Slot) -> None:
        attempt = connector.AsyncConnectAttempt()
        try:
            conn = await attempt.run(self)
        except BaseException as ex:
            if isinstance(ex, Exception):
                logger.warning("error connecting in %r: %s", self.name, mask(str(ex)))
            else:
                # Cancelled (its event loop ended, say) or interrupted: not the
                # server's doing, and no message of its own to show.
                logger.info("connection attempt in %r interrupted: %r", self.name, ex)
            fatal = facts.is_fatal(ex)
            with self._lock:
                self._core.connect_failed(slot, monotonic(), attempt.connect_failed, ex, fatal)
                cmds = self._swap_out()
            self._execute(cmds)
            if not isinstance(ex, Exception):
                raise
            return
        self._adopt(slot, conn)
        conn._pool = None
        with self._lock:
            ticket = self._core.connected(slot, conn, monotonic(), attempt.ms)
            cmds = self._swap_out()
        conn._created_at = slot.created_at
        conn._expire_at = slot.expire_at
        logger.info("adding new connection to the pool")
        if ticket is not None:
            ticket.wake()
        self._execute(cmds)

    def _adopt(self, slot: Slot, conn: ACT) -> None:
        """Tie a new connection to its slot.

        The slot refers to the connection only weakly while it is lent out, so a
        connection a client drops without returning it is garbage-collected; the
        weak reference's callback then gives the slot back to the pool (see
        `_reap()`), instead of the capacity being lost for good.
        """
        conn._pool_slot = slot  # type: ignore[attr-defined]
        orphan_queries.remember(conn)
        pool_ref = weakref.ref(self)

        def collected(_: object) -> None:
            # Only lock-free, reentrant-safe steps here: this may run in the middle of
            # any code, in any thread, the pool's own lock held or not.
            slot.orphaned = True
            pool = pool_ref()
            if pool is not None:
                pool._collected.append((slot, slot.taken_at, monotonic()))
                pool._wakeup.set_threadsafe()

        slot.orphaned = False
        slot.wref = weakref.ref(conn, collected)

    def _reap(self, now: float) -> float:
        """Take back the slots of lent connections that were garbage-collected.

        Each after REAP_GRACE: the collector clears the weak references to garbage
        before it runs the finalizers, and a generator's finalizer may yet give its
        connection back (see _put_back_odd()). Returns when the next one is due.
        """
        collected = self._collected
        while collected:
            slot, taken_at, when = collected[0]
            if when + REAP_GRACE > now:
                return when + REAP_GRACE
            collected.popleft()
            if slot.state != _IN_USE or slot.taken_at != taken_at:
                continue  # given back after all, or closed by the pool: nothing lost
            where = where_taken(slot, ",")
            logger.warning(
                "a connection of pool %r was garbage-collected without being returned%s",
                self.name,
                where,
            )
            self._discard(slot, "connections_lost")
        return INF

    def _report_unreturned(self, slot: Slot) -> None:
        where = where_taken(slot)
        logger.warning(
            "pool %r closed while a connection was still out (held by %s)%s",
            self.name,
            describe_owner(slot),
            where,
        )

    def _report_leak(self, slot: Slot) -> None:
        where = where_taken(slot)
        logger.warning(
            "a connection of pool %r has been out for more than %s sec (held by %s)%s",
            self.name,
            self._core.leak_timeout,
            describe_owner(slot),
            where,
        )

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connections, start afresh.

        The parent's connections are not closed (that would end them for the parent
        too): each socket is replaced by /dev/null in this process, so a child that
        still uses one gets an error instead of reading the parent's replies, and
        its eventual close() tells the server nothing.
        """
        old = self._core
        for slot in list(old.live):
            conn = slot.conn if slot.conn is not None else slot.wref and slot.wref()
            if conn is not None:
                _detach_socket(conn)
                if conn._pool is self:
                    conn._pool = _FORKED
        self._core = old.renewed()
        # The parent's lock may have been held by a thread not copied here.
        self._lock = threading.RLock()
        self._collected.clear()
        self._bg = None
        self._wakeup = AsyncWakeup()
        if old.status == core_state.OPEN:
            self._restart_after_fork()


class _ParentPool:
    """`conn._pool`, in a forked child, of a connection the parent had lent.

    Code that gives a connection back through its `_pool` (Django does,
    `conn._pool.putconn(conn)`, when a Celery or multiprocessing child closes the
    connection it inherited) must not fail: the connection is dropped quietly,
    its socket detached by _after_fork().
    """

    name = "a pool of the parent process"
    close_returns = False

    async def putconn(self, conn: Any) -> None:
        conn._pool = None


_FORKED = _ParentPool()
_NO_COMMANDS: list[Command] = []  # only ever read
_new_object = object.__new__
# How long a connection the garbage collector took for dropped may yet come back
# before the pool replaces it (see _reap()): a generator's finalizer returns it
# within a few turns of the event loop, or one round trip for its rollback.
REAP_GRACE = 0.1
_QUEUED = core_state.QUEUED
_PENDING: Any = object()  # _put_back(): the core has not been told yet
_live_pools: weakref.WeakSet[AsyncConnectionPool[Any]] = weakref.WeakSet()


def _detach_socket(conn: Any) -> None:
    try:
        fd = conn.pgconn.socket
    except Exception:
        return  # closed already
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    except OSError:
        pass


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _AsyncConnectionContext(Generic[ACT]):
    """What `pool.connection()` returns: a class, not a generator, for speed."""

    __slots__ = ("_conn", "_pool", "_timeout")
    # Set by AsyncConnectionPool.connection(), which makes it without an `__init__`.
    _pool: AsyncConnectionPool[ACT]
    _timeout: float | None
    _conn: ACT

    async def __aenter__(self) -> ACT:
        try:
            self._conn = conn = await self._pool.getconn(self._timeout)
            slot = conn._pool_slot  # type: ignore[attr-defined]
            slot.lent_at = slot.taken_at  # usage_ms counts from the checkout
            return conn
        except BaseException:
            # Interrupted after getconn(): the block will not run, nor __aexit__.
            got: Any = getattr(self, "_conn", None)
            if got is not None and got._pool is self._pool:
                self._pool._give_back(got._pool_slot, got, "connections_lost")
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        pool = self._pool
        later = False
        try:
            # Ending the transaction is psycopg's job, but on an idle connection it
            # is a no-op that still costs a lock round: skip it then.
            status = conn.pgconn.transaction_status
            if status != _IDLE:
                if exc_type is not None and acancelled(exc_type) and conn._pool is pool:
                    later = True
                elif status != _ACTIVE:
                    await conn.__aexit__(exc_type, exc_val, exc_tb)
                else:
                    # A query still runs: its wait was interrupted (psycopg could not
                    # roll back, only warn), or, with no exception, a `cursor.stream()`
                    # is left unfinished, holding the connection's lock, for which
                    # psycopg's commit would wait for ever. The pool cancels the query
                    # and closes the connection (below).
                    if exc_type is None and not conn.autocommit:
                        raise ProgrammingError(
                            "the connection() block ended while a query was still running"
                            " (an unfinished cursor.stream()?): its transaction could not"
                            " be committed; the connection was closed"
                        )
        finally:
            if later:
                pool._put_back_later(conn)  # cancelled: see there
            elif not pool._put_back(conn):
                await pool._putconn_slow(conn)


async def _housekeeper(wref: weakref.ref[AsyncConnectionPool[Any]], wakeup: AsyncWakeup) -> None:
    """Sleep until the core's next deadline (or a wake-up), then tick it.

    Holds the pool only weakly between rounds, so a forgotten pool can be collected.
    """
    while True:
        pool = wref()
        if pool is None or pool._stopping or pool._wakeup is not wakeup:
            return
        now = monotonic()
        reap_at = pool._reap(now) if pool._collected else INF
        with pool._lock:
            pool._core.tick(now)
            cmds = pool._swap_out()
            deadline = min(pool._core.next_deadline(), reap_at)
        pool._execute(cmds)
        del pool
        await wakeup.wait(None if deadline == INF else max(0.0, deadline - monotonic()))
