"""The names upstream's `psycopg_pool.base` gives code that imports them.

`BasePool` is the common base class of the four pool classes, for `isinstance()`
checks and annotations that accept any pool. `AttemptWithBackoff` holds the
reconnection schedule's constants (`INITIAL_DELAY`, `DELAY_JITTER`,
`DELAY_BACKOFF`), which the pools read from it: code that sets them, as tests do to
retry sooner, changes the schedule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._core.backoff import AttemptWithBackoff

__all__ = ["AttemptWithBackoff", "BasePool"]


class BasePool:
    """What every pool class is: sync or async, with reuse or null."""

    if TYPE_CHECKING:
        # What the four classes share and an annotation as `BasePool` may use; each
        # class defines it.
        name: str
        timeout: float

        @property
        def closed(self) -> bool: ...
        @property
        def min_size(self) -> int: ...
        @property
        def max_size(self) -> int: ...
        def get_stats(self) -> dict[str, int]: ...
        def pop_stats(self) -> dict[str, int]: ...
