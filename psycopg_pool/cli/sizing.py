"""Sizing advice from what a benchmark measured.

Two tools:

- Little's law: in a steady state the average number of connections in use is the
  throughput times the mean time each is held (L = X * U). Fewer connections than
  that cannot carry the load.
- A replay: requests arriving at random (a Poisson process) at the measured
  throughput, each holding a connection for a time drawn from the measured ones,
  are simulated against pools of growing size, to find the smallest `max_size`
  whose 95th percentile of waits stays under a target. The benchmark's own workers
  ask again as soon as they are served, which says how much a configuration can
  carry; random arrivals are closer to what an application sees. The replay assumes
  the times in use stay as measured: if the server is the bottleneck, more
  connections make each query slower and the estimate is low.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from .display import fmt_ms, fmt_rate
from .measure import Histogram

REPLAY_OPS = 20_000
WAIT_QUANTILE = 0.95


def replay(size: int, arrivals: list[float], services: list[float]) -> float:
    """The WAIT_QUANTILE wait of requests arriving at `arrivals` times (sorted) and
    holding a connection for `services` seconds, with `size` connections, first come
    first served.
    """
    # The times at which each connection is free again.
    free_at = [0.0] * size
    waits = []
    for t, s in zip(arrivals, services, strict=True):
        first = free_at[0]
        start = first if first > t else t
        waits.append(start - t)
        heapq.heapreplace(free_at, start + s)
    warmup = len(waits) // 20
    kept = sorted(waits[warmup:])
    return kept[min(len(kept) - 1, max(0, math.ceil(WAIT_QUANTILE * len(kept)) - 1))]


def smallest_size(
    throughput: float, use: Histogram, target: float, seed: int = 7
) -> tuple[int, float]:
    """The smallest pool size whose replayed p95 wait is at most `target` seconds.

    Returns it with its p95 wait. Sizes at or below the average load (Little's law)
    are skipped: their queue grows without end.
    """
    rng = random.Random(seed)
    sampler = use.sampler(rng)
    services = [sampler.draw() for _ in range(REPLAY_OPS)]
    t = 0.0
    arrivals = []
    for _ in range(REPLAY_OPS):
        t += rng.expovariate(throughput)
        arrivals.append(t)
    mean_use = sum(services) / len(services)
    size = max(1, math.floor(throughput * mean_use) + 1)
    while True:
        p95 = replay(size, arrivals, services)
        if p95 <= target or size >= 100_000:
            return size, p95
        size += 1


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
    waiting_clients: float | None = None  # Little's law on the queue
    sampled_busy: float | None = None  # the pool's own gauges, averaged
    recommended_max_size: int | None = None
    predicted_p95_wait_ms: float | None = None  # at the recommended size
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
            f"Little's law: {fmt_rate(throughput)} queries/s x {fmt_ms(mean_use)} ms in use ="
            f" {busy:.1f} connections busy on average{check}",
        )
    )
    queued = throughput * mean_wait
    adv.waiting_clients = round(queued, 2)
    text = (
        f"{fmt_rate(throughput)} queries/s x {fmt_ms(mean_wait)} ms waiting ="
        f" {queued:.1f} clients waiting for a connection on average"
    )
    if queued >= 1.0:
        text += (
            ": the pool was the bottleneck, and the throughput above is what"
            f" {max_size} connections carry, not what the workers asked for"
        )
    adv.lines.append(("waiting clients", text))

    best, p95 = smallest_size(throughput, use, target)
    adv.recommended_max_size = best
    adv.predicted_p95_wait_ms = round(p95 * 1000, 3)
    measured = wait.quantile(WAIT_QUANTILE)
    adv.measured_p95_wait_ms = None if measured is None else round(measured * 1000, 3)
    if best < max_size:
        verdict = f"you ran {max_size}: {max_size - best} more than this load needs"
    elif best > max_size:
        verdict = f"you ran {max_size}: raise it to {best}"
    else:
        verdict = f"you ran {max_size}: right"
    adv.lines.append(
        (
            "max_size",
            f"{best} serves {fmt_rate(throughput)} queries/s arriving at random with 95% of waits"
            f" under {target * 1000:g} ms (replay of the measured times in use: p95 wait"
            f" {p95 * 1000:.3g} ms); {verdict}",
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
