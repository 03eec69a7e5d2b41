"""The few primitives that differ between the asyncio pool and the threaded pool.

`pool_async.py` is written against the `Async*` names; `tools/unasync.py` turns it
into `pool.py`, which uses the same-named sync twins defined here. Keeping the
differences in one module is what lets the two shells be one source.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import logging
import os
import queue
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, ClassVar

from psycopg import AsyncConnection, Connection

from ._core.state import INF, T_NEW, T_WAITING, Ticket

logger = logging.getLogger("psycopg.pool")

asleep = asyncio.sleep

# Threading primitives are looked up when they are created, never bound at import: an
# application imported before gevent's monkey-patching (gunicorn's gevent worker with
# `preload_app`) must still get cooperative ones, or a worker blocked on a real queue
# blocks the whole process.


def sleep(seconds: float) -> None:
    time.sleep(seconds)


async def aresolve(value: Any) -> Any:
    """Await `value` if it is awaitable (user callbacks may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


def resolve(value: Any) -> Any:
    return value


def acheck_cancelled(ex: Exception, outer: BaseException | None) -> None:
    """Raise CancelledError if `ex` was made out of a cancellation of this task.

    A user callback may catch its cancellation and raise an error instead (as a
    driver answering a cancelled query with QueryCanceled would): retrying would
    swallow the cancellation, which is then in the error's chain. `cancelling()`
    alone (Python 3.11+) is not enough: it is also up in a clean-up running as its
    task is cancelled (in a `finally` under an anyio shield, or under an expired
    `asyncio.timeout()`), where a check failing for its own reasons must be retried.
    There every error has the cancellation being handled, `outer` (what
    `sys.exc_info()` showed as the call began), in its chain: that one is not ours.
    Nor is one a timeout consumed (`TimeoutError` from `CancelledError`).
    """
    if _cancel_requests() == 0:
        return
    seen: set[int] = set()
    todo: list[BaseException] = [ex]
    while todo:
        cur = todo.pop()
        if cur is outer or isinstance(cur, (TimeoutError, asyncio.TimeoutError)):
            continue
        if isinstance(cur, asyncio.CancelledError):
            raise asyncio.CancelledError from ex
        seen.add(id(cur))
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e and id(e) not in seen)


def check_cancelled(ex: Exception, outer: BaseException | None) -> None:
    pass


