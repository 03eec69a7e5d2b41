"""psycopg_pool: connection pools for Psycopg 3."""

from __future__ import annotations

from importlib import metadata as _metadata

from .errors import PoolClosed, PoolTimeout, TooManyRequests
from .null_pool import NullConnectionPool
from .null_pool_async import AsyncNullConnectionPool
from .pool import ConnectionPool
from .pool_async import AsyncConnectionPool

try:
    __version__: str = _metadata.version("psycopg-pool")
except _metadata.PackageNotFoundError:
    __version__ = "0.0.0.0"

__all__ = [
    "AsyncConnectionPool",
    "AsyncNullConnectionPool",
    "ConnectionPool",
    "NullConnectionPool",
    "PoolClosed",
    "PoolTimeout",
    "TooManyRequests",
]
