"""Sizing advice from what a benchmark measured.

Two tools:

- Little's law: in a steady state the average number of connections in use is the
  throughput times the mean time each is held (L = X * U). That is the floor: fewer
  connections than that cannot carry the load.
- A replay: the benchmark's closed loop (N workers, each asking for a connection,
  holding it for a time drawn from the measured ones, then spending the measured
  time outside the pool before asking again) is simulated against pools of each
  size, to find the smallest `max_size` whose 95th percentile of waits stays under
  a target. It assumes the times in use stay as measured: if the server is the
  bottleneck, more connections make each query slower and the estimate is low.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from .measure import Histogram

REPLAY_OPS = 12_000
WAIT_QUANTILE = 0.95


def replay(workers: int, size: int, services: list[float], think: float) -> float:
    """The WAIT_QUANTILE wait of `workers` closed-loop clients sharing `size` connections.

    `services` are the times in use, drawn in advance (the same list for every size,
    so that sizes are compared on the same work); `think` is the time a client spends
    outside the pool between two requests.
    """
    if size >= workers:
        return 0.0
    # Events: (time, order, client arrival time or -1.0 for "a connection is freed").
    events: list[tuple[float, int, float]] = [(0.0, i, 0.0) for i in range(workers)]
    order = workers
    free = size
    queue: deque[float] = deque()
    waits: list[float] = []
    it = iter(services)
    warmup = 2 * workers
    target = len(services) - workers
    while len(waits) < target:
        t, _, arrived = heapq.heappop(events)
        if arrived >= 0.0:  # a client asks for a connection
            if free:
                free -= 1
                waits.append(0.0)
                heapq.heappush(events, (t + next(it), order, -1.0))
                order += 1
            else:
                queue.append(t)
        else:  # a client gives one back, and will ask again after `think`
            heapq.heappush(events, (t + think, order, t + think))
            order += 1
            if queue:
                waits.append(t - queue.popleft())
                heapq.heappush(events, (t + next(it), order, -1.0))
                order += 1
            else:
                free += 1
    kept = sorted(waits[warmup:] if len(waits) > 2 * warmup else waits)
    return kept[min(len(kept) - 1, max(0, math.ceil(WAIT_QUANTILE * len(kept)) - 1))]


def smallest_size(
    workers: int, use: Histogram, think: float, target: float, seed: int = 7
) -> tuple[int, dict[int, float]]:
    """The smallest pool size whose replayed p95 wait is at most `target` seconds.

    Returns it with the p95 wait of every size tried.
    """
    rng = random.Random(seed)
    sampler = use.sampler(rng)
    services = [sampler.draw() for _ in range(REPLAY_OPS + workers)]
    tried: dict[int, float] = {}

    def p95(size: int) -> float:
        if size not in tried:
            tried[size] = replay(workers, size, services, think)
        return tried[size]

    lo, hi = 1, max(1, workers)  # a pool of `workers` connections never makes anyone wait
    while lo < hi:
        mid = (lo + hi) // 2
        if p95(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    p95(lo)
    return lo, tried


@dataclass
class ServerInfo:
    """What the server says about its connection slots (None: could not be read)."""

    version: str | None = None
    max_connections: int | None = None
    reserved: int = 0  # superuser_reserved_connections + reserved_connections
    others: int | None = None  # client connections not ours, when the bench started
    error: str | None = None


@dataclass
class Advice:
    target_wait_ms: float
    busy_connections: float | None = None  # Little's law
    sampled_busy: float | None = None  # the pool's own gauges, averaged
    recommended_max_size: int | None = None
    predicted_p95_wait_ms: float | None = None  # at the recommended size
    model_p95_wait_ms: float | None = None  # the replay at the size that ran
    measured_p95_wait_ms: float | None = None
    recommended_min_size: int | None = None
    connect_ms: float | None = None
    processes: int = 1
    budget: dict[str, Any] = field(default_factory=dict)
    lines: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        res = asdict(self)
        res["lines"] = [{"topic": t, "text": x} for t, x in self.lines]
        return res


def advise(
    *,
    workers: int,
    max_size: int,
    min_size: int,
    ops: int,
    elapsed: float,
    wait: Histogram,
    use: Histogram,
    target: float,
    processes: int,
    server: ServerInfo,
    connect_ms: float | None,
    sampled_busy: float | None,
) -> Advice:
    """Turn the measurements into numbers and sentences (see the module docstring)."""
    adv = Advice(target_wait_ms=round(target * 1000, 3), processes=processes)
    adv.connect_ms = connect_ms
    adv.sampled_busy = None if sampled_busy is None else round(sampled_busy, 2)
    mean_use = use.mean()
    mean_wait = wait.mean()
    if not ops or mean_use is None or mean_wait is None or elapsed <= 0:
        adv.lines.append(("no advice", "no query completed: nothing to base advice on"))
        return adv
    throughput = ops / elapsed
    busy = throughput * mean_use
    adv.busy_connections = round(busy, 2)
    check = ""
    if sampled_busy is not None:
        check = f" (the pool's gauges, sampled during the run: {sampled_busy:.1f})"
    adv.lines.append(
        (
            "busy connections",
            f"Little's law: {throughput:,.0f} queries/s x {mean_use * 1000:.3g} ms in use ="
            f" {busy:.1f} connections busy on average{check}",
        )
    )

    # The time a worker spends outside the pool between two requests.
    think = max(0.0, workers * elapsed / ops - mean_wait - mean_use)
    best, tried = smallest_size(workers, use, think, target)
    model = tried.get(max_size)
    if model is None and max_size < workers:
        model = replay_at(workers, max_size, use, think)
    adv.recommended_max_size = best
    adv.predicted_p95_wait_ms = round(tried[best] * 1000, 3)
    adv.model_p95_wait_ms = None if model is None else round(model * 1000, 3)
    measured = wait.quantile(WAIT_QUANTILE)
    adv.measured_p95_wait_ms = None if measured is None else round(measured * 1000, 3)
    tgt = f"{target * 1000:g} ms"
    if best < max_size:
        verdict = f"you ran {max_size}: {max_size - best} more than needed for this load"
    elif best > max_size:
        verdict = f"you ran {max_size}: raise it to {best}"
    else:
        verdict = f"you ran {max_size}: right"
    adv.lines.append(
        (
            "max_size",
            f"{best} would have kept 95% of waits under {tgt} for {workers} workers"
            f" (predicted p95 wait {tried[best] * 1000:.3g} ms); {verdict}",
        )
    )
    if model is not None and measured is not None:
        adv.lines.append(
            (
                "model check",
                f"at max_size {max_size} the replay predicts a p95 wait of"
                f" {model * 1000:.3g} ms; measured: {measured * 1000:.3g} ms"
                " (the replay assumes the time in use stays as measured)",
            )
        )

    rec_min = max(1, min(best, math.ceil(busy)))
    adv.recommended_min_size = rec_min
    connect = f"; opening a connection took {connect_ms:.3g} ms" if connect_ms else ""
    adv.lines.append(
        (
            "min_size",
            f"{rec_min} (the busy connections, rounded up) keeps the usual load on open"
            f" connections{connect}; you ran {min_size}",
        )
    )
    adv.budget = budget(processes, best, server)
    adv.lines.append(("server budget", adv.budget["text"]))
    return adv


def replay_at(workers: int, size: int, use: Histogram, think: float, seed: int = 7) -> float:
    rng = random.Random(seed)
    sampler = use.sampler(rng)
    services = [sampler.draw() for _ in range(REPLAY_OPS + workers)]
    return replay(workers, size, services, think)


def budget(processes: int, per_process: int, server: ServerInfo) -> dict[str, Any]:
    """Does `processes` x `per_process` fit in the server's connection slots?"""
    need = processes * per_process
    res: dict[str, Any] = {
        "processes": processes,
        "max_size": per_process,
        "connections": need,
        "max_connections": server.max_connections,
        "reserved": server.reserved,
        "others": server.others,
    }
    head = f"{processes} process{'es' if processes != 1 else ''} x max_size {per_process} = {need}"
    if server.max_connections is None:
        res["fits"] = None
        res["text"] = f"{head} connections; the server's max_connections could not be read"
        if server.error:
            res["text"] += f" ({server.error})"
        return res
    others = server.others or 0
    room = server.max_connections - server.reserved - others
    res["available"] = room
    res["fits"] = need <= room
    where = (
        f"the server has max_connections {server.max_connections}, {server.reserved} reserved"
        f" for superusers, {others} in use by others: {room} available"
    )
    if need <= room:
        res["text"] = f"{head} connections; {where}: fits, {room - need} to spare"
    else:
        per = max(0, room // max(1, processes))
        res["text"] = (
            f"{head} connections; {where}: does NOT fit. Lower max_size to {per} per process,"
            " raise max_connections, or put PgBouncer in front (docs/integrations.md)"
        )
    return res