def _cancel_requests() -> int | None:
    """The current task's pending cancellation requests; None where Python cannot
    tell (before 3.11, or a task class without `cancelling()`)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return None if cancelling is None else int(cancelling())


def acancelling() -> bool:
    """True if the current task is being cancelled (always False before Python 3.11)."""
    return bool(_cancel_requests())


def cancelling() -> bool:
    return False


def acancelled(exc_type: type[BaseException]) -> bool:
    """True if a block is left by an exception while its task is being cancelled.

    Then any wait may be cancelled again. The exception is the cancellation itself,
    or one that carries it (an exception group from a task group inside the block).
    Threads have no such thing: an interrupt (KeyboardInterrupt, a signal handler's
    exception) fires once, and the block's exit may run its rollback.
    """
    return issubclass(exc_type, asyncio.CancelledError) or acancelling()


def cancelled(exc_type: type[BaseException]) -> bool:
    return False


def arun_now(
    spawn: Callable[..., None], fn: Callable[..., Coroutine[Any, Any, None]], *args: Any
) -> None:
    """Run `fn(*args)` in the caller until it first suspends; `spawn` a task for the rest.

    For work a client expects done when its call returns (closing the connection
    it gave back) in code that is not a coroutine: psycopg's own `close()` never
    suspends, an override may.
    """
    coro = fn(*args)
    try:
        step = coro.send(None)
    except StopIteration:
        return
    spawn(_finish, _Rest(coro, step))


def run_now(spawn: Callable[..., None], fn: Callable[..., None], *args: Any) -> None:
    fn(*args)


async def _finish(rest: Awaitable[None]) -> None:
    await rest


class _Rest:
    """What is left of a coroutine that `arun_now()` started: awaiting it resumes it."""

    __slots__ = ("_coro", "_step")

    def __init__(self, coro: Coroutine[Any, Any, None], step: Any) -> None:
        self._coro = coro
        self._step = step

    def __await__(self) -> Generator[Any, Any, None]:
        # What `await` does with a coroutine, from the point where it stopped.
        coro, step = self._coro, self._step
        while True:
            try:
                sent = yield step
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as ex:
                try:
                    step = coro.throw(ex)
                except StopIteration:
                    return
            else:
                try:
                    step = coro.send(sent)
                except StopIteration:
                    return


# ----------------------------------------------------------------------
# Waiting clients


class AsyncWaiter(Ticket):
    """A ticket woken through a future, with a plain timer for its deadline.

    No `asyncio.wait_for`: on Python < 3.12 it can swallow a cancellation that
    races with the result and hand the caller a connection it will never return.
    """

    __slots__ = ("fut",)

    def __init__(self, deadline: float) -> None:
        # Ticket.__init__ inlined: one of these is made per queued request.
        self.slot = None
        self.error = None
        self.tstate = T_NEW
        # Set before the ticket is queued: the shared timer reads it (AsyncDeadlines).
        self.deadline = deadline
        self.fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def wake(self) -> None:
        if not self.fut.done():
            self.fut.set_result(True)

    def wait(self, deadlines: AsyncDeadlines | None = None) -> Awaitable[bool]:
        """Awaits True if woken, False at the deadline; cancellation propagates.

        Not a coroutine: in the usual case the caller awaits the future itself,
        which saves a coroutine frame per hand-off.
        """
        fut = self.fut
        if fut.done():
            return fut
        if deadlines is not None and deadlines.add(self.deadline):
            return fut
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            return _false()
        return _wait_own_timer(fut, timeout)


async def _false() -> bool:
    return False


async def _wait_own_timer(fut: asyncio.Future[bool], timeout: float) -> bool:
    handle = fut.get_loop().call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        handle.cancel()


class AsyncDeadlines:
    """One timer for the queued clients of a pool, rather than one each.

    A timer per waiter costs more than the rest of a hand-off when hundreds of
    tasks queue for a few connections (the loop's timer heap compares handles in
    Python). The pool's queue already holds its clients in arrival order, and with
    the same timeout their deadlines come in that order too. So no list of its own
    is kept: the timer is set for the oldest deadline; when it fires, the clients
    at the front of the pool's queue whose deadline has passed are woken (to time
    out), up to the first one still in time, and the timer is set for that one.
    A deadline earlier than the last one accepted is refused, and that client uses
    a timer of its own: the scan, which stops at the first client still in time,
    might not reach it.
    """

    __slots__ = ("_handle", "_last", "_loop", "_pool")

    def __init__(self, pool: weakref.ref[Any]) -> None:
        # Weak: an armed timer must not keep a pool alive.
        self._pool = pool
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = -INF

    def add(self, deadline: float) -> bool:
        if deadline < self._last:
            return False
        self._last = deadline
        # A timer armed in a loop that is not this one may never fire (that loop
        # ended, see AsyncBackground.stranded()): arm one here; the scan is the same.
        if self._handle is None or self._loop is not asyncio.get_running_loop():
            self._arm(deadline)
        return True

    def _arm(self, at: float) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, at - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._handle = None
        pool = self._pool()
        if pool is None:
            return
        now = time.monotonic()
        late: list[AsyncWaiter] = []
        at = INF
        with pool._lock:
            for ticket in pool._core.queue:
                if ticket.tstate != T_WAITING:
                    continue  # served or gone; the pool drops it in time
                if ticket.deadline > now:
                    at = ticket.deadline
                    break
                late.append(ticket)
        for ticket in late:
            _expire(ticket.fut)
        if at == INF:
            self._last = -INF  # nobody waits: any deadline is in order again
        else:
            self._arm(at)


class Deadlines:
    """Threads wait on a lock with a timeout of their own: nothing to share."""

    def __init__(self, pool: weakref.ref[Any]) -> None:
        pass


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Waiter(Ticket):
    """A ticket woken by releasing a lock its waiting thread tries to acquire."""

    __slots__ = ("lock",)

    def __init__(self, deadline: float) -> None:
        super().__init__(deadline)
        self.lock = threading.Lock()
        self.lock.acquire()

    def wake(self) -> None:
        try:
            self.lock.release()
        except RuntimeError:  # already released: the core wakes a ticket once
            pass

    def wait(self, deadlines: Deadlines | None = None) -> bool:
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            return self.lock.acquire(blocking=False)
        return self.lock.acquire(timeout=timeout)


# ----------------------------------------------------------------------
# Bounding a check by the client's deadline


def cut_connection(conn: Any) -> None:
    """Shut the connection's socket down, so that whatever waits on it fails now.

    A check on a connection whose network went silent would otherwise block until
    TCP gives up, long after the client's deadline. The shutdown acts on the socket
    itself (through a duplicate descriptor), so psycopg sees the connection end.
    """
    try:
        fd = conn.pgconn.socket
    except Exception:
        return
    try:
        # fromfd() duplicates a descriptor, or on Windows a socket handle (os.dup()
        # does not take those); the family given does not matter to shutdown().
        sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class AsyncWatchdog:
    """Cuts a connection still being checked when the client's deadline comes."""

    def arm(self, conn: Any, timeout: float) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, timeout), cut_connection, conn)

    def disarm(self, handle: asyncio.TimerHandle) -> None:
        handle.cancel()


