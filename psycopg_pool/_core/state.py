"""The pool core: who gets which connection, and when to open, close or check one.

This module is pure bookkeeping. It does no I/O, reads no clock, starts no thread
and never imports psycopg: the shells (`pool_async.py`, and `pool.py` generated
from it) feed it facts with the current time and carry out the commands it leaves
in `PoolCore.out`. A test checks that nothing here imports more than the stdlib
modules listed in `tests/core/test_purity.py`.

Vocabulary
----------
*Slot*: one pooled connection, from the moment the core decides to open it until
the core hands it to the shell for closing. A slot is in exactly one state:

    CONNECTING  an attempt to open it is under way (in the background, or inline
                by a null-pool caller)
    IDLE        ready, in the idle deque (FIFO: taken from the left)
    IN_USE      held by a client (also one granted to a waiting client that has
                not woken up yet: the grant is the hand-over)
    CHECKING    out of circulation for I/O done on the pool's behalf: rollback or
                `reset` after a return, health check by `check()`
    CLOSED      forgotten by the core; a `Close` command was issued (or the
                attempt failed)

*Ticket*: one client's request that could not be served at once, or one
`wait()` call. It ends exactly once: granted, failed or withdrawn. A granted
ticket's slot is the client's from the moment of the grant; withdrawn after that
(the client gave up as it was served), the slot is passed on.

Invariants (tests/core/test_state_machine.py checks them after every step)
------------------------------------------------------------------------------
I1 conservation: `live` holds exactly the slots not CLOSED; every live slot is
   counted in exactly one of idle / n_connecting / n_inline / IN_USE / n_checking,
   and the sum equals `len(live)`. (`n_busy`, the slots in use, is derived from it.)
I2 bounds: `len(live) <= max_size` (`max_size == 0` means unlimited, null pools).
I3 no idle connection while a client waits: `idle` is empty whenever
   `n_waiting` is not, after an input returns. `n_waiting` counts the tickets in
   `queue` still T_WAITING.
I4 first come, first served: tickets are granted in the order they were queued.
I5 every ticket ends exactly once; a withdrawn ticket's grant is passed on.
I6 the pool never hands out a connection past its lifetime, and never shrinks
   below `min_size` because of idleness.
"""

from __future__ import annotations

import random
from collections import deque
from itertools import count
from typing import Any

