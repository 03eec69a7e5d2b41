"""A test harness around PoolCore: it plays the shell, and keeps its own tally.

The harness executes the core's commands the way a shell would (connection
attempts are kept pending until the test decides how they end), and records in
its own structures where every slot and ticket is. `check()` compares that tally
with the core after every step: the invariants of `psycopg_pool/_core/state.py`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from psycopg_pool._core import state as st
from psycopg_pool._core.commands import (
    Close,
    Collect,
    Connect,
    LeakSuspected,
    Log,
    Rearm,
    ReconnectFailed,
    Wake,
)
from psycopg_pool._core.state import PoolCore, Slot, Ticket


class T(Ticket):
    """A ticket that remembers being woken."""

    __slots__ = ("n", "woken")

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.woken = 0

    def __repr__(self) -> str:
        return f"<T{self.n} state={self.tstate}>"


@dataclass
class Harness:
    core: PoolCore
    now: float = 0.0
    connecting: list[Slot] = field(default_factory=list)  # pending Connect commands
    held: list[Slot] = field(default_factory=list)  # in clients' hands
    checking: list[Slot] = field(default_factory=list)  # under rollback/reset/check
    waiting: list[T] = field(default_factory=list)  # in queue order
    granted: list[T] = field(default_factory=list)  # woken with a grant, not picked up yet
    ready_waiting: list[T] = field(default_factory=list)
    closed: set[int] = field(default_factory=set)
    ended: dict[int, str] = field(default_factory=dict)  # ticket n -> outcome
    granted_at: dict[int, float] = field(default_factory=dict)
    reconnect_failed: int = 0
    leaks: list[Slot] = field(default_factory=list)
    rearms: int = 0
    collects: int = 0
    logs: list[Log] = field(default_factory=list)
    next_ticket: int = 0
    conns: int = 0

    @classmethod
    def make(cls, seed: int = 0, **kwargs: object) -> Harness:
        params: dict[str, object] = {
            "min_size": 2,
            "max_size": 4,
            "num_workers": 3,
            "max_lifetime": 100.0,
            "max_idle": 50.0,
            "reconnect_timeout": 30.0,
            "rng": random.Random(seed),
        }
        params.update(kwargs)
        return cls(PoolCore(**params))  # type: ignore[arg-type]

    # -- playing the shell ------------------------------------------------

    def run(self) -> None:
        """Execute the commands the core left in its outbox."""
        cmds, self.core.out = self.core.out, []
        rearmed = False
        for cmd in cmds:
            if isinstance(cmd, Connect):
                assert cmd.slot.state == st.CONNECTING
                # Bounds: no attempt is started beyond max_size. (After a resize down
                # the pool may be above it for a while: it shrinks lazily.)
                core = self.core
                # More attempts than num_workers only when clients wait (the others hang).
                assert core.n_connecting <= core.num_workers or core.n_waiting
                if core.max_size and not cmd.slot.probe:
                    assert len(core.live) - core.n_old_epoch <= core.max_size, "bounds"
                self.connecting.append(cmd.slot)
            elif isinstance(cmd, Close):
                self._closed(cmd.slot)
            elif isinstance(cmd, Wake):
                self._woken(cmd.ticket)  # type: ignore[arg-type]
            elif isinstance(cmd, ReconnectFailed):
                self.reconnect_failed += 1
            elif isinstance(cmd, Rearm):
                self.rearms += 1
                rearmed = True
            elif isinstance(cmd, Log):
                self.logs.append(cmd)
            elif isinstance(cmd, Collect):
                # Only while a client has waited COLLECT_AFTER with every connection out.
                core = self.core
                assert core.n_waiting and core.max_size
                assert core.n_busy == len(core.live) >= core.max_size
                assert core._starved_since() + st.COLLECT_AFTER <= self.now
                self.collects += 1
            elif isinstance(cmd, LeakSuspected):
                assert cmd.slot.state == st.IN_USE
                assert cmd.slot.taken_at + self.core.leak_timeout <= self.now
                self.leaks.append(cmd.slot)
            else:
                raise AssertionError(f"unknown command {cmd!r}")
        if rearmed:
            self.core.next_deadline()  # what the woken housekeeper does

    def _closed(self, slot: Slot) -> None:
        assert slot.id not in self.closed, f"{slot} closed twice"
        assert slot.state == st.CLOSED
        assert slot not in self.core.live
        self.closed.add(slot.id)

    def _woken(self, t: T) -> None:
        t.woken += 1
        assert t.woken == 1, f"{t} woken twice"
        if t.tstate == st.T_GRANTED:
            self._granted(t)
        elif t.tstate == st.T_FAILED:
            if t in self.waiting:
                self.waiting.remove(t)
            if t in self.ready_waiting:
                self.ready_waiting.remove(t)
            self._end(t, "failed")
        elif t.tstate == st.T_DONE:
            assert t in self.ready_waiting
            self.ready_waiting.remove(t)
            self._end(t, "ready")
        else:
            raise AssertionError(f"woken in state {t.tstate}")

    def _granted(self, t: T) -> None:
        # First come, first served: the grant goes to the oldest waiting ticket, and
        # the slot is the client's from then on.
        assert self.waiting and self.waiting[0] is t, (t, self.waiting)
        self.waiting.pop(0)
        assert t.slot is not None and t.slot.state == st.IN_USE
        assert t.slot.taken_at == self.now and t.slot.ticket is t
        assert t.slot.expire_at > self.now, "an expired connection was granted"
        self.granted.append(t)
        self.granted_at[t.n] = self.now

    def _end(self, t: T, how: str) -> None:
        assert t.n not in self.ended, f"{t} ended twice: {self.ended[t.n]} then {how}"
        self.ended[t.n] = how

    def _hand_out(self, slot: Slot, at: float | None = None) -> None:
        """A client gets `slot`; `at` is when the core picked it (a grant, if earlier)."""
        assert slot.state == st.IN_USE
        at = self.now if at is None else at
        assert slot.expire_at > at, "an expired connection was handed out"
        assert slot not in self.held
        self.held.append(slot)

    # -- client actions ----------------------------------------------------

    def new_ticket(self) -> T:
        self.next_ticket += 1
        return T(self.next_ticket)

    def getconn(self, can_wait: bool = True) -> tuple[int, T | None]:
        """take() then request(): returns the outcome and the ticket if one was made."""
        slot = self.core.take(self.now)
        self.run()
        if slot is not None:
            self._hand_out(slot)
            return st.GOT, None
        t = self.new_ticket()
        res = self.core.request(t, self.now, can_wait)
        self.run()
        if res == st.GOT:
            assert t.slot is not None
            self._hand_out(t.slot)
            self._end(t, "got")
        elif res == st.QUEUED:
            self.waiting.append(t)
        elif res == st.INLINE:
            assert t.slot is not None and t.slot.inline
            self.connecting.append(t.slot)
            self._end(t, "inline")
        else:
            self._end(t, f"refused {res}")
        return res, t

    def pick_up(self, t: T) -> None:
        """The client woken with a grant takes its connection: no call to the core."""
        self.granted.remove(t)
        assert t.tstate == st.T_GRANTED and t.slot is not None
        self._hand_out(t.slot, self.granted_at[t.n])
        self._end(t, "granted")

    def withdraw(self, t: T) -> None:
        """The client gives up: while waiting, or woken with a grant not picked up."""
        if t in self.waiting:
            self.waiting.remove(t)
        else:
            self.granted.remove(t)
        assert t.tstate in (st.T_WAITING, st.T_GRANTED)
        self.core.withdraw(t, self.now, 0)
        self.run()
        self._end(t, "withdrawn")

    def putconn(self, slot: Slot) -> None:
        self.held.remove(slot)
        t = self.core.release(slot, self.now)
        if t is not None:
            self._woken(t)
        self.run()

    def putconn_dirty(self, slot: Slot) -> None:
        """Returned needing a rollback: goes through CHECKING."""
        self.held.remove(slot)
        self.core.begin_io(slot, self.now)
        self.run()
        self.checking.append(slot)

    def io_done(self, slot: Slot, ok: bool) -> None:
        self.checking.remove(slot)
        if ok:
            t = self.core.release(slot, self.now)
            if t is not None:
                self._woken(t)
        else:
            self.core.discard(slot, self.now, "returns_bad")
        self.run()

    def broken(self, slot: Slot) -> None:
        self.held.remove(slot)
        self.core.discard(slot, self.now, "returns_bad")
        self.run()

    def connect_ok(self, slot: Slot) -> None:
        self.connecting.remove(slot)
        self.conns += 1
        t = self.core.connected(slot, f"conn{self.conns}", self.now, 1)
        if t is not None:
            self._woken(t)
        self.run()
        if slot.inline and slot.state == st.IN_USE:
            self._hand_out(slot)

    def connect_fail(self, slot: Slot, fatal: bool = False) -> None:
        self.connecting.remove(slot)
        self.core.connect_failed(slot, self.now, True, RuntimeError("boom"), fatal)
        self.run()
        assert slot.state == st.CLOSED

    def begin_check(self) -> list[Slot]:
        slots = self.core.begin_check(self.now)
        self.run()
        self.checking.extend(slots)
        return slots

    def tick(self, dt: float) -> None:
        self.now += dt
        self.core.tick(self.now)
        self.run()
        self.core.next_deadline()

    def open(self) -> None:
        self.core.open(self.now)
        self.run()

    def close(self) -> None:
        self.core.close(self.now)
        self.run()
        for t in self.granted:
            # Granted connections are the clients' already: they keep them.
            assert t.tstate == st.T_GRANTED and t.slot is not None
        assert not self.waiting, "close() must fail every waiting client"

    # -- the invariants ----------------------------------------------------

    def check(self) -> None:
        core = self.core
        # Where the harness believes each live slot is.
        believed: dict[Slot, int] = {}
        for s in self.connecting:
            if not s.abandoned:
                believed[s] = st.CONNECTING
        abandoned = [s for s in self.connecting if s.abandoned]
        assert core.n_abandoned == len(abandoned), "abandoned attempts miscounted"
        assert core.n_abandoned <= core.num_workers
        assert all(s.state == st.CONNECTING and s not in core.live for s in abandoned)
        for s in self.held:
            believed[s] = st.IN_USE
        for s in self.checking:
            believed[s] = st.CHECKING
        for t in self.granted:
            assert t.tstate == st.T_GRANTED and t.slot is not None
            believed[t.slot] = st.IN_USE
        for s in core.idle:
            believed[s] = st.IDLE
        # Held slots of a closed or drained pool stay live until they are returned.
        assert not [s for s in believed if s.id in self.closed], "a closed slot is still in use"
        live = set(believed)
        assert core.live == live, (
            f"conservation: core has {sorted(s.id for s in core.live)},"
            f" harness {sorted(s.id for s in live)}"
        )
        for s, state in believed.items():
            assert s.state == state, f"{s} should be {st.STATE_NAMES[state]}"
        by_state = core.counts()
        assert by_state[st.IDLE] == len(core.idle)
        n_inline = sum(1 for s in core.live if s.state == st.CONNECTING and s.inline)
        assert core.n_inline == n_inline
        assert core.n_connecting == by_state[st.CONNECTING] - n_inline
        assert core.n_busy == by_state[st.IN_USE]
        assert core.n_checking == by_state[st.CHECKING]
        assert core.n_old_epoch == sum(1 for s in core.live if s.epoch != core.epoch)
        assert not (core.idle and core.n_waiting), "an idle connection while a client waits"
        assert core.waiting() == self.waiting, "queue order"
        assert core.n_waiting == len(self.waiting), "n_waiting"
        for s in core.idle:
            assert s.generation == core.generation
        # Liveness: with demand and no attempt running, the housekeeper wakes up for the
        # next retry (it sleeps until sleep_until unless told to look again).
        b = core.backoff
        if core.status == st.OPEN and b.failing and not core.n_connecting and core._need() > 0:
            assert core.sleep_until <= b.retry_at, "the retry would be missed"
        # Every ticket is accounted for exactly once: ended, or still somewhere.
        assert self.next_ticket == (
            len(self.ended) + len(self.waiting) + len(self.granted) + len(self.ready_waiting)
        ), "a ticket was lost"
        # Never below min_size, unless connecting is failing or already at full speed.
        if core.status == st.OPEN and not core.null:
            assert (
                len(core.live) - core.n_old_epoch >= core.min_size
                or core.backoff.failing
                or core.n_connecting >= core.num_workers
            ), "below min_size"