class Watchdog:
    """The same for threads: one daemon thread per process serves every pool."""

    _made: ClassVar[dict[str, threading.Condition]] = {}  # made at first use: see arm()
    _heap: ClassVar[list[list[Any]]] = []
    _seq = itertools.count()
    _thread: ClassVar[threading.Thread | None] = None

    def arm(self, conn: Any, timeout: float) -> list[Any]:
        entry = [time.monotonic() + max(0.0, timeout), next(self._seq), conn]
        cls = type(self)
        cond = cls._made.get("cond")
        if cond is None:  # setdefault(): two threads arming at once keep the same one
            cond = cls._made.setdefault("cond", threading.Condition())
        with cond:
            heapq.heappush(cls._heap, entry)
            if cls._thread is None or not cls._thread.is_alive():  # none yet, or forked
                cls._thread = threading.Thread(
                    target=cls._run, name="psycopg-pool-watchdog", daemon=True
                )
                cls._thread.start()
            cond.notify()
        return entry

    def disarm(self, entry: list[Any]) -> None:
        entry[2] = None  # dropped from the heap when its time comes

    @classmethod
    def _run(cls) -> None:
        cond = cls._made["cond"]
        while True:
            with cond:
                heap = cls._heap
                while heap and heap[0][2] is None:
                    heapq.heappop(heap)
                if not heap:
                    cond.wait()
                    continue
                delay = heap[0][0] - time.monotonic()
                if delay > 0:
                    cond.wait(delay)
                    continue
                conn = heapq.heappop(heap)[2]
            if conn is not None:
                cut_connection(conn)
            del conn


def _new_watchdog_in_child() -> None:
    # Its thread is not copied by fork(), and held its condition between two waits: the
    # child's first check would block on it. The parent's deadlines are not the child's.
    Watchdog._made = {}
    Watchdog._heap = []
    Watchdog._thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_watchdog_in_child)


# ----------------------------------------------------------------------
# Sleeping until woken (the housekeeper)


