"""The stats a pool reports, under upstream's key names."""

from __future__ import annotations

from .state import PoolCore

# Counters appear once touched and are reset by pop_stats(); gauges are always there.
COUNTERS = (
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_errors",
    "usage_ms",
    "returns_bad",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
)
# pool_connecting is ours: pool_size counts the attempts under way (as upstream's
# does), so this tells them apart from real connections.
GAUGES = (
    "pool_min",
    "pool_max",
    "pool_size",
    "pool_available",
    "requests_waiting",
    "pool_connecting",
)


def snapshot(core: PoolCore, reset: bool = False) -> dict[str, int]:
    """The stats dict; with `reset`, zero the counters afterwards (pop_stats)."""
    res = {
        "pool_min": core.min_size,
        "pool_max": core.max_size,
        "pool_size": core.pool_size(),
        "pool_available": len(core.idle),
        "requests_waiting": core.n_waiting,
        "pool_connecting": core.n_connecting + core.n_inline,
    }
    touched = core.touched
    for key in COUNTERS:
        value: int = getattr(core, key)
        if value or key in touched:
            res[key] = value
        if reset:
            setattr(core, key, 0)
    if reset:
        touched.clear()
    return res
