"""Validation of the pool parameters, and the process-wide pool name counter.

Upstream validates only the sizes and `num_workers`; we also reject values of the
wrong type or sign, naming the parameter, because a `timeout="30"` or a negative
`max_idle` otherwise surfaces much later as a confusing failure in a background
thread. Values upstream accepts and that make sense keep working.
"""

from __future__ import annotations

from itertools import count
from typing import Any, Generic, TypeVar, overload

import psycopg

_pool_ids = count(1)
T = TypeVar("T")

# From psycopg 3.3, `Connection.close()` gives a pooled connection back to its pool
# when the pool has `close_returns` set.
PSYCOPG_CLOSE_RETURNS = tuple(int(x) for x in psycopg.__version__.split(".")[:2]) >= (3, 3)


def pool_name(name: str | None) -> str:
    """The given name, or the next `pool-N` (one counter for every pool class)."""
    if name:
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")
        return name
    return f"pool-{next(_pool_ids)}"


def check_int(param: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{param} must be an integer, got {type(value).__name__}: {value!r}")
    return value


def check_seconds(param: str, value: object, *, positive: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{param} must be a number of seconds, got {type(value).__name__}")
    if value != value or value < 0 or (positive and value == 0):
        what = "greater than 0" if positive else "0 or more"
        raise ValueError(f"{param} must be {what}, got {value!r}")
    return float(value)


def check_callable(param: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{param} must be a callable or None, got {type(value).__name__}")


def check_sizes(min_size: object, max_size: object, *, null: bool) -> tuple[int, int]:
    """Validate the sizes; `max_size=None` means `min_size` (null pools: unlimited, 0)."""
    min_size = check_int("min_size", min_size)
    if max_size is not None:
        max_size = check_int("max_size", max_size)
    if null and min_size != 0:
        raise ValueError("null pools must have min_size = 0")
    if min_size < 0:
        raise ValueError("min_size cannot be negative")
    if max_size is None:
        max_size = 0 if null else min_size
    if max_size < min_size:
        raise ValueError("max_size must be greater or equal than min_size")
    if not null and min_size == max_size == 0:
        raise ValueError("if min_size is 0 max_size must be greater than 0")
    return min_size, max_size


def check_num_workers(value: object) -> int:
    value = check_int("num_workers", value)
    if value < 1:
        raise ValueError("num_workers must be at least 1")
    return value


def check_conninfo(value: object) -> None:
    if not (isinstance(value, str) or callable(value)):
        raise TypeError(f"conninfo must be a string or a callable, got {type(value).__name__}")


def check_kwargs(value: object) -> None:
    if value is not None and not (isinstance(value, dict) or callable(value)):
        raise TypeError(f"kwargs must be a dict or a callable, got {type(value).__name__}")


def check_connection_class(value: object, base: type) -> None:
    origin: Any = getattr(value, "__origin__", value)  # MyConn[Row] is fine too
    if not (isinstance(origin, type) and issubclass(origin, base)):
        raise TypeError(
            f"connection_class must be a subclass of {base.__module__}.{base.__qualname__},"
            f" got {value!r}"
        )


class CoreSetting(Generic[T]):
    """A pool setting kept in the pool's core, under the same name: the core reads it
    where it decides, and code that sets it on the pool (as upstream's attributes
    allow) changes the pool's behaviour from then on."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, pool: None, owner: type) -> CoreSetting[T]: ...
    @overload
    def __get__(self, pool: object, owner: type) -> T: ...
    def __get__(self, pool: object, owner: type) -> CoreSetting[T] | T:
        if pool is None:
            return self
        value: T = getattr(pool._core, self._name)  # type: ignore[attr-defined]
        return value

    def __set__(self, pool: object, value: T) -> None:
        setattr(pool._core, self._name, value)  # type: ignore[attr-defined]
