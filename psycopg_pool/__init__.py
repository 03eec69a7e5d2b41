"""psycopg_pool: connection pools for Psycopg 3."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    import psycopg as _psycopg  # noqa: F401
except ImportError as _ex:  # pragma: no cover - depends on the machine
    if "no pq wrapper available" not in str(_ex):
        raise
    raise ImportError(
        f"{_ex}\n\npsycopg cannot load libpq, the PostgreSQL client library. Either install"
        ' the binary package, which ships its own: pip install "psycopg-pool[binary]",'
        " or install libpq on the system (Debian/Ubuntu: apt-get install libpq5;"
        " RHEL/Fedora: dnf install libpq; macOS: brew install libpq)."
    ) from _ex

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
