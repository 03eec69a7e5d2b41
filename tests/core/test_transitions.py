"""Stories told to the core, one fact at a time, with what it must answer."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from psycopg_pool._core import state as st
from psycopg_pool._core.backoff import AttemptWithBackoff, Backoff
from psycopg_pool._core.commands import Close, Connect, Log, ReconnectFailed
from psycopg_pool._core.state import Slot
from psycopg_pool._core.stats import snapshot

from .model import Harness, T


def filled(n: int = 2, **kwargs: object) -> Harness:
    """An open pool whose first `n` attempts succeeded."""
    h = Harness.make(**kwargs)
    h.open()
    while h.connecting and n:
        h.connect_ok(h.connecting[0])
        n -= 1
    h.check()
    return h


def two_queued() -> tuple[Harness, T, T]:
    """One connection, held, and two clients queued for it in that order."""
    h = filled(1, min_size=1, max_size=1)
    h.getconn()
    _, t1 = h.getconn()
    _, t2 = h.getconn()
    assert t1 and t2
    return h, t1, t2


def test_open_starts_min_size_attempts_within_num_workers() -> None:
    h = Harness.make(min_size=5, max_size=5, num_workers=3)
    h.open()
    assert len(h.connecting) == 3
    h.connect_ok(h.connecting[0])
    assert len(h.connecting) == 3  # one done, the next one started
    while h.connecting:
        h.connect_ok(h.connecting[0])
    assert len(h.core.idle) == 5
    h.check()


def test_hot_path_takes_from_the_left_and_returns_to_the_right() -> None:
    h = filled(2, min_size=2, max_size=2)
    first, second = list(h.core.idle)
    h.getconn()
    assert h.held == [first]
    h.putconn(first)
    assert list(h.core.idle) == [second, first]
    assert h.core.out == []
    h.check()


def test_waiters_are_served_first_come_first_served() -> None:
    h = filled(1, min_size=1, max_size=1)
    h.getconn()
    tickets = [h.getconn()[1] for _ in range(3)]
    assert [t.tstate for t in tickets if t] == [st.T_WAITING] * 3
    slot = h.held[0]
    h.putconn(slot)
    assert h.granted == [tickets[0]]
    h.pick_up(tickets[0])  # type: ignore[arg-type]
    h.putconn(h.held[0])
    assert h.granted == [tickets[1]]
    h.check()


def test_the_wait_of_a_served_waiter_is_counted_even_when_it_is_zero() -> None:
    h, t1, t2 = two_queued()
    assert "requests_wait_ms" not in snapshot(h.core)
    h.putconn(h.held[0])  # the grant ends the wait
    assert h.granted == [t1]
    assert snapshot(h.core)["requests_wait_ms"] == 0  # shown once counted, even as 0
    h.pick_up(t1)
    h.now += 0.007
    h.putconn(h.held[0])
    assert h.granted == [t2]
    assert snapshot(h.core)["requests_wait_ms"] == 7
    h.now += 1.0
    h.pick_up(t2)  # picking the grant up later changes nothing
    assert snapshot(h.core)["requests_wait_ms"] == 7
    h.check()


def test_a_withdrawn_waiter_leaves_the_queue_at_once() -> None:
    h, t1, t2 = two_queued()
    assert snapshot(h.core)["requests_waiting"] == 2
    h.withdraw(t1)
    assert snapshot(h.core)["requests_waiting"] == 1
    h.putconn(h.held[0])
    assert h.granted == [t2]
    h.check()


def test_withdrawn_tickets_do_not_pile_up_while_no_connection_comes_back() -> None:
    # Say every connection leaked and clients keep timing out: the queue must not
    # grow with their dead tickets, and the live ones keep their order.
    h = filled(1, min_size=1, max_size=1)
    h.getconn()
    keep = [h.getconn()[1] for _ in range(3)]
    for _ in range(1000):
        _, t = h.getconn()
        assert t
        h.withdraw(t)
        h.check()
    assert len(h.core.queue) <= 2 * 3 + 64
    assert h.core.waiting() == keep
    h.putconn(h.held[0])
    assert h.granted == [keep[0]]
    h.check()


def test_a_grant_to_a_withdrawn_ticket_passes_to_the_next_one() -> None:
    h, t1, t2 = two_queued()
    h.putconn(h.held[0])
    assert h.granted == [t1]
    granted_slot = t1.slot
    h.withdraw(t1)  # cancelled at the very moment it was served
    assert h.granted == [t2] and t2.slot is granted_slot
    h.withdraw(t2)
    assert list(h.core.idle) == [granted_slot]  # nobody left: back to idle, not lost
    h.check()


def test_max_waiting_refuses_extra_clients() -> None:
    h = filled(1, min_size=1, max_size=1, max_waiting=2)
    h.getconn()
    assert h.getconn()[0] == st.QUEUED
    assert h.getconn()[0] == st.QUEUED
    assert h.getconn()[0] == st.TOO_MANY
    assert h.core.requests_errors == 1
    h.check()


def test_no_wait_request_gets_an_idle_connection_or_nothing() -> None:
    h = filled(1, min_size=1, max_size=2)
    assert h.getconn(can_wait=False)[0] == st.GOT
    res, _ = h.getconn(can_wait=False)
    assert res == st.NO_WAIT
    assert h.core.waiting() == [] and h.core.n_waiting == 0
    h.check()


def test_growth_is_parallel_for_uncovered_waiters_and_bounded() -> None:
    h = filled(2, min_size=2, max_size=10, num_workers=4)
    h.getconn()
    h.getconn()
    for _ in range(20):
        h.getconn()
    # 20 waiters: 4 attempts at once (num_workers), never more than max_size in all.
    assert len(h.connecting) == 4
    while h.connecting:
        h.connect_ok(h.connecting[0])
        h.check()
    assert len(h.core.live) == 10
    assert any("growing pool" in log.msg for log in h.logs)


def test_growth_is_only_for_waiters_not_already_covered() -> None:
    h = filled(2, min_size=2, max_size=10, num_workers=3)
    h.getconn()
    h.getconn()
    h.getconn()
    assert len(h.connecting) == 1
    h.getconn()
    assert len(h.connecting) == 2


def test_lifetime_is_jittered_down_by_at_most_five_percent() -> None:
    h = filled(4, min_size=4, max_size=4, max_lifetime=100.0)
    lifetimes = [s.expire_at - s.created_at for s in h.core.idle]
    assert all(95.0 <= x <= 100.0 for x in lifetimes)
    assert len(set(lifetimes)) > 1


def test_expired_connection_is_never_handed_out_and_replaced_in_background() -> None:
    h = filled(2, min_size=2, max_size=2, max_lifetime=10.0, max_idle=1000.0)
    assert h.core.next_deadline() <= 10.0
    h.tick(10.0)
    assert len(h.core.idle) == 0
    assert len(h.closed) == 2
    assert len(h.connecting) == 2  # replacements
    h.check()


def test_expired_connection_found_on_take_is_skipped() -> None:
    h = filled(2, min_size=2, max_size=2, max_lifetime=10.0, max_idle=1000.0)
    h.now = 10.0  # no tick yet: the housekeeper is late
    res, _t = h.getconn()
    assert res == st.QUEUED and len(h.closed) == 2
    h.check()


def test_expired_connection_is_closed_on_return() -> None:
    h = filled(1, min_size=1, max_size=1, max_lifetime=10.0, max_idle=1000.0)
    h.getconn()
    h.now = 11.0
    h.putconn(h.held[0])
    assert len(h.closed) == 1 and len(h.connecting) == 1
    h.check()


def test_shrink_closes_one_unused_connection_per_max_idle() -> None:
    h = filled(2, min_size=2, max_size=4, max_idle=10.0, max_lifetime=1e6)
    # A burst of 4 clients grows the pool to 4.
    for _ in range(4):
        h.getconn()
    while h.connecting:
        h.connect_ok(h.connecting[0])
    for t in list(h.granted):
        h.pick_up(t)
    for slot in list(h.held):
        h.putconn(slot)
    sizes = []
    for _ in range(4):
        h.tick(10.0)
        sizes.append(len(h.core.live))
    assert sizes == [4, 3, 2, 2]
    h.check()


def test_resize_grows_at_once_and_shrinks_lazily() -> None:
    h = filled(2, min_size=2, max_size=2, max_idle=10.0, max_lifetime=1e6)
    h.core.resize(4, 4, h.now)
    h.run()
    assert len(h.connecting) == 2
    while h.connecting:
        h.connect_ok(h.connecting[0])
    h.core.resize(1, 1, h.now)
    h.run()
    assert len(h.core.live) == 4
    h.tick(10.0)  # the first period only measures
    h.tick(10.0)
    assert len(h.core.live) == 3


def test_backoff_schedule_and_reconnect_failed_once_per_outage() -> None:
    h = Harness.make(min_size=3, max_size=3, reconnect_timeout=30.0, num_workers=3)
    h.open()
    assert len(h.connecting) == 3
    for slot in list(h.connecting):
        h.connect_fail(slot)
    b = h.core.backoff
    assert b.failing and 0.9 <= b.retry_at <= 1.1
    assert h.connecting == []  # nobody waits: no attempt before the schedule
    retries = []
    for _ in range(12):
        h.tick(h.core.next_deadline() - h.now)
        assert len(h.connecting) == 1  # one probe at a time while failing
        retries.append(h.now)
        h.connect_fail(h.connecting[0])
    gaps = [b - a for a, b in itertools.pairwise(retries)]
    assert 1.8 <= gaps[0] <= 2.2 and 3.6 <= gaps[1] <= 4.4
    assert max(gaps) <= 30.0 and max(gaps[-3:]) <= 10.0 + 1e-9
    assert h.reconnect_failed == 1
    # Back up: one success brings the rest in parallel, and the streak is over.
    h.tick(h.core.next_deadline() - h.now)
    h.connect_ok(h.connecting[0])
    assert len(h.connecting) == 2 and not b.failing
    h.check()


def test_waiting_clients_make_a_failing_pool_probe_often() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    h.connect_fail(h.connecting[0])
    h.tick(1.1)
    h.connect_fail(h.connecting[0])  # next retry ~2 s away
    h.getconn()
    assert h.core.next_deadline() <= h.now + st.DEMAND_PROBE_INTERVAL + 1e-9
    h.tick(st.DEMAND_PROBE_INTERVAL)
    assert len(h.connecting) == 1
    h.connect_ok(h.connecting[0])
    assert len(h.granted) == 1


def test_check_on_a_failing_pool_probes_at_once() -> None:
    # An explicit check() is demand: the next attempt need not wait for its schedule.
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    h.connect_fail(h.connecting[0])
    assert h.core.backoff.retry_at > h.now and not h.connecting
    assert h.begin_check() == []
    assert h.core.backoff.retry_at == h.now and len(h.connecting) == 1


def test_check_refills_to_min_size_without_an_extra_connection() -> None:
    h = filled(2, min_size=2, max_size=4)
    slots = h.begin_check()
    assert len(slots) == 2 and h.connecting == []
    h.io_done(slots[0], False)  # broken: replaced
    assert len(h.connecting) == 1
    h.io_done(slots[1], True)
    assert h.core.connections_lost == 0  # counted by the shell's discard reason
    h.check()


def test_drain_replaces_idle_now_and_busy_on_return() -> None:
    h = filled(2, min_size=2, max_size=2)
    h.getconn()
    busy = h.held[0]
    h.core.drain(h.now)
    h.run()
    assert len(h.closed) == 1 and len(h.connecting) == 1
    h.connect_ok(h.connecting[0])
    h.putconn(busy)
    assert busy.id in h.closed
    h.check()


def test_close_fails_waiters_and_leaves_grants_to_their_clients_then_reopens() -> None:
    h, t1, t2 = two_queued()
    h.putconn(h.held[0])  # granted to t1, not picked up yet
    granted = t1.slot
    h.close()
    assert t1.tstate == st.T_GRANTED and t2.tstate == st.T_FAILED
    assert h.core.live == {granted}  # the grant was the hand-over: it is t1's
    h.check()
    h.pick_up(t1)
    assert granted is not None
    h.putconn(granted)
    assert granted.id in h.closed  # closed as it comes back
    assert h.core.live == set()
    assert h.core.take(h.now) is None
    assert h.core.request(h.new_ticket(), h.now, True) == st.IS_CLOSED
    h.open()
    assert len(h.connecting) == 1


def test_connection_finished_after_close_is_closed() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    slot = h.connecting[0]
    h.core.close(h.now)
    h.run()
    h.connect_ok(slot)
    assert slot.id in h.closed and h.core.live == set()


def test_wait_ready_wakes_when_min_size_is_idle() -> None:
    h = Harness.make(min_size=2, max_size=2)
    h.open()
    t = h.new_ticket()
    assert not h.core.wait_ready(t, h.now)
    h.ready_waiting.append(t)
    h.connect_ok(h.connecting[0])
    assert t.tstate == st.T_WAITING
    h.connect_ok(h.connecting[0])
    assert h.ended[t.n] == "ready"


def test_wait_ready_wakes_when_a_return_makes_min_size_idle() -> None:
    h = filled(2, min_size=2, max_size=2)
    h.getconn()
    t = h.new_ticket()
    assert not h.core.wait_ready(t, h.now)  # one of two idle
    h.ready_waiting.append(t)
    h.putconn(h.held[0])
    assert h.ended[t.n] == "ready"
    h.check()


def test_null_preset_connects_inline_and_closes_returns() -> None:
    h = Harness.make(min_size=0, max_size=2, null=True)
    h.open()
    assert h.connecting == []
    res, t = h.getconn()
    assert res == st.INLINE and t and t.slot
    h.connect_ok(t.slot)
    assert h.held == [t.slot]
    _res2, t2 = h.getconn()
    h.connect_ok(t2.slot)  # type: ignore[union-attr, arg-type]
    assert h.getconn()[0] == st.QUEUED  # at max_size: wait for a return
    h.putconn(h.held[0])
    assert len(h.granted) == 1  # handed over rather than closed
    h.putconn(h.held[0])
    assert len(h.closed) == 1  # nobody waits: closed
    assert snapshot(h.core)["pool_available"] == 0
    h.check()


def test_a_failed_inline_attempt_makes_room_for_the_client_queued_behind_it() -> None:
    h = Harness.make(min_size=0, max_size=1, null=True)
    h.open()
    res, t = h.getconn()
    assert res == st.INLINE and t and t.slot
    assert h.getconn()[0] == st.QUEUED  # at max_size: waits behind the inline attempt
    h.connect_fail(t.slot)
    assert h.core.n_inline == 0
    assert len(h.connecting) == 1  # an attempt for the queued client
    h.connect_ok(h.connecting[0])
    assert len(h.granted) == 1
    h.check()


def test_null_wait_probes_one_connection() -> None:
    h = Harness.make(min_size=0, max_size=0, null=True)
    h.open()
    t = h.new_ticket()
    assert not h.core.wait_ready(t, h.now)
    h.ready_waiting.append(t)
    h.run()
    assert len(h.connecting) == 1
    h.connect_ok(h.connecting[0])
    assert h.ended[t.n] == "ready" and len(h.closed) == 1
    assert h.core.connections_num == 1 and len(h.core.live) == 0


def test_stats_snapshot_and_pop() -> None:
    h = filled(2, min_size=2, max_size=2)
    h.getconn()
    h.now = 5.0  # lent_at 0.0 means "not lent by connection()": real clocks are never 0
    h.held[0].lent_at = h.now
    h.putconn(h.held[0])
    h.getconn()
    stats = snapshot(h.core)
    assert stats["pool_size"] == 2 and stats["pool_available"] == 1
    assert stats["requests_num"] == 2 and stats["usage_ms"] == 0
    assert "returns_bad" not in stats
    popped = snapshot(h.core, reset=True)
    assert popped["requests_num"] == 2
    after = snapshot(h.core)
    assert "requests_num" not in after and "usage_ms" not in after
    assert after["pool_size"] == 2


def test_pool_size_is_min_size_before_open() -> None:
    h = Harness.make(min_size=3, max_size=5)
    assert snapshot(h.core)["pool_size"] == 3


def test_reconnect_log_and_command_are_emitted_together() -> None:
    h = Harness.make(min_size=1, max_size=1, reconnect_timeout=0.0)
    h.open()
    h.core.connect_failed(h.connecting.pop(), h.now, True, None)
    cmds = h.core.out
    assert any(isinstance(c, ReconnectFailed) for c in cmds)
    assert any(isinstance(c, Log) and "reconnection attempt" in c.msg for c in cmds)
    h.run()


def test_commands_have_readable_reprs() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    assert any(isinstance(c, Connect) for c in h.core.out) or h.connecting
    slot = h.connecting[0]
    assert "connecting" in repr(slot) and "Close(" in repr(Close(slot))


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_backoff_clips_the_last_retry_to_the_give_up_time(jitter: float) -> None:
    import random

    b = Backoff(random.Random(1), jitter=jitter)
    assert not b.failed(0.0, 0.0, 5.0)
    assert b.retry_at <= 1.1
    assert not b.failed(b.retry_at, b.retry_at, 5.0)
    assert not b.failed(b.retry_at, b.retry_at, 5.0)
    assert b.retry_at == 5.0  # 1 + 2 + 4 > 5: clipped
    assert b.failed(5.0, 5.0, 5.0)  # an attempt started at the give-up time fails
    assert not b.failed(b.retry_at, b.retry_at, 5.0)  # reported once


def test_backoff_reads_the_knobs_set_on_attempt_with_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random

    b = Backoff(random.Random(1))
    monkeypatch.setattr(AttemptWithBackoff, "INITIAL_DELAY", 0.5)
    monkeypatch.setattr(AttemptWithBackoff, "DELAY_JITTER", 0.0)
    monkeypatch.setattr(AttemptWithBackoff, "DELAY_BACKOFF", 3.0)
    b.failed(0.0, 0.0, 100.0)  # the streak starts with the knobs as they are now
    assert b.retry_at == 0.5
    b.failed(0.5, 0.5, 100.0)
    assert b.retry_at == 0.5 + 1.5


def test_samples_record_wait_use_create_and_timeouts() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.core.samples = []
    h.open()
    h.now = 1.0
    h.connect_ok(h.connecting[0])
    h.getconn()
    h.held[0].lent_at = h.now  # lent by connection()
    _, t = h.getconn()
    assert t
    h.now = 1.5
    h.putconn(h.held[0])
    h.pick_up(t)
    _, t2 = h.getconn()
    assert t2
    h.withdraw(t2)
    h.core.sample("timeout", 2.0)
    kinds = [k for k, _ in h.core.samples]
    assert kinds == ["create", "use", "wait", "wait", "timeout"]
    assert dict(h.core.samples)["use"] == 0.5
    h.check()


def test_usage_ms_counts_through_reset_and_discard() -> None:
    h = filled(2, min_size=2, max_size=2)
    h.now = 1.0
    h.getconn()
    h.getconn()
    a, b = h.held
    a.lent_at = b.lent_at = 0.25
    h.putconn_dirty(a)  # usage counted when the return starts, before the rollback
    h.broken(b)
    assert h.core.usage_ms == 1500 and h.core.returns_bad == 1
    h.io_done(a, True)
    h.check()


def test_usage_ms_truncates_each_block_as_upstream_does() -> None:
    h = filled(1, min_size=1, max_size=1)
    h.now = 1.0
    for held in (0.0004, 0.0004, 0.0025):  # 0 + 0 + 2 ms, not int(3.3)
        h.getconn()
        slot = h.held[0]
        slot.lent_at = h.now  # lent by connection()
        h.now += held
        h.putconn(slot)
        assert slot.lent_at == 0.0
    assert h.core.usage_ms == 2 and snapshot(h.core)["usage_ms"] == 2
    h.check()


def test_usage_under_a_millisecond_through_reset_is_reported_and_sampled() -> None:
    h = filled(1, min_size=1, max_size=1)
    h.core.samples = []
    h.now = 1.0
    h.getconn()
    h.held[0].lent_at = h.now  # lent by connection(), given back within the same ms
    slot = h.held[0]
    h.putconn_dirty(slot)
    assert h.core.usage_ms == 0 and snapshot(h.core)["usage_ms"] == 0
    assert h.core.samples == [("use", 0.0)] and slot.lent_at == 0.0
    h.io_done(slot, True)
    h.check()


def test_discard_counts_lost_connections() -> None:
    h = filled(1, min_size=1, max_size=1)
    h.getconn()
    slot = h.held.pop()
    h.core.discard(slot, h.now, "connections_lost")
    h.run()
    assert h.core.connections_lost == 1 and len(h.connecting) == 1
    h.check()


def test_evict_replaces_an_idle_connection_only() -> None:
    h = filled(2, min_size=2, max_size=2)
    first, second = list(h.core.idle)
    assert h.core.evict(first, h.now)
    h.run()
    assert h.core.connections_lost == 1 and len(h.connecting) == 1
    h.getconn()
    assert not h.core.evict(second, h.now)  # lent meanwhile: not the pool's to close
    h.check()


def test_withdraw_ready_forgets_the_waiter() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    t = h.new_ticket()
    assert not h.core.wait_ready(t, h.now)
    h.core.withdraw_ready(t)
    assert h.core.ready_waiters == [] and t.tstate == st.T_WITHDRAWN
    h.core.withdraw_ready(t)  # twice is harmless
    h.connect_ok(h.connecting[0])
    assert t.woken == 0


def test_request_takes_an_idle_connection_and_skips_expired_ones() -> None:
    h = filled(2, min_size=2, max_size=2, max_lifetime=10.0, max_idle=1000.0)
    first, second = list(h.core.idle)
    first.expire_at = 5.0
    h.now = 6.0
    t = h.new_ticket()
    assert h.core.request(t, h.now, True) == st.GOT
    h.run()
    assert t.slot is second and first.id in h.closed
    h.held.append(second)
    h.ended[t.n] = "got"
    h.check()


def test_withdrawing_a_ticket_served_at_once_is_a_bug() -> None:
    h = filled(1, min_size=1, max_size=1)
    t = h.new_ticket()
    assert h.core.request(t, h.now, True) == st.GOT  # served from the idle deque
    with pytest.raises(AssertionError):
        h.core.withdraw(t, h.now, 0)


def test_open_twice_and_close_twice() -> None:
    h = Harness.make(min_size=1, max_size=1)
    assert not h.core.close(h.now)
    h.open()
    assert not h.core.open(h.now)
    assert h.core.close(h.now)
    assert not h.core.close(h.now)


def test_check_skips_expired_idle_connections() -> None:
    h = filled(2, min_size=2, max_size=2, max_lifetime=10.0, max_idle=1000.0)
    first, second = list(h.core.idle)
    first.expire_at = 1.0
    h.now = 2.0
    assert h.begin_check() == [second]
    assert first.id in h.closed
    h.io_done(second, True)
    h.check()


def test_tick_keeps_the_connections_not_expired() -> None:
    h = filled(2, min_size=2, max_size=2, max_lifetime=10.0, max_idle=1000.0)
    first, second = list(h.core.idle)
    first.expire_at = 1.0
    h.tick(2.0)
    assert list(h.core.idle) == [second] and first.id in h.closed
    h.check()


def test_a_waiter_while_failing_moves_the_retry_earlier_and_rearms() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    h.connect_fail(h.connecting[0])
    h.core.next_deadline()  # the housekeeper sleeps until the retry (about 1 s)
    rearms = h.rearms
    h.now = 0.5
    h.getconn()
    assert h.core.backoff.retry_at == 0.5 and h.rearms == rearms + 1


def test_a_leak_is_reported_once_per_lending() -> None:
    h = filled(1, min_size=1, max_size=1)
    h.core.leak_timeout = 2.0
    h.getconn()
    assert h.core.next_deadline() == 2.0
    h.tick(2.5)
    assert h.leaks == [h.held[0]]
    h.tick(3.0)
    assert len(h.leaks) == 1


def test_a_client_starved_of_connections_gets_a_garbage_collection() -> None:
    # Every connection out, none can be opened: after COLLECT_AFTER the housekeeper is
    # asked to collect garbage (which may hold some), then at most every COLLECT_EVERY.
    h = filled(1, min_size=1, max_size=1, max_lifetime=1e6, max_idle=1e6)
    h.getconn()
    assert h.core.next_deadline() >= 1e5  # the housekeeper, asleep with nothing to do
    rearms = h.rearms
    _, t = h.getconn()
    assert t is not None and h.rearms == rearms + 1  # it must wake up for this
    assert h.core.next_deadline() == st.COLLECT_AFTER
    h.tick(st.COLLECT_AFTER / 2)
    assert h.collects == 0
    h.tick(st.COLLECT_AFTER / 2)
    assert h.collects == 1
    assert any("collecting garbage" in log.msg for log in h.logs)
    assert h.core.next_deadline() == st.COLLECT_AFTER + st.COLLECT_EVERY
    _, t2 = h.getconn()  # a deadline that near needs no wake-up
    assert h.rearms == rearms + 1
    h.tick(st.COLLECT_EVERY - 0.1)
    assert h.collects == 1
    h.tick(0.1)
    assert h.collects == 2
    # A withdrawn ticket ahead in the queue does not count as waiting.
    h.withdraw(t)
    assert h.core.queue[0] is t
    assert h.core._starved_since() == t2.queued_at  # type: ignore[union-attr]
    # A return ends the starvation: no more deadline for it.
    h.putconn(h.held[0])
    assert h.core.n_waiting == 0
    assert h.core.next_deadline() >= 1e5


def test_collections_that_find_nothing_back_off_and_one_that_finds_resets() -> None:
    # A long overload keeps clients waiting with every connection out, and garbage
    # holds none of them: a full collection, which stalls the whole process, would
    # run every COLLECT_EVERY for as long as the overload lasts.
    h = filled(1, min_size=1, max_size=1, max_lifetime=1e6, max_idle=1e6)
    h.getconn()
    h.getconn()
    h.tick(st.COLLECT_AFTER)
    assert h.collects == 1
    every = st.COLLECT_EVERY
    while every < st.COLLECT_EVERY_MAX:
        h.core.collect_done(0.001, 0)
        every = min(2 * every, st.COLLECT_EVERY_MAX)
        assert h.core.next_deadline() == h.now + every
        h.tick(every)
        assert h.collects >= 2
    assert any("found 0 connection" in log.msg % log.args for log in h.logs)
    h.core.collect_done(0.001, 0)  # capped
    assert h.core.next_deadline() == h.now + st.COLLECT_EVERY_MAX
    h.core.collect_done(0.001, 1)  # garbage did hold one: back to the start
    assert h.core.next_deadline() == h.now + st.COLLECT_EVERY
    # However rare, collecting takes at most 1/COLLECT_COST_FACTOR of the time.
    h.core.collect_done(30.0, 1)
    assert h.core.next_deadline() == h.now + 30.0 * st.COLLECT_COST_FACTOR
    h.check()


def test_no_garbage_collection_while_a_connection_can_still_come() -> None:
    # Below max_size (an attempt serves the client), or a connection under cleaning.
    h = filled(1, min_size=1, max_size=2, max_lifetime=1e6)
    h.getconn()
    h.getconn()  # queued, and a second connection is being opened for it
    assert h.connecting
    h.tick(st.COLLECT_AFTER * 2)
    assert h.collects == 0
    h = filled(1, min_size=1, max_size=1, max_lifetime=1e6)
    h.getconn()
    h.putconn_dirty(h.held[0])  # rollback under way
    h.getconn()
    h.tick(st.COLLECT_AFTER * 2)
    assert h.collects == 0
    # A null pool with no max_size can always open one more.
    n = Harness.make(min_size=0, max_size=0, null=True)
    n.open()
    assert n.core._starved_since() == st.INF


def test_no_garbage_collection_on_the_tick_that_retries_a_null_pool_probe() -> None:
    # The probe of a null pool's wait() is not held to max_size: the tick that retries
    # it after a failure starts an attempt that may yet serve the client.
    h = Harness.make(min_size=0, max_size=1, null=True, num_workers=1)
    h.open()
    ready = h.new_ticket()
    assert not h.core.wait_ready(ready, h.now)
    h.ready_waiting.append(ready)
    h.run()
    h.connect_fail(h.connecting[0], fatal=False)  # the probe fails: retried later
    h.getconn()
    h.getconn()  # waits: the first client's own attempt takes the only place
    h.connect_ok(h.connecting[-1])
    assert h.core.n_waiting == 1 and h.core.n_busy == 1 == h.core.max_size
    h.tick(st.COLLECT_AFTER)
    assert h.core.backoff.retry_at <= h.now and h.connecting  # the probe again
    assert h.collects == 0
    h.connect_ok(h.connecting[-1])
    h.tick(st.COLLECT_AFTER)
    assert h.collects == 1  # only now is every way to a connection closed


def test_reprs_name_things() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    slot = h.connecting[0]
    texts = [
        repr(st.Failure(st.F_CLOSED)),
        repr(Connect(slot)),
        repr(Close(slot)),
        repr(Log(20, "x %s", 1)),
        repr(ReconnectFailed()),
    ]
    assert "closed" in texts[0] and all(texts)
    from psycopg_pool._core.commands import Collect, LeakSuspected, Rearm, Wake

    assert "Wake(" in repr(Wake(h.new_ticket()))
    assert repr(Rearm()) == "Rearm()" and "LeakSuspected(" in repr(LeakSuspected(slot))
    assert repr(Collect()) == "Collect()"


def test_shrink_tracks_the_fewest_idle_connections_between_periods() -> None:
    h = filled(3, min_size=3, max_size=3, max_idle=10.0, max_lifetime=1e6)
    h.core.resize(1, 3, h.now)
    h.tick(10.0)  # first period: starts measuring with 3 idle
    h.getconn()
    h.getconn()
    assert h.core.min_idle_seen == 1
    h.putconn(h.held[0])
    h.putconn(h.held[0])
    h.tick(10.0)
    assert len(h.core.live) == 2  # one was unused during the whole period
    h.check()


def test_waiters_while_failing_keep_an_earlier_retry() -> None:
    h = Harness.make(min_size=1, max_size=2)
    h.open()
    h.connect_fail(h.connecting[0])
    h.core.backoff.retry_at = 0.1  # already sooner than a demand probe
    h.getconn()
    assert h.core.backoff.retry_at == 0.1
    h.core.backoff.retry_at = 5.0
    h.core.sleep_until = 0.0  # the housekeeper already wakes earlier
    rearms = h.rearms
    h.getconn()
    assert h.core.backoff.retry_at == st.DEMAND_PROBE_INTERVAL and h.rearms == rearms


def test_a_wait_that_ends_in_failure_is_counted_once() -> None:
    h, t, failed = two_queued()
    h.withdraw(t)  # (the harness's clients give up at once: a wait of 0)
    assert (h.core.requests_errors, h.core.requests_wait_ms) == (1, 0)
    h.core.withdraw(t, h.now, 5)  # twice: nothing more
    h.now += 0.007
    h.close()  # fails the other one: its wait ends here
    assert failed.tstate == st.T_FAILED
    assert (h.core.requests_errors, h.core.requests_wait_ms) == (2, 7)
    h.core.withdraw(failed, h.now, 7)  # timed out as it failed: counted already
    assert t.tstate == failed.tstate == st.T_WITHDRAWN
    assert (h.core.requests_errors, h.core.requests_wait_ms) == (2, 7)


def test_a_connection_out_at_the_housekeeper_deadline_counts_for_it() -> None:
    h = filled(1, min_size=1, max_size=2, max_lifetime=100.0, max_idle=1000.0)
    h.getconn()
    expire_at = h.held[0].expire_at
    # Computed while the only connection is out: its expiry, not the shrink time.
    assert h.core.next_deadline() == expire_at < 1000.0
    rearms = h.rearms
    h.putconn(h.held[0])
    assert h.rearms == rearms  # the housekeeper knows already: no wake-up
    h.check()


def test_returns_under_load_do_not_wake_the_housekeeper() -> None:
    # Connections near the end of their lifetime, in a busy pool: the housekeeper
    # plans its wake-up while they are out, and each return must not wake it again.
    h = filled(4, min_size=4, max_size=4, max_lifetime=100.0, max_idle=1000.0)
    h.tick(90.0)  # all four expire within the next 10 s
    for _ in range(4):
        h.getconn()
    rearms = h.rearms
    for _ in range(50):
        h.core.next_deadline()  # the housekeeper, while every connection is out
        slot = h.held[0]
        h.putconn(slot)
        h.getconn()
    assert h.rearms == rearms
    h.check()


def test_a_connection_expired_while_out_does_not_make_the_housekeeper_spin() -> None:
    h = filled(1, min_size=1, max_size=2, max_lifetime=10.0, max_idle=1000.0)
    h.getconn()
    h.tick(11.0)  # expired while lent: its return closes it, nothing to wake up for
    assert h.core.next_deadline() > h.now
    h.putconn(h.held[0])
    assert len(h.closed) == 1
    h.check()


def test_discard_without_a_counter_and_samples_full() -> None:
    h = filled(1, min_size=1, max_size=1)
    h.core.samples = [("wait", 0.0)] * st.MAX_SAMPLES
    h.getconn()
    slot = h.held.pop()
    h.core.discard(slot, h.now, None)
    h.run()
    assert h.core.returns_bad == 0 and h.core.connections_lost == 0
    h.core.sample("timeout", 1.0)
    assert len(h.core.samples) == st.MAX_SAMPLES  # bounded


def test_a_configure_failure_is_not_a_connect_error() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    h.connecting.pop()
    slot = h.core.live.copy().pop()
    h.core.connect_failed(slot, h.now, False, None)
    assert h.core.connections_errors == 0 and h.core.fail_count == 1


def test_fail_fast_refuses_new_clients_right_after_a_fatal_failure() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    h.connect_fail(h.connecting[0], fatal=True)
    res, t = h.getconn()
    assert res == st.FAILING and t and t.error and t.error.kind == st.F_CONNECT
    h.now += st.DEMAND_PROBE_INTERVAL  # later: queue, and let a fresh attempt decide
    res, t = h.getconn()
    assert res == st.QUEUED
    h.tick(0.0)
    h.connect_fail(h.connecting[0], fatal=True)
    assert t and t.tstate == st.T_FAILED


def test_dirty_return_of_a_connection_not_lent_by_connection() -> None:
    h = filled(1, min_size=1, max_size=1)
    h.getconn()
    slot = h.held[0]
    h.putconn_dirty(slot)
    assert h.core.usage_ms == 0 and "usage_ms" not in h.core.touched
    h.io_done(slot, True)
    h.check()


def test_an_attempt_failing_after_close_changes_nothing() -> None:
    h = Harness.make(min_size=1, max_size=1)
    h.open()
    slot = h.connecting[0]
    h.close()
    h.connect_fail(slot)
    assert h.core.fail_count == 0 and not h.core.backoff.failing
    assert h.core.live == set()


def test_renewed_core_keeps_settings_not_state() -> None:
    h = filled(2, min_size=2, max_size=3, max_waiting=5, max_lifetime=50.0, max_idle=9.0)
    h.core.leak_timeout = 3.0
    h.core.samples = [("wait", 1.0)]
    fresh = h.core.renewed()
    assert (fresh.min_size, fresh.max_size, fresh.max_waiting) == (2, 3, 5)
    assert (fresh.max_lifetime, fresh.max_idle, fresh.leak_timeout) == (50.0, 9.0, 3.0)
    assert fresh.live == set() and fresh.status == st.NEW and fresh.samples == []
    h.core.samples = None
    assert h.core.renewed().samples is None


def _attempts(h: Harness) -> list[Slot]:
    return [s for s in h.connecting if not s.abandoned]


@pytest.mark.parametrize("what", ["hung attempt", "leak"])
def test_a_deadline_reached_is_acted_on_despite_rounding(what: str) -> None:
    # With these times `now - 2.0 < start` but `start + 2.0 == now`: the deadline
    # next_deadline() gives must be the one tick() acts on, or the housekeeper spins.
    h = Harness.make(min_size=0, max_size=1, num_workers=2)
    h.open()
    h.tick(30.05)
    if what == "leak":
        h.core.leak_timeout = st.STUCK_AFTER
        h.getconn()
        h.connect_ok(h.connecting[0])
        h.pick_up(h.granted[0])
    else:
        h.getconn()
    for dt in (0.5, 0.5, 1.0):
        h.tick(dt)
    assert h.now - st.STUCK_AFTER < 30.05 <= h.now - 1.9  # the rounding in question
    assert h.core.next_deadline() > h.now
    if what == "leak":
        assert len(h.leaks) == 1
    else:
        assert h.core.n_abandoned == 1
    h.check()


def test_attempts_hanging_on_a_silent_network_are_abandoned_for_new_ones() -> None:
    # At max_size, with every attempt hanging: the waiting client is not held up
    # until they time out.
    h = Harness.make(min_size=0, max_size=2, num_workers=2)
    h.open()
    h.getconn()
    h.getconn()
    old = list(h.connecting)
    assert len(old) == 2
    h.tick(1.0)
    h.getconn()  # a third client: no room at max_size
    assert h.core.next_deadline() == st.STUCK_AFTER
    h.tick(0.5)
    assert _attempts(h) == old  # not hung long enough yet
    h.tick(0.5)
    assert all(s.abandoned for s in old) and h.core.n_abandoned == 2
    new = _attempts(h)
    assert len(new) == 2 and not set(new) & set(old)
    assert len(h.core.live) == 2  # the abandoned ones no longer count
    assert any("hung for" in log.msg for log in h.logs)
    h.check()
    # The new attempts get through; the abandoned ones finish later: one fails, and
    # one succeeds but finds no room, so it is closed.
    for s in new:
        h.connect_ok(s)
    assert len(h.granted) == 2
    h.connect_fail(old[0])
    h.connect_ok(old[1])
    assert old[1].state == st.CLOSED and old[1] not in h.core.live
    assert h.core.n_abandoned == 0
    h.check()


def test_an_abandoned_attempt_that_succeeds_is_kept_if_there_is_room() -> None:
    h = Harness.make(min_size=0, max_size=3, num_workers=1)
    h.open()
    h.getconn()
    (old,) = h.connecting
    h.tick(st.STUCK_AFTER)
    assert old.abandoned
    assert h.core._stuck_at() == st.INF  # num_workers abandoned already: no more
    # Only num_workers attempts may be abandoned at once: the new one is not.
    h.tick(st.STUCK_AFTER)
    assert h.core.n_abandoned == 1 and len(_attempts(h)) == 1
    h.connect_ok(old)
    assert old in h.core.live and len(h.granted) == 1
    h.check()


def test_no_attempt_is_abandoned_without_waiting_clients() -> None:
    h = Harness.make(min_size=2, max_size=4, num_workers=2)
    h.open()
    assert h.core.next_deadline() == h.core.shrink_at  # no deadline for the attempts
    h.tick(10.0)
    assert h.core.n_abandoned == 0 and len(h.connecting) == 2


def test_abandoned_attempts_after_close_are_closed() -> None:
    h = Harness.make(min_size=0, max_size=2, num_workers=2)
    h.open()
    h.getconn()
    h.tick(st.STUCK_AFTER)
    (old,) = [s for s in h.connecting if s.abandoned]
    h.close()
    h.open()
    h.connect_ok(old)
    assert old.state == st.CLOSED and old not in h.core.live
    assert h.core.n_abandoned == 0
    h.check()


class _Interrupt(BaseException):
    pass


class _InterruptedDeque(deque[Slot]):
    """A deque whose popleft() is interrupted as it returns, as by a signal handler."""

    def popleft(self) -> Slot:
        super().popleft()
        raise _Interrupt


def test_take_puts_back_a_slot_whose_popleft_was_interrupted() -> None:
    h = filled(2, min_size=2, max_size=2)
    before = list(h.core.idle)
    h.core.idle = _InterruptedDeque(before)
    with pytest.raises(_Interrupt):
        h.core.take(h.now)
    assert list(h.core.idle) == before  # not lost, and still first in line
    assert h.core.n_busy == 0
    h.core.idle = deque(h.core.idle)
    h.check()


def _rolling_back() -> tuple[Harness, Slot]:
    """A pool of one connection, returned in a transaction: being rolled back."""
    h = filled(1, min_size=1, max_size=1)
    h.getconn()
    slot = h.held[0]
    h.putconn_dirty(slot)
    return h, slot


def test_a_connection_cleaned_after_its_return_serves_the_waiter() -> None:
    h, slot = _rolling_back()
    _, t = h.getconn()  # the only connection is being rolled back
    assert t is not None and t.tstate == st.T_WAITING
    h.io_done(slot, True)
    assert h.granted == [t]
    assert (h.core.n_checking, h.core.n_busy) == (0, 1)
    h.check()


def test_a_connection_cleaned_past_its_lifetime_is_replaced() -> None:
    h, slot = _rolling_back()
    h.now = slot.expire_at + 1.0
    h.io_done(slot, True)
    assert slot.state == st.CLOSED
    assert (h.core.n_checking, h.core.n_busy) == (0, 0)
    h.check()