from .backoff import Backoff
from .commands import (
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

INF = float("inf")

# Slot states
CONNECTING = 0
IDLE = 1
IN_USE = 2
CHECKING = 3
CLOSED = 4
STATE_NAMES = ("connecting", "idle", "in use", "checking", "closed")

# Ticket states
T_NEW = 0
T_WAITING = 1
T_GRANTED = 2
T_DONE = 3
T_FAILED = 4
T_WITHDRAWN = 5

# Pool status
NEW = 0
OPEN = 1
CLOSING = 2  # unused by the core; kept for the shells' repr symmetry
SHUT = 3

# Outcomes of `request()`
GOT = 0  # a connection was taken: it is in `ticket.slot`
QUEUED = 1  # the ticket waits in the queue
INLINE = 2  # null pool: the caller must connect itself for `ticket.slot`
NO_WAIT = 3  # nothing available and the caller does not want to wait
TOO_MANY = 4  # the queue is full (`max_waiting`)
NOT_OPEN = 5  # the pool was never opened
IS_CLOSED = 6  # the pool was closed
FAILING = 7  # connecting fails for good and nothing will come back: see `ticket.error`

# Failure kinds written in `Ticket.error`
F_CLOSED = "closed"
F_CONNECT = "connect"  # connecting fails for a reason retrying cannot fix

# How often a pool that is failing to connect probes the server while clients are
# waiting: a refused connection costs next to nothing, and a waiting client should
# be served soon after the server is back rather than after a long backoff step.
DEMAND_PROBE_INTERVAL = 0.2

# An attempt still running after this long while clients wait is presumed to hang on
# a network that went silent: it is abandoned (see _abandon_stuck), so that a network
# that heals meanwhile is tried at once rather than after the connect timeout.
STUCK_AFTER = 2.0

# A client that has waited this long while every connection is out, and none can be
# opened, may be waiting for a connection that only garbage holds: a generator
# abandoned in the middle of its `connection()` block (a streaming response whose
# client went away), a connection dropped in a reference cycle. Python's cycle
# collector may not run for minutes; the pool then asks for it (`Collect`), at first
# at most once every COLLECT_EVERY while the starvation lasts.
COLLECT_AFTER = 1.0
COLLECT_EVERY = 10.0
# A full collection stalls the whole process (every thread, or the event loop) for as
# long as it walks the heap: a fraction of a second in a large application. A long
# overload also starves clients, with no garbage involved; so each collection that
# finds none of the pool's connections doubles the interval, up to COLLECT_EVERY_MAX,
# and one that finds some resets it. Whatever the interval, collecting takes at most
# 1/COLLECT_COST_FACTOR of the time (see collect_done()).
COLLECT_EVERY_MAX = 320.0
COLLECT_COST_FACTOR = 100.0

# A metrics exporter that stops scraping must not make the pool grow without bound.
MAX_SAMPLES = 100_000

# Lifetime jitter: each connection lives between 95% and 100% of max_lifetime, so
# connections opened together do not all expire together.
LIFETIME_JITTER = 0.05

_slot_ids = count(1)


class Slot:
    __slots__ = (
        "abandoned",
        "conn",
        "created_at",
        "epoch",
        "expire_at",
        "generation",
        "id",
        "idle_since",
        "inline",
        "leak_reported",
        "lent_at",
        "orphaned",
        "probe",
        "started_at",
        "state",
        "taken_at",
        "ticket",
        "trace",
        "wref",
    )

    def __init__(self, started_at: float) -> None:
        self.id = next(_slot_ids)
        self.epoch = 0
        self.state = CONNECTING
        self.conn: Any = None
        self.generation = -1
        self.started_at = started_at
        self.created_at = 0.0
        self.expire_at = INF
        # The ticket it was last granted to: the shell wakes it if a return that
        # granted it was interrupted before it could (see _put_back_anyway()).
        self.ticket: Ticket | None = None
        self.inline = False
        self.probe = False
        self.abandoned = False  # a hung attempt no longer counted (see _abandon_stuck)
        # Set by `connection()` when it lends the slot: its time out counts in usage_ms.
        self.lent_at = 0.0
        self.taken_at = 0.0  # when a client last got it
        self.idle_since = 0.0  # when it last went idle
        # Opaque to the core, kept for the shell's explanations and leak reports:
        # where it was taken, and a weak reference to the connection.
        self.trace: Any = None
        self.wref: Any = None
        self.orphaned = False  # the weak reference died while lent (see the shells)
        self.leak_reported = -1.0  # the `taken_at` a leak warning was given for

    def __repr__(self) -> str:
        return f"<Slot {self.id} {STATE_NAMES[self.state]}>"


class Failure:
    """Why a ticket failed; `cause` is opaque to the core (the shell's exception)."""

    __slots__ = ("cause", "kind")

    def __init__(self, kind: str, cause: object = None) -> None:
        self.kind = kind
        self.cause = cause

    def __repr__(self) -> str:
        return f"Failure({self.kind!r})"


class Ticket:
    """A waiting client. The shells subclass it to add their wake-up primitive."""

    __slots__ = ("deadline", "error", "queued_at", "slot", "tstate")

    def __init__(self, deadline: float = INF) -> None:
        self.slot: Slot | None = None
        self.error: Failure | None = None
        self.tstate = T_NEW
        # When the client gives up (monotonic): set by the shells, which time it out.
        self.deadline = deadline
        self.queued_at = 0.0  # set by request(): the grant counts the wait from it

    def wake(self) -> None:
        """Overridden by the shells; the core never calls it."""


class PoolCore:
    """Pool policy as a state machine: inputs are facts, outputs are commands."""

    def __init__(
        self,
        *,
        min_size: int,
        max_size: int,
        num_workers: int = 3,
        max_waiting: int = 0,
        max_lifetime: float = 3600.0,
        max_idle: float = 600.0,
        reconnect_timeout: float = 300.0,
        null: bool = False,
        name: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.min_size = min_size
        self.max_size = max_size  # 0: unlimited (null pools only)
        self.num_workers = num_workers
        self.max_waiting = max_waiting
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.reconnect_timeout = reconnect_timeout
        self.null = null
        self.rng = rng if rng is not None else random.Random()

        self.status = NEW
        self.generation = 0
        # Bumped by close(): slots of an earlier opening still out (lent, or being
        # opened) are real connections but no part of the reopened pool's sizing.
        self.epoch = 0
        self.n_old_epoch = 0
        self.idle: deque[Slot] = deque()
        # FIFO of waiting tickets. A withdrawn ticket stays in it, marked, until it
        # reaches the front or the queue is compacted: popping skips it. (An ordered
        # dict removes from the middle at once, but finding its first entry scans
        # the holes left by earlier pops, ~0.3 us per hand-off with 1000 waiters.)
        self.queue: deque[Ticket] = deque()
        self.n_waiting = 0  # tickets in `queue` still waiting
        self.ready_waiters: list[Ticket] = []
        self.live: set[Slot] = set()
        self.n_connecting = 0  # background attempts
        self.n_inline = 0  # null-pool attempts made by the caller
        self.n_checking = 0
        self.n_abandoned = 0  # hung attempts given up on, not finished yet
        self.want_probe = False  # null pool: a wait() asked for one connection attempt
        self.backoff = Backoff(self.rng)
        self.last_failure_at = -INF
        self.last_error: object = None
        self.fatal = False  # the last attempt failed for a reason retrying cannot fix
        self.fail_count = 0  # failed attempts in the current streak
        self.leak_timeout = 0.0  # 0: no leak tracking
        self.shrink_at = INF
        self.min_idle_seen = 0
        self.sleep_until = INF  # the deadline last given to the housekeeper
        self.collected_at = -INF  # the last Collect
        self.collect_every = COLLECT_EVERY  # the interval between two (see collect_done)
        self.ticked_at = -INF  # the time of the last tick()
        self.out: list[Command] = []

        # Counters, with upstream's names. `touched` remembers the ones bumped by 0,
        # which upstream reports as present.
        self.requests_num = 0
        self.requests_queued = 0
        self.requests_wait_ms = 0
        self.requests_errors = 0
        self.usage_ms = 0
        self.returns_bad = 0
        self.connections_num = 0
        self.connections_ms = 0
        self.connections_errors = 0
        self.connections_lost = 0
        self.touched: set[str] = set()
        # Off (None) unless a metrics exporter asks: then (kind, seconds) events for
        # histograms, kinds "wait", "use", "create" and "timeout", drained by it.
        self.samples: list[tuple[str, float]] | None = None

    # ------------------------------------------------------------------
    # Client side

    @property
    def n_busy(self) -> int:
        """Slots in use: derived (see I1), so that the hot path counts nothing for it."""
        return len(self.live) - len(self.idle) - self.n_connecting - self.n_inline - self.n_checking

    def take(self, now: float) -> Slot | None:
        """The hot path: an idle connection for a new request, or None."""
        self.requests_num += 1
        idle = self.idle
        while idle:
            # A signal handler's exception surfaces as a C call returns, so none is
            # made once the slot is out of `idle` (len() first), and one raised as
            # popleft() returns is undone: the slot must not end up nowhere.
            slot = idle[0]
            left = len(idle) - 1
            try:
                idle.popleft()
            except BaseException:
                idle.appendleft(slot)
                raise
            if slot.expire_at > now:
                slot.state = IN_USE
                slot.taken_at = now
                if left < self.min_idle_seen:
                    self.min_idle_seen = left
                return slot
            self._close(slot)
            self._log_info("discarding expired connection %s", slot.id)
            self._fill(now)
        return None

    def request(self, ticket: Ticket, now: float, can_wait: bool) -> int:
        """A request `take()` could not serve: take, connect inline, or queue."""
        if self.status != OPEN:
            return NOT_OPEN if self.status == NEW else IS_CLOSED
        # The same loop as take(), repeated rather than shared: take() is the hot path
        # and a helper call there costs more than the rest of it.
        idle = self.idle
        while idle:
            slot = idle.popleft()
            if slot.expire_at > now:
                slot.state = IN_USE
                slot.taken_at = now
                self.min_idle_seen = min(self.min_idle_seen, len(idle))
                ticket.slot = slot
                ticket.tstate = T_DONE
                self._fill(now)  # replace the expired ones skipped on the way
                return GOT
            self._close(slot)
            self._log_info("discarding expired connection %s", slot.id)
        if self.null and (not self.max_size or len(self.live) < self.max_size):
            if not can_wait:
                return NO_WAIT
            slot = self._new_slot(now)
            slot.inline = True
            self.n_inline += 1
            ticket.slot = slot
            ticket.tstate = T_DONE
            return INLINE
        if not can_wait:
            self._fill(now)
            return NO_WAIT
        if self.fatal and self._failing_for_good(now):
            ticket.tstate = T_FAILED
            ticket.error = Failure(F_CONNECT, self.last_error)
            return FAILING
        if self.max_waiting and self.n_waiting >= self.max_waiting:
            self.requests_errors += 1
            return TOO_MANY
        ticket.queued_at = now
        self.queue.append(ticket)
        self.n_waiting += 1
        ticket.tstate = T_WAITING
        self.requests_queued += 1
        if (
            self.n_connecting
            and self.sleep_until > now + STUCK_AFTER
            and self.n_abandoned < self.num_workers
        ):
            # The housekeeper must look at the attempts under way by the time they
            # would count as hung (next_deadline() says exactly when).
            self.out.append(Rearm())
        b = self.backoff
        if b.started_at is not None and not self.n_connecting:
            # Demand while failing: probe soon rather than after the long step.
            retry = max(self.last_failure_at + DEMAND_PROBE_INTERVAL, now)
            if retry < b.retry_at:
                b.retry_at = retry
                if retry < self.sleep_until:
                    self.out.append(Rearm())
        n_live = len(self.live) - self.n_old_epoch
        if self.want_probe or not self.max_size or n_live < self.max_size:
            self._fill(now)  # (at max_size, with no probe due, it would start nothing)
        elif self.sleep_until > now + COLLECT_AFTER and self._collect_at() < self.sleep_until:
            self.out.append(Rearm())  # see COLLECT_AFTER
        return QUEUED

    def withdraw(self, ticket: Ticket, now: float, wait_ms: int) -> None:
        """The waiting client gave up (timeout, cancellation, interrupt).

        A ticket granted meanwhile (the client had not seen its grant yet) gives its
        connection up: it is passed on. Its wait was counted by the grant, as that of
        a failed one by its failure, which leaves nothing else to do.
        """
        st = ticket.tstate
        if st == T_WAITING:
            self._count_wait(wait_ms)
            self.requests_errors += 1
            self.n_waiting -= 1
            if len(self.queue) > 2 * self.n_waiting + 64:
                # Mostly withdrawn tickets (say, timeouts while no connection came
                # back): drop them, keeping the queue's size proportional to demand.
                ticket.tstate = T_WITHDRAWN
                self.queue = deque(t for t in self.queue if t.tstate == T_WAITING)
        elif st == T_GRANTED:
            # Granted at the same moment the client gave up: pass it on. (The shell
            # withdraws a granted ticket only before it lends the slot's connection.)
            slot = ticket.slot
            assert slot is not None and slot.state == IN_USE
            self.requests_errors += 1
            ticket.slot = None
            slot.ticket = None
            t = self._recycle(slot, now)
            if t is not None:
                self.out.append(Wake(t))
        elif st == T_DONE:
            raise AssertionError("withdraw() of a served ticket: release the slot instead")
        ticket.tstate = T_WITHDRAWN

    def release(self, slot: Slot, now: float) -> Ticket | None:
        """A connection comes back healthy (from a client or from a check/reset).

        Returns the ticket to wake if the connection went straight to a waiter.

        An exception raised in the middle of the common cases (by a signal handler,
        as a function starts or a C call returns) leaves the slot either still in
        use, with only the usage counted, or released: the shell tells which by the
        slot's state and `taken_at` (granted to a waiter, it is in use since now) and
        finishes the job (see the shells' `_put_back_anyway()`).
        So the counters change only after the last such place.
        """
        lent_at = slot.lent_at
        if lent_at:
            # _usage() inlined: every `connection()` block ends here. A block shorter
            # than a millisecond, the usual case for a quick query, calls nothing.
            ms = 1000.0 * (now - lent_at)
            slot.lent_at = 0.0
            if ms >= 1.0:
                self.usage_ms += int(ms)
            elif "usage_ms" not in self.touched:
                self.touched.add("usage_ms")
            if self.samples is not None:
                self.sample("use", now - lent_at)
        busy = slot.state == IN_USE
        if slot.generation == self.generation and slot.expire_at > now:
            # The common cases, inlined. (A slot of the current generation implies an
            # open pool: close() starts a new generation.)
            if self.n_waiting:
                t = self._grant(slot, now)  # under load: every return
                if not busy:
                    self.n_checking -= 1
                return t
            if not self.null:
                if not busy:
                    self.n_checking -= 1
                slot.state = IDLE
                slot.idle_since = now
                self.idle.append(slot)
                if slot.expire_at < self.sleep_until or self.ready_waiters:
                    self._after_idle(slot)
                return None
        if not busy:
            self.n_checking -= 1
        return self._recycle(slot, now)

    def _recycle(self, slot: Slot, now: float) -> Ticket | None:
        """Reuse a healthy connection unless it is stale, expired or the pool closed."""
        if slot.generation != self.generation or self.status != OPEN:
            self._close(slot)
            self._fill(now)
            return None
        if slot.expire_at <= now:
            self._close(slot)
            self._log_info("discarding expired connection %s", slot.id)
            self._fill(now)
            return None
        return self._place(slot, now)

    def begin_io(self, slot: Slot, now: float) -> None:
        """A returned connection needs rollback/reset before it can be reused."""
        if slot.lent_at:
            self._usage(slot, now)
        slot.state = CHECKING
        self.n_checking += 1

    def discard(self, slot: Slot, now: float, counter: str | None) -> None:
        """A connection held by a client or under I/O is broken: close and replace it."""
        if slot.state == CHECKING:
            self.n_checking -= 1
        if slot.lent_at:
            self._usage(slot, now)
        if counter == "returns_bad":
            self.returns_bad += 1
        elif counter == "connections_lost":
            self.connections_lost += 1
        self._close(slot)
        self._fill(now)

    def sample(self, kind: str, seconds: float) -> None:
        """Record an event for the metrics exporter, if one listens."""
        samples = self.samples
        if samples is not None and len(samples) < MAX_SAMPLES:
            samples.append((kind, seconds))

    def _usage(self, slot: Slot, now: float) -> None:
        if self.samples is not None:
            self.sample("use", now - slot.lent_at)
        ms = int(1000.0 * (now - slot.lent_at))
        slot.lent_at = 0.0
        if ms:
            self.usage_ms += ms
        else:
            self.touched.add("usage_ms")

    # ------------------------------------------------------------------
    # Connection attempts

    def connected(self, slot: Slot, conn: Any, now: float, ms: int) -> Ticket | None:
        """An attempt (background or inline) succeeded."""
        room = True
        if slot.abandoned:
            # It was given up as hung, and another attempt took its place: keep it
            # only if there is still room for it.
            slot.abandoned = False
            self.n_abandoned -= 1
            room = (
                self.status == OPEN
                and slot.epoch == self.epoch
                and (not self.max_size or len(self.live) - self.n_old_epoch < self.max_size)
            )
            if room:
                self.live.add(slot)
        elif slot.inline:
            self.n_inline -= 1
        else:
            self.n_connecting -= 1
        self.connections_ms += ms
        self.touched.add("connections_ms")
        if self.samples is not None:
            self.sample("create", ms / 1000.0)
        slot.conn = conn
        slot.created_at = now
        slot.expire_at = now + self.max_lifetime * (1.0 - LIFETIME_JITTER * self.rng.random())
        slot.generation = self.generation
        if self.backoff.started_at is not None and not slot.inline:
            self.backoff.succeeded()
            self.fail_count = 0
        self.fatal = False
        if not room:
            slot.state = CLOSED  # never back in `live`: no bookkeeping to undo
            self.out.append(Close(slot))
            return None
        if self.status != OPEN or slot.epoch != self.epoch:
            self._close(slot)
            return None
        if slot.inline:
            slot.state = IN_USE
            slot.taken_at = now
            return None
        if slot.probe:
            self._close(slot)
            self._wake_ready()
            return None
        if slot.expire_at < self.sleep_until:
            self.out.append(Rearm())
        t = self._place(slot, now)
        self._fill(now)
        return t

    def connect_failed(
        self, slot: Slot, now: float, counted: bool, cause: object, fatal: bool = False
    ) -> None:
        """An attempt failed; `counted` says whether `connect()` itself failed.

        `fatal`: the reason is one that retrying cannot fix (authentication, missing
        database...). The pool keeps retrying in the background (credentials may be
        rotated), but clients with nothing else to wait for fail at once.
        """
        if slot.abandoned:
            slot.abandoned = False
            self.n_abandoned -= 1
        else:
            if slot.inline:
                self.n_inline -= 1
            else:
                self.n_connecting -= 1
            self.live.discard(slot)
            if slot.epoch != self.epoch:
                self.n_old_epoch -= 1
        if counted:
            self.connections_errors += 1
        slot.state = CLOSED
        if slot.probe:
            self.want_probe = True
        self.last_failure_at = now
        self.last_error = cause
        self.fatal = fatal
        if self.status != OPEN:
            return
        if slot.inline:
            # The caller gets its own error; whoever queued behind it (a null pool at
            # max_size) may now have room for an attempt of its own.
            self._fill(now)
            return
        self.fail_count += 1
        if fatal and not (self.n_busy or self.n_checking or self.idle):
            self._fail_all(Failure(F_CONNECT, cause), now)
        gave_up = self.backoff.failed(slot.started_at, now, self.reconnect_timeout)
        if self.n_waiting or self.ready_waiters:
            # Clients still wait: keep probing often, not at the long backoff step.
            b = self.backoff
            b.retry_at = min(b.retry_at, now + DEMAND_PROBE_INTERVAL)
        if gave_up:
            self.out.append(
                Log(
                    30,
                    "reconnection attempt in pool %r failed after %s sec",
                    self.name,
                    self.reconnect_timeout,
                )
            )
            self.out.append(ReconnectFailed())
        self._fill(now)
        self.out.append(Rearm())

    # ------------------------------------------------------------------
    # Pool-wide operations

    def open(self, now: float) -> bool:
        """Start (or restart after close) the pool. False if it was already open."""
        if self.status == OPEN:
            return False
        self.status = OPEN
        self.backoff.succeeded()
        self.fatal = False
        self.fail_count = 0
        if not self.null:
            self.shrink_at = now + self.max_idle
            self.min_idle_seen = 0
        self._fill(now)
        self.out.append(Rearm())
        return True

    def close(self, now: float) -> bool:
        """Stop serving. False if there was nothing to close."""
        if self.status != OPEN:
            return False
        self.status = SHUT
        self.generation += 1
        self.epoch += 1
        # Granted connections are their clients' already, like any other in use: they
        # are closed when they come back.
        self._fail_all(Failure(F_CLOSED), now)
        while self.idle:
            self._close(self.idle.popleft())
        self.shrink_at = INF
        self.want_probe = False
        self.backoff.succeeded()
        self.n_old_epoch = len(self.live)
        return True

    def drain(self, now: float) -> None:
        """Replace every connection: idle ones now, the others when they come back."""
        self.generation += 1
        while self.idle:
            self._close(self.idle.popleft())
        self._fill(now)

    def resize(self, min_size: int, max_size: int, now: float) -> None:
        self.min_size = min_size
        self.max_size = max_size
        self._fill(now)

    def wait_ready(self, ticket: Ticket, now: float) -> bool:
        """`wait()`: True if the pool is ready now; else the ticket is woken later.

        If connecting fails for good, the ticket is failed at once (see its `error`).
        """
        if self._failing_for_good(now):
            ticket.tstate = T_FAILED
            ticket.error = Failure(F_CONNECT, self.last_error)
            return False
        if self.null:
            self.want_probe = True
            self.ready_waiters.append(ticket)
            ticket.tstate = T_WAITING
            self._fill(now)
            return False
        if len(self.idle) >= self.min_size:
            ticket.tstate = T_DONE
            return True
        self.ready_waiters.append(ticket)
        ticket.tstate = T_WAITING
        return False

    def withdraw_ready(self, ticket: Ticket) -> None:
        if ticket in self.ready_waiters:
            self.ready_waiters.remove(ticket)
        ticket.tstate = T_WITHDRAWN

    def evict(self, slot: Slot, now: float) -> bool:
        """An idle connection was found closed by the server: replace it.

        False if the slot is not idle any more (a client took it meanwhile).
        """
        if slot.state != IDLE:
            return False
        self.idle.remove(slot)
        self.connections_lost += 1
        self._close(slot)
        self._fill(now)
        return True

    def begin_check(self, now: float) -> list[Slot]:
        """`check()`: take every idle connection out to be checked by the caller."""
        slots = []
        idle = self.idle
        while idle:
            slot = idle.popleft()
            if slot.expire_at <= now:
                self._close(slot)
                self._log_info("discarding expired connection %s", slot.id)
                continue
            slot.state = CHECKING
            self.n_checking += 1
            slots.append(slot)
        if self.backoff.started_at is not None and not self.n_connecting:
            # An explicit check() is demand: probe now rather than at the next step.
            self.backoff.retry_at = now
        self._fill(now)
        return slots

    def tick(self, now: float) -> None:
        """Housekeeping: expiry, shrinking, retries. Call at `next_deadline()`."""
        if self.status != OPEN:
            return
        self.ticked_at = now
        idle = self.idle
        if idle and any(s.expire_at <= now for s in idle):
            keep = []
            for s in idle:
                if s.expire_at <= now:
                    self._close(s)
                    self._log_info("discarding expired connection %s", s.id)
                else:
                    keep.append(s)
            idle.clear()
            idle.extend(keep)
        if now >= self.shrink_at:
            self.shrink_at = now + self.max_idle
            seen = self.min_idle_seen
            self.min_idle_seen = len(idle)
            if len(self.live) > self.min_size and seen > 0 and idle:
                slot = idle.popleft()
                self._log_info(
                    "shrinking pool %r to %s because %s unused connections in the last %s sec",
                    self.name,
                    len(self.live) - 1,
                    seen,
                    self.max_idle,
                )
                self._close(slot)
        if self.leak_timeout:
            self._report_leaks(now)
        if self.n_waiting and self.n_connecting:
            self._abandon_stuck(now)
        self._fill(now)
        # After _fill: an attempt it starts (a null pool's probe, retried after a
        # failure, is not held to max_size) may serve the client, so no starvation.
        if self.n_waiting and self._collect_at() <= now:
            self.collected_at = now
            self._log_info(
                "pool %r: a client has waited %.1f sec with every connection out:"
                " collecting garbage, which may hold some",
                self.name,
                now - self._starved_since(),
            )
            self.out.append(Collect())

    def _report_leaks(self, now: float) -> None:
        # `taken_at + leak_timeout`, not `now - leak_timeout`: the very sum that
        # next_deadline() returns, or rounding could leave a deadline due but not done.
        timeout = self.leak_timeout
        for s in self.live:
            if s.state == IN_USE and s.taken_at + timeout <= now and s.leak_reported != s.taken_at:
                s.leak_reported = s.taken_at
                self.out.append(LeakSuspected(s))

    def next_deadline(self) -> float:
        """When `tick()` has work to do next (INF: only when told of new facts)."""
        if self.status != OPEN:
            self.sleep_until = INF
            return INF
        d = self.shrink_at
        if not self.null:
            # The connections out of the pool count too, unless already expired (their
            # return will close them): one that comes back to idle then expires no
            # sooner than the housekeeper wakes. Counting idle ones only, every return
            # of a connection expiring before the planned wake-up had to wake it (see
            # _after_idle()): thousands of times a second in a busy pool whose
            # connections near the end of their lifetime.
            seen = self.ticked_at
            gen = self.generation
            for s in self.live:
                if s.expire_at < d and (
                    s.state == IDLE
                    or (s.state != CONNECTING and s.expire_at > seen and s.generation == gen)
                ):
                    d = s.expire_at
        b = self.backoff
        if b.started_at is not None and not self.n_connecting and self._need() > 0:
            d = min(d, b.retry_at)
        if self.leak_timeout:
            for s in self.live:
                if s.state == IN_USE and s.leak_reported != s.taken_at:
                    d = min(d, s.taken_at + self.leak_timeout)
        if self.n_waiting and self.n_connecting:
            d = min(d, self._stuck_at())
        if self.n_waiting:
            d = min(d, self._collect_at())
        self.sleep_until = d
        return d

    # ------------------------------------------------------------------
    # Internals

    def _new_slot(self, now: float) -> Slot:
        slot = Slot(now)
        slot.epoch = self.epoch
        self.live.add(slot)
        self.connections_num += 1
        return slot

    def _close(self, slot: Slot) -> None:
        slot.state = CLOSED
        self.live.discard(slot)
        if slot.epoch != self.epoch:
            self.n_old_epoch -= 1
        self.out.append(Close(slot))

    def _place(self, slot: Slot, now: float) -> Ticket | None:
        """Hand a healthy connection to the oldest waiter, or make it idle."""
        if self.n_waiting:
            return self._grant(slot, now)
        if self.null:
            self._close(slot)
            return None
        slot.state = IDLE
        slot.idle_since = now
        self.idle.append(slot)
        self._after_idle(slot)
        return None

    def _grant(self, slot: Slot, now: float) -> Ticket:
        """Give a healthy connection to the oldest waiter; return its ticket to wake.

        The grant is the hand-over: the slot is in use by the waiter from now on, and
        its wait ends now. So the woken client needs no second lock round to pick it
        up, and a client that gives up before it wakes passes it on (`withdraw()`).
        """
        queue = self.queue
        t = queue[0]
        while t.tstate != T_WAITING:
            queue.popleft()
            t = queue[0]
        # Counted before anything changes hands: a signal handler can raise where a C
        # call returns (int(), add()), and must find the slot and the ticket as they
        # were. (Interrupted as popleft() returns, the waiter is skipped: it waits for
        # the next connection or its deadline. Past it, the shell tells a granted slot
        # by its new `taken_at`.)
        wait_ms = int(1000.0 * (now - t.queued_at))
        if not wait_ms:  # else the total shows it was counted
            self.touched.add("requests_wait_ms")
        if self.samples is not None:
            self.sample("wait", wait_ms / 1000.0)
        queue.popleft()
        self.requests_wait_ms += wait_ms
        self.n_waiting -= 1
        slot.idle_since = now  # fresh from use: no need to look at it again
        slot.state = IN_USE
        slot.ticket = t
        t.slot = slot
        t.tstate = T_GRANTED
        slot.taken_at = now
        return t

    def _after_idle(self, slot: Slot) -> None:
        """A slot just went idle: maybe wake the housekeeper or `wait()` callers."""
        if slot.expire_at < self.sleep_until:
            self.out.append(Rearm())
        if self.ready_waiters and len(self.idle) >= self.min_size:
            self._wake_ready()

    def _failing_for_good(self, now: float) -> bool:
        """Connecting just failed for good and no connection can come back to wait for.

        "Just": a client arriving more than DEMAND_PROBE_INTERVAL later queues
        instead, so that its demand triggers a fresh attempt (maybe with rotated
        credentials) whose outcome it then gets.
        """
        return (
            self.fatal
            and not (self.n_busy or self.n_checking or self.idle or self.n_connecting)
            and now - self.last_failure_at < DEMAND_PROBE_INTERVAL
        )

    def _fail_all(self, failure: Failure, now: float) -> None:
        """Fail every waiting client and every `wait()` caller."""
        for t in self.queue:
            if t.tstate == T_WAITING:
                # Its wait ends here, in an error: counted like a grant's.
                self._count_wait(int(1000.0 * (now - t.queued_at)))
                self.requests_errors += 1
                t.tstate = T_FAILED
                t.error = failure
                self.out.append(Wake(t))
        self.queue.clear()
        self.n_waiting = 0
        for t in self.ready_waiters:
            t.tstate = T_FAILED
            t.error = failure
            self.out.append(Wake(t))
        self.ready_waiters.clear()

    def _count_wait(self, wait_ms: int) -> None:
        """A client's wait ended (`_grant()` does the same inline)."""
        if self.samples is not None:
            self.sample("wait", wait_ms / 1000.0)
        self.requests_wait_ms += wait_ms
        if not wait_ms:  # else the total shows it was counted
            self.touched.add("requests_wait_ms")

    def _wake_ready(self) -> None:
        for t in self.ready_waiters:
            t.tstate = T_DONE
            self.out.append(Wake(t))
        self.ready_waiters.clear()

    def _starved_since(self) -> float:
        """When the oldest waiting client queued, if every connection is out and none
        can be opened (INF otherwise): only a return can serve it."""
        if not self.max_size or len(self.live) - self.n_old_epoch < self.max_size:
            return INF
        if self.idle or self.n_connecting or self.n_inline or self.n_checking:
            return INF
        for t in self.queue:
            if t.tstate == T_WAITING:
                return t.queued_at
        return INF  # pragma: no cover (n_waiting counts the waiting tickets in queue)

    def _collect_at(self) -> float:
        """When to ask for a garbage collection (see COLLECT_AFTER)."""
        since = self._starved_since()
        if since == INF:
            return INF
        return max(since + COLLECT_AFTER, self.collected_at + self.collect_every)

    def collect_done(self, seconds: float, found: int) -> None:
        """The shell ran the Collect asked for: it took `seconds`, and the collector
        found `found` of the pool's lent connections held by garbage only."""
        every = COLLECT_EVERY if found else min(2.0 * self.collect_every, COLLECT_EVERY_MAX)
        self.collect_every = max(every, seconds * COLLECT_COST_FACTOR)
        self._log_info(
            "pool %r: garbage collection took %.3f sec, found %d connection(s) held by"
            " garbage; the next one no sooner than %g sec",
            self.name,
            seconds,
            found,
            self.collect_every,
        )

    def _stuck_at(self) -> float:
        """When the oldest attempt that may be abandoned will count as hung."""
        if self.n_abandoned >= self.num_workers:
            return INF
        return (
            min(
                (s.started_at for s in self.live if self._abandonable(s)), default=INF - STUCK_AFTER
            )
            + STUCK_AFTER
        )

    def _abandonable(self, slot: Slot) -> bool:
        return slot.state == CONNECTING and not slot.inline and slot.epoch == self.epoch

    def _abandon_stuck(self, now: float) -> None:
        """Stop counting the attempts that have hung for STUCK_AFTER while clients wait.

        An attempt on a network that went silent hangs until its connect timeout,
        holding a place within `max_size` and `num_workers`: a network that heals
        meanwhile would not be tried until then. An abandoned attempt leaves `live`
        (its place goes to a new attempt); if it succeeds after all, its connection
        is kept if there is room (see connected()) and closed otherwise. At most
        `num_workers` are abandoned at a time: each may hold a thread until its
        connect timeout.
        """
        # The same sum as _stuck_at(): see _report_leaks().
        for slot in sorted(
            (s for s in self.live if self._abandonable(s) and s.started_at + STUCK_AFTER <= now),
            key=lambda s: (s.started_at, s.id),
        ):
            if self.n_abandoned >= self.num_workers:
                break
            slot.abandoned = True
            self.live.discard(slot)
            self.n_connecting -= 1
            self.n_abandoned += 1
            self._log_info(
                "connection attempt %s in pool %r hung for %s sec: starting another",
                slot.id,
                self.name,
                round(now - slot.started_at, 1),
            )

    def _need(self) -> int:
        """How many more connection attempts the current demand calls for."""
        n_live = len(self.live) - self.n_old_epoch
        need = max(
            self.min_size - n_live if not self.null else 0,
            self.n_waiting - self.n_connecting,
        )
        if self.max_size:
            need = min(need, self.max_size - n_live)
        if self.want_probe and not self.n_connecting:
            # A null pool's wait() probe tests the server: it is not held to max_size.
            need = max(need, 1)
        return need

    def _fill(self, now: float) -> None:
        """Start the connection attempts the demand calls for, within the limits."""
        if self.status != OPEN:
            return
        need = self._need()
        if need <= 0:
            return
        par = self.num_workers - self.n_connecting
        b = self.backoff
        if b.started_at is not None:
            # While failing, one attempt at a time, and only when the schedule says.
            if self.n_connecting:
                return
            if now < b.retry_at:
                if b.retry_at < self.sleep_until:
                    # New demand in the backoff window: the housekeeper, asleep since
                    # before it, must wake up for the retry.
                    self.out.append(Rearm())
                return
            par = 1
        n = min(need, par)
        if n <= 0:
            return
        if self.n_waiting:
            self._log_info("growing pool %r to %s", self.name, len(self.live) + n)
        probe = self.want_probe
        for _ in range(n):
            slot = self._new_slot(now)
            self.n_connecting += 1
            if probe:
                slot.probe = True
                self.want_probe = probe = False
            # With abandoned attempts still hanging, the shell's workers may all be
            # taken: this attempt must not queue behind them.
            self.out.append(Connect(slot, self.n_abandoned > 0))

    def _log_info(self, msg: str, *args: Any) -> None:
        self.out.append(Log(20, msg, *args))

    def renewed(self) -> PoolCore:
        """A new core with the same settings and no state (for a forked child)."""
        core = PoolCore(
            min_size=self.min_size,
            max_size=self.max_size,
            num_workers=self.num_workers,
            max_waiting=self.max_waiting,
            max_lifetime=self.max_lifetime,
            max_idle=self.max_idle,
            reconnect_timeout=self.reconnect_timeout,
            null=self.null,
            name=self.name,
        )
        core.leak_timeout = self.leak_timeout
        if self.samples is not None:
            core.samples = []  # a metrics exporter listens in the child too
        return core

    # ------------------------------------------------------------------
    # Read-only views

    def waiting(self) -> list[Ticket]:
        """The tickets still waiting, oldest first (for tests and diagnostics; O(n))."""
        return [t for t in self.queue if t.tstate == T_WAITING]

    def pool_size(self) -> int:
        return len(self.live) if self.status != NEW else self.min_size

    def counts(self) -> dict[int, int]:
        """Live slots by state (for tests and diagnostics; O(n))."""
        res = dict.fromkeys(range(CLOSED), 0)
        for s in self.live:
            res[s.state] += 1
        return res