class AsyncWakeup:
    __slots__ = ("_flag", "_fut", "_loop")

    def __init__(self) -> None:
        self._flag = False
        self._fut: asyncio.Future[bool] | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def set_threadsafe(self) -> None:
        """set(), from anywhere: another thread, a finalizer, a weakref callback."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self.set)
        except RuntimeError:  # the loop is closed: nobody to wake
            pass

    def set(self) -> None:
        self._flag = True
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(True)

    async def wait(self, timeout: float | None) -> None:
        if not self._flag:
            loop = asyncio.get_running_loop()
            self._fut = fut = loop.create_future()
            handle = loop.call_later(timeout, _expire, fut) if timeout is not None else None
            try:
                await fut
            finally:
                self._fut = None
                if handle is not None:
                    handle.cancel()
        self._flag = False


class Wakeup:
    """A queue rather than an Event: `SimpleQueue.put()` is safe to call from a
    weakref callback or finalizer, even one that interrupts the waiting thread."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[None] = queue.SimpleQueue()

    def set(self) -> None:
        self._queue.put(None)

    set_threadsafe = set

    def wait(self, timeout: float | None) -> None:
        try:
            self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        while not self._queue.empty():
            self._queue.get_nowait()


# ----------------------------------------------------------------------
# Background work


class AsyncBackground:
    """Background jobs as tasks of the running loop.

    The core bounds how many connection attempts run at once, so there is no
    fixed set of workers to feed.
    """

    def __init__(self, name: str, num_workers: int) -> None:
        self.name = name
        self.tasks: set[asyncio.Task[Any]] = set()
        self.daemons: list[asyncio.Task[Any]] = []
        self.stopped = False

    def start(self, owner: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(f"{owner} open with no running loop") from None

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(fn(*args))
        if not self.stopped:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    # Every job is a task of its own already.
    extra = spawn

    def daemon(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(fn(*args), name=name)
        self.daemons.append(task)

    def stranded(self) -> bool:
        """Is the housekeeper left in a loop that no longer runs, while another does?

        asyncio.run() cancels every task as it ends: a pool opened in one run and
        used in the next (a global pool, each test in a loop of its own) has lost it.
        """
        if not self.daemons:
            return False
        loop = self.daemons[-1].get_loop()
        try:
            return loop is not asyncio.get_running_loop() and not loop.is_running()
        except RuntimeError:  # no loop running here
            return False

    async def stop(self, timeout: float) -> list[str]:
        """Wait for the jobs up to `timeout`, cancel the rest; return their names."""
        self.stopped = True
        here = asyncio.get_running_loop()
        pending = []
        for task in [*self.tasks, *self.daemons]:
            if task.done():
                continue
            loop = task.get_loop()
            if loop is here:
                pending.append(task)
            elif not loop.is_closed() and not loop.is_running():
                task.cancel()  # a task of a loop that has stopped: it ends if that one runs
        if not pending:
            return []
        _done, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        return [t.get_name() for t in late]


class Background:
    """A few daemon worker threads fed by a queue, plus named daemon threads."""

    def __init__(self, name: str, num_workers: int) -> None:
        self.name = name
        self.num_workers = num_workers
        self.queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None]
        self.queue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.stopped = False

    def start(self, owner: str) -> None:
        for i in range(self.num_workers):
            t = threading.Thread(
                target=_worker, args=(self.queue,), name=f"{self.name}-worker-{i}", daemon=True
            )
            t.start()
            self.threads.append(t)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.stopped:
            # Late work after close (e.g. an attempt that finished after it): do it here.
            _run_job(fn, args)
        else:
            self.queue.put((fn, args))

    def stranded(self) -> bool:
        return False  # threads do not end with an event loop

    def extra(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run one job in a thread of its own: the workers may all be stuck."""
        if self.stopped:
            _run_job(fn, args)
            return
        self.threads = [t for t in self.threads if t.is_alive()]
        self.daemon(f"{self.name}-extra", _run_job, fn, args)

    def daemon(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self, timeout: float) -> list[str]:
        """Let queued jobs finish, stop the threads; return those still alive."""
        self.release()
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        late = []
        for t in self.threads:
            if t is me:
                continue
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                late.append(t.name)
        return late

    def release(self) -> None:
        """Tell the workers to end once the queued jobs are done; wait for none."""
        self.stopped = True
        for _ in range(self.num_workers):
            self.queue.put(None)


def _worker(jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        _run_job(*job)
        # Drop the references before blocking again, so that the pool can be collected.
        del job


def _run_job(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except BaseException as ex:
        # Whatever a job (or a user callback in it) raises, the worker goes on:
        # a dead worker would leave connection attempts queued forever.
        logger.warning("task run %s failed: %s: %s", fn, type(ex).__name__, ex)


# ----------------------------------------------------------------------
# Implicit opening and its warnings


class AsyncPoolMixin:
    """Async-only behaviour of the pool classes."""

    _open_implicit: bool

    def _restart_after_fork(self) -> None:
        # The event loop cannot be shared with the parent (its epoll set is): the
        # pool stays closed in the child until it is opened in a loop of its own.
        pass

    def _ctor_open_warning(self, open: bool | None) -> None:
        if open:
            _warn(_ASYNC_OPEN_MSG.format(cls=type(self).__name__), RuntimeWarning)

    def _warn_implicit(self) -> None:
        self._open_implicit = False
        _warn(_ASYNC_OPEN_MSG.format(cls=type(self).__name__), RuntimeWarning)


class PoolMixin:
    """Sync-only behaviour of the pool classes."""

    _open_implicit: bool

    def _open_now(self) -> None: ...

    def _restart_after_fork(self) -> None:
        self._open_now()

    def _ctor_open_warning(self, open: bool | None) -> None:
        pass

    def _warn_implicit(self) -> None:
        self._open_implicit = False
        _warn(_SYNC_OPEN_MSG.format(cls=type(self).__name__), DeprecationWarning)

    def __del__(self) -> None:
        # Threads hold the pool only weakly, so an open pool can be collected: tell its
        # workers to end (the housekeeper ends by itself), but wait for none of them.
        # A collection runs in whatever thread happens to allocate, which must not
        # block; and at interpreter exit daemon threads no longer run, so a join waits
        # out its whole timeout (on Python 3.13.0: 5 s, where upstream waits 5 s for
        # each thread).
        bg = getattr(self, "_bg", None)  # None too if __init__ failed
        if bg is not None:
            bg.release()


def _warn(msg: str, category: type[Warning]) -> None:
    """Warn pointing at the user's code: the first frame outside this package.

    (A fixed stacklevel would point inside the package when the warning comes
    through `connection()`, and Python's default filters would then hide it.)
    """
    level = 2  # 1 is this function; 2 its caller, sys._getframe(1)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(msg, category, stacklevel=level)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

_ASYNC_OPEN_MSG = (
    "opening an async pool in its constructor is deprecated and will stop working:"
    " call 'await pool.open()' or use 'async with {cls}(...) as pool:' instead"
)
_SYNC_OPEN_MSG = (
    "{cls} was opened implicitly by its constructor, and the default of its 'open'"
    " parameter is going to become False: pass open=True or open=False explicitly,"
    " or use 'with {cls}(...) as pool:'"
)


# ----------------------------------------------------------------------
# close_returns: the connection class whose close() always asks the pool


class AsyncReturningConnection(AsyncConnection[Any]):
    """An AsyncConnection whose close() gives it back to its pool (`close_returns`)."""

    async def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None and pool.close_returns:
            await pool.putconn(self)
        else:
            await super().close()


class ReturningConnection(Connection[Any]):
    """A Connection whose close() gives it back to its pool (`close_returns`)."""

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None and pool.close_returns:
            pool.putconn(self)
        else:
            super().close()
