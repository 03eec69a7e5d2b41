"""Hypothesis drives the core through random histories; the harness checks the invariants.

Run with HYPOTHESIS_PROFILE=ci for the long run that CI does.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as stg
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from psycopg_pool._core import state as st

from .model import Harness

settings.register_profile(
    "ci",
    max_examples=1000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=150, stateful_step_count=40, deadline=None)
# The same, derandomized: the coverage gate of scripts/test.sh must not depend on luck.
settings.register_profile(
    "coverage", max_examples=150, stateful_step_count=40, deadline=None, derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


class PoolMachine(RuleBasedStateMachine):
    h: Harness

    @initialize(
        min_size=stg.integers(0, 3),
        extra=stg.integers(0, 3),
        num_workers=stg.integers(1, 3),
        max_waiting=stg.sampled_from([0, 0, 2]),
        null=stg.booleans(),
        leaks=stg.booleans(),
        seed=stg.integers(0, 2**16),
    )
    def setup(
        self,
        min_size: int,
        extra: int,
        num_workers: int,
        max_waiting: int,
        null: bool,
        leaks: bool,
        seed: int,
    ) -> None:
        if null:
            min_size, max_size = 0, extra  # 0: unlimited
        else:
            max_size = max(min_size + extra, 1)
        self.h = Harness.make(
            seed,
            min_size=min_size,
            max_size=max_size,
            num_workers=num_workers,
            max_waiting=max_waiting,
            null=null,
            max_lifetime=20.0,
            max_idle=7.0,
            reconnect_timeout=10.0,
        )
        if leaks:
            self.h.core.leak_timeout = 2.0
        self.h.open()

    # -- clients

    @rule(can_wait=stg.booleans())
    def getconn(self, can_wait: bool) -> None:
        self.h.getconn(can_wait)

    @precondition(lambda self: self.h.granted)
    @rule(data=stg.data())
    def pick_up(self, data: stg.DataObject) -> None:
        self.h.pick_up(data.draw(stg.sampled_from(self.h.granted)))

    @precondition(lambda self: self.h.waiting or self.h.granted)
    @rule(data=stg.data())
    def withdraw(self, data: stg.DataObject) -> None:
        self.h.withdraw(data.draw(stg.sampled_from(self.h.waiting + self.h.granted)))

    @precondition(lambda self: self.h.held)
    @rule(data=stg.data(), how=stg.sampled_from(["clean", "clean", "dirty", "broken"]))
    def putconn(self, data: stg.DataObject, how: str) -> None:
        slot = data.draw(stg.sampled_from(self.h.held))
        if how == "clean":
            self.h.putconn(slot)
        elif how == "dirty":
            self.h.putconn_dirty(slot)
        else:
            self.h.broken(slot)

    @precondition(lambda self: self.h.checking)
    @rule(data=stg.data(), ok=stg.booleans())
    def io_done(self, data: stg.DataObject, ok: bool) -> None:
        self.h.io_done(data.draw(stg.sampled_from(self.h.checking)), ok)

    # -- the server

    @precondition(lambda self: self.h.connecting)
    @rule(data=stg.data(), how=stg.sampled_from(["ok", "ok", "transient", "fatal"]))
    def connect_done(self, data: stg.DataObject, how: str) -> None:
        slot = data.draw(stg.sampled_from(self.h.connecting))
        if how == "ok":
            self.h.connect_ok(slot)
        else:
            self.h.connect_fail(slot, fatal=how == "fatal")
            core = self.h.core
            quiet = not (core.n_busy or core.n_checking or core.idle)
            if how == "fatal" and quiet and not slot.inline and core.status == st.OPEN:
                # Fail fast: nobody is left waiting for a connection that cannot come.
                assert not core.n_waiting and not self.h.ready_waiting

    # -- time and administration

    @rule(dt=stg.sampled_from([0.05, 0.5, 1.0, 3.0, 8.0]))
    def tick(self, dt: float) -> None:
        self.h.tick(dt)

    @rule(seconds=stg.sampled_from([0.0, 0.02, 4.0]), found=stg.integers(0, 2))
    def collect_done(self, seconds: float, found: int) -> None:
        # The shell tells only after a Collect (rare here: it takes a second of
        # starvation), but any time must do: the interval is the core's only state.
        core = self.h.core
        before = core.collect_every
        core.collect_done(seconds, found)
        self.h.run()
        # Never more often than every COLLECT_EVERY, nor for more than its share of time.
        assert core.collect_every >= max(st.COLLECT_EVERY, seconds * st.COLLECT_COST_FACTOR)
        if not found:
            assert core.collect_every >= min(2 * before, st.COLLECT_EVERY_MAX)

    @rule()
    def check_pool(self) -> None:
        self.h.begin_check()

    @rule()
    def drain(self) -> None:
        self.h.core.drain(self.h.now)
        self.h.run()

    @precondition(lambda self: not self.h.core.null)
    @rule(min_size=stg.integers(0, 3), extra=stg.integers(0, 3))
    def resize(self, min_size: int, extra: int) -> None:
        self.h.core.resize(min_size, max(min_size + extra, 1), self.h.now)
        self.h.run()

    @rule()
    def wait_ready(self) -> None:
        t = self.h.new_ticket()
        if self.h.core.wait_ready(t, self.h.now):
            self.h._end(t, "ready")
        elif t.tstate == st.T_FAILED:
            self.h._end(t, "failed")  # connecting fails for good: at once
        else:
            self.h.ready_waiting.append(t)
        self.h.run()

    @rule(reopen=stg.booleans())
    def close(self, reopen: bool) -> None:
        self.h.close()
        if reopen:
            self.h.open()

    # -- invariants

    @invariant()
    def invariants(self) -> None:
        if hasattr(self, "h"):
            self.h.check()

    @invariant()
    def deadline_is_future_or_actionable(self) -> None:
        # The housekeeper never spins: after a tick, the next deadline is in the future.
        if hasattr(self, "h") and self.h.core.status == st.OPEN:
            h = self.h
            h.core.tick(h.now)
            h.run()
            assert h.core.next_deadline() > h.now
            h.check()


PoolMachine.TestCase.settings = settings(settings.default)
TestPoolMachine = PoolMachine.TestCase
