"""AsyncNullConnectionPool: a pool that keeps no idle connection.

It is the same pool with the core's null preset: no idle connections, no
minimum, connections opened by the client that needs one (within `max_size`,
0 meaning no limit), and each returned connection either handed straight to a
waiting client or closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from psycopg import AsyncConnection
from typing_extensions import Self

from .pool_async import ACT, AsyncConnectionPool


class AsyncNullConnectionPool(AsyncConnectionPool[ACT]):
    """An `AsyncConnectionPool` that closes connections instead of keeping them."""

    _null = True

    def __init__(
        self,
        conninfo: str | Callable[[], Any] = "",
        *,
        connection_class: type[ACT] = cast(type[ACT], AsyncConnection),
        kwargs: dict[str, Any] | Callable[[], Any] | None = None,
        min_size: int = 0,
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
        super().__init__(
            conninfo,
            connection_class=connection_class,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max_size,
            open=open,
            configure=configure,
            check=check,
            reset=reset,
            name=name,
            close_returns=close_returns,
            timeout=timeout,
            max_waiting=max_waiting,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            num_workers=num_workers,
            leak_timeout=leak_timeout,
            alive_check_after=alive_check_after,
        )
