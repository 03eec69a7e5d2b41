"""ConnectionPool: module surface, constructor defaults and validation, naming, repr.

Spec: API.md §1, §2.1, §2.5, and the "how real clients call the pool" appendix.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
import textwrap
from typing import Any

import psycopg
import pytest
from psycopg.rows import Row, TupleRow

import psycopg_pool
from psycopg_pool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PoolClosed,
    PoolTimeout,
    TooManyRequests,
)

from .helpers import backend_pid, refused_conninfo, wait_until

# ---------------------------------------------------------------------------
# Module surface (§1, §2.5)


def test_all_exports() -> None:
    public = (AsyncConnectionPool, AsyncNullConnectionPool, ConnectionPool, NullConnectionPool)
    public += (PoolClosed, PoolTimeout, TooManyRequests)
    assert sorted(psycopg_pool.__all__) == sorted(c.__name__ for c in public)
    for cls in public:
        assert getattr(psycopg_pool, cls.__name__) is cls


def test_version_is_the_distribution_version() -> None:
    from importlib.metadata import version

    assert psycopg_pool.__version__ == version("psycopg-pool")
    assert re.match(r"\d+\.\d+", psycopg_pool.__version__)


@pytest.mark.parametrize("exc", [PoolTimeout, PoolClosed, TooManyRequests])
def test_exceptions(exc: type[Exception]) -> None:
    assert exc.__module__ == "psycopg_pool"
    assert exc.__bases__ == (psycopg.OperationalError,)


def test_submodules() -> None:
    from psycopg_pool import errors, null_pool, pool

    assert pool.ConnectionPool is ConnectionPool
    assert null_pool.NullConnectionPool is NullConnectionPool
    assert errors.PoolTimeout is PoolTimeout


def test_base_module_names_every_pool_class_a_base_pool() -> None:
    # Code in the wild imports upstream's `psycopg_pool.base` for isinstance() checks
    # and annotations that take any pool.
    from psycopg_pool.base import AttemptWithBackoff, BasePool

    pools = (ConnectionPool, AsyncConnectionPool, NullConnectionPool, AsyncNullConnectionPool)
    assert all(issubclass(cls, BasePool) for cls in pools)
    assert isinstance(NullConnectionPool(refused_conninfo(), open=False), BasePool)
    assert AttemptWithBackoff.INITIAL_DELAY == 1.0
    assert AttemptWithBackoff.DELAY_JITTER == 0.1
    assert AttemptWithBackoff.DELAY_BACKOFF == 2.0


def test_backoff_constants_set_on_attempt_with_backoff_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As tests do to make a pool retry sooner (`psycopg_pool.base`, upstream's home of
    # the reconnection schedule). With upstream's 1 s, doubling, five failures take 15 s.
    from psycopg_pool.base import AttemptWithBackoff

    monkeypatch.setattr(AttemptWithBackoff, "INITIAL_DELAY", 0.01)
    monkeypatch.setattr(AttemptWithBackoff, "DELAY_BACKOFF", 1.0)
    with ConnectionPool(refused_conninfo(), min_size=1, open=True) as pool:
        wait_until(lambda: pool.get_stats().get("connections_errors", 0) >= 5, "5 attempts")


# ---------------------------------------------------------------------------
# Constructor signature and defaults (§2.1)


def test_signature_is_keyword_only_after_conninfo() -> None:
    params = inspect.signature(ConnectionPool).parameters
    first, *rest = params.values()
    assert first.name == "conninfo"
    assert first.default == ""
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    defaults = {p.name: p.default for p in rest}
    assert defaults == {
        "connection_class": psycopg.Connection,
        "kwargs": None,
        "min_size": 4,
        "max_size": None,
        "open": None,
        "configure": None,
        "check": None,
        "reset": None,
        "name": None,
        "close_returns": False,
        "timeout": 30.0,
        "max_waiting": 0,
        "max_lifetime": 3600.0,
        "max_idle": 600.0,
        "reconnect_timeout": 300.0,
        "reconnect_failed": None,
        "num_workers": 3,
        # Ours only, off by default (see README, issue 4: leak detection).
        "leak_timeout": None,
        "alive_check_after": 0.05,
    }


def test_defaults_seen_on_the_pool() -> None:
    pool: ConnectionPool = ConnectionPool(open=False)
    assert pool.conninfo == ""
    assert pool.kwargs is None
    assert pool.connection_class is psycopg.Connection
    assert pool.min_size == 4
    assert pool.max_size == 4
    assert pool.close_returns is False
    assert pool.timeout == 30.0
    assert pool.max_waiting == 0
    assert pool.max_lifetime == 3600.0
    assert pool.max_idle == 600.0
    assert pool.reconnect_timeout == 300.0
    assert pool.num_workers == 3
    assert pool.closed
    assert re.fullmatch(r"pool-\d+", pool.name)


def test_max_size_defaults_to_min_size() -> None:
    pool: ConnectionPool = ConnectionPool(min_size=2, open=False)
    assert (pool.min_size, pool.max_size) == (2, 2)
    pool = ConnectionPool(min_size=0, max_size=3, open=False)
    assert (pool.min_size, pool.max_size) == (0, 3)


def test_conninfo_positional(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        assert pool.conninfo == dsn
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------------------
# Validation (§2.1, and our extra type checks)


def test_failed_constructor_is_collected_quietly() -> None:
    script = textwrap.dedent(
        """
        import gc
        from psycopg_pool import ConnectionPool

        for kwargs in ({"min_size": -1}, {"num_workers": 0}, {"timeout": "x"}):
            try:
                ConnectionPool(open=False, **kwargs)
            except (ValueError, TypeError):
                pass
        gc.collect()
        print("done")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "done"
    assert res.stderr == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_size": -1}, "min_size cannot be negative"),
        ({"min_size": 4, "max_size": 3}, "max_size must be greater or equal than min_size"),
        ({"min_size": 0}, "if min_size is 0 max_size must be greater than 0"),
        ({"min_size": 0, "max_size": 0}, "if min_size is 0 max_size must be greater than 0"),
        ({"num_workers": 0}, "num_workers must be at least 1"),
        ({"num_workers": -2}, "num_workers must be at least 1"),
    ],
)
def test_size_and_workers_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        ConnectionPool(open=False, **kwargs)
    assert str(excinfo.value) == message


def test_sizes_are_validated_before_num_workers() -> None:
    with pytest.raises(ValueError, match="min_size cannot be negative"):
        ConnectionPool(min_size=-1, num_workers=0, open=False)


def test_valid_edge_sizes() -> None:
    pool: ConnectionPool = ConnectionPool(min_size=0, max_size=1, num_workers=1, open=False)
    assert (pool.min_size, pool.max_size, pool.num_workers) == (0, 1, 1)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("min_size", "4"),
        ("min_size", 2.0),
        ("max_size", "8"),
        ("num_workers", 1.5),
        ("max_waiting", 1.5),
        ("timeout", "30"),
        ("max_lifetime", "3600"),
        ("max_idle", None),
        ("reconnect_timeout", "x"),
        ("conninfo", 42),
        ("kwargs", ["dbname", "x"]),
        ("connection_class", int),
        ("connection_class", psycopg.AsyncConnection),
        ("configure", 42),
        ("check", "check"),
        ("reset", 1),
        ("reconnect_failed", object()),
        ("name", 42),
    ],
)
def test_wrong_types_raise_type_error_naming_the_parameter(param: str, value: Any) -> None:
    with pytest.raises(TypeError, match=param):
        ConnectionPool(open=False, **{param: value})


@pytest.mark.parametrize(
    "param", ["timeout", "max_lifetime", "max_idle", "reconnect_timeout", "max_waiting"]
)
def test_negative_values_raise_value_error(param: str) -> None:
    with pytest.raises(ValueError, match=param):
        ConnectionPool(open=False, **{param: -1})


@pytest.mark.parametrize("param", ["timeout", "reconnect_timeout"])
def test_zero_timeouts_are_accepted(param: str) -> None:
    pool: ConnectionPool = ConnectionPool(open=False, **{param: 0})
    assert getattr(pool, param) == 0


def test_int_seconds_are_accepted() -> None:
    pool: ConnectionPool = ConnectionPool(
        open=False, timeout=5, max_lifetime=60, max_idle=30, reconnect_timeout=10
    )
    assert (pool.timeout, pool.max_lifetime, pool.max_idle, pool.reconnect_timeout) == (
        5,
        60,
        30,
        10,
    )


def test_validation_error_starts_nothing() -> None:
    with pytest.raises(ValueError):
        ConnectionPool(min_size=3, max_size=1, name="invalid-pool")
    # Nothing was opened, so nothing can warn or leak (warnings are errors here).


# ---------------------------------------------------------------------------
# Attributes (§2.1)


def test_read_only_properties() -> None:
    pool: ConnectionPool = ConnectionPool(open=False)
    for attr in ("min_size", "max_size", "closed"):
        with pytest.raises(AttributeError):
            setattr(pool, attr, 1)


@pytest.mark.parametrize("cls", [ConnectionPool, AsyncConnectionPool])
def test_settings_read_back_what_is_set(cls: type[Any]) -> None:
    # Kept in the pool's core, which reads them where it decides (the tests of each
    # setting's effect set them on the pool).
    pool = cls(open=False, max_waiting=5, max_lifetime=60.0, max_idle=30.0)
    assert (pool.max_waiting, pool.max_lifetime, pool.max_idle) == (5, 60.0, 30.0)
    new = {
        "max_waiting": 7,
        "max_lifetime": 90.0,
        "max_idle": 45.0,
        "reconnect_timeout": 12.0,
        "num_workers": 2,
    }
    for attr, value in new.items():
        setattr(pool, attr, value)
    assert {attr: getattr(pool, attr) for attr in new} == new


def test_writable_attributes_are_used(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(refused_conninfo(), min_size=1, open=False)
    pool.conninfo = dsn  # read at each connection attempt
    pool.kwargs = {"application_name": "writable"}
    pool.name = "renamed"
    with pool:
        pool.wait(5)
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SHOW application_name").fetchone() == ("writable",)
        assert pool.name == "renamed"
        assert "'renamed'" in repr(pool)


@pytest.mark.parametrize(
    ("form", "says"),
    [
        # Unquoted with a space: libpq takes "Piece7" for a key, and says so.
        ("host={host} port={port} password=Sec9ret Piece7", 'missing "=" after'),
        # An unescaped "@" in a URL: libpq takes "Piece7@host" for the host.
        ("postgresql://postgres:Sec9ret@Piece7@{host}:{port}/postgres", "failed to resolve host"),
    ],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_password_libpq_misreads_shows_in_no_message(
    dsn: str, form: str, says: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    conninfo = form.format(host=params.get("host", "localhost"), port=params.get("port", 5432))
    caplog.set_level("DEBUG", logger="psycopg.pool")

    async def aget() -> None:
        async with AsyncConnectionPool(conninfo, min_size=1, timeout=1.0, open=False) as apool:
            await apool.getconn()

    with pytest.raises(PoolTimeout) as info:
        if kind == "sync":
            with ConnectionPool(conninfo, min_size=1, timeout=1.0, open=False) as pool:
                pool.getconn()
        else:
            asyncio.run(aget())
    texts = [str(info.value), repr(info.value), str(info.value.__cause__), caplog.text]
    assert "error connecting" in caplog.text  # the failures were logged...
    assert not [t for t in texts if "Piece7" in t or "Sec9ret" in t]  # ...without it
    assert says in str(info.value)  # and the message still says why


def test_conninfo_and_kwargs_callables_run_per_attempt(dsn: str) -> None:
    calls: list[str] = []

    def conninfo() -> str:
        calls.append("conninfo")
        return dsn

    def kwargs() -> dict[str, Any]:
        calls.append("kwargs")
        return {"application_name": "from-callable"}

    with ConnectionPool(conninfo, kwargs=kwargs, min_size=3, open=False) as pool:
        pool.wait(5)
        assert calls.count("conninfo") == 3
        assert calls.count("kwargs") == 3
        with pool.connection() as conn:
            row = conn.execute("SHOW application_name").fetchone()
        assert row == ("from-callable",)


def test_kwargs_dict_is_not_mutated(dsn: str) -> None:
    kwargs = {"application_name": "kw-not-mutated"}
    with ConnectionPool(dsn, kwargs=kwargs, min_size=2, open=False) as pool:
        pool.wait(5)
        with pool.connection() as conn:
            assert conn.execute("SHOW application_name").fetchone() == ("kw-not-mutated",)
    assert kwargs == {"application_name": "kw-not-mutated"}


def test_falsy_conninfo_and_kwargs(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    for key, env in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER")):
        if key in params:
            monkeypatch.setenv(env, str(params[key]))
    monkeypatch.setenv("PGDATABASE", str(params.get("dbname", "postgres")))

    def no_conninfo() -> str:
        return ""

    with ConnectionPool(no_conninfo, kwargs=dict, min_size=1, open=False) as pool:
        pool.wait(5)
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


class MyConnection(psycopg.Connection[Row]):
    pass


def test_connection_class_subclass_and_generic_alias(dsn: str) -> None:
    with ConnectionPool(dsn, connection_class=MyConnection, min_size=1, open=False) as pool:
        with pool.connection(timeout=5) as conn:
            assert type(conn) is MyConnection

    alias: Any = MyConnection[TupleRow]
    with ConnectionPool(dsn, connection_class=alias, min_size=1, open=False) as pool:
        with pool.connection(timeout=5) as conn:
            assert isinstance(conn, MyConnection)


# ---------------------------------------------------------------------------
# Naming and repr (§1, §2.1)


def test_unnamed_pools_share_one_counter() -> None:
    first: ConnectionPool = ConnectionPool(open=False)
    n = int(first.name.removeprefix("pool-"))
    null: NullConnectionPool = NullConnectionPool(open=False)
    named: ConnectionPool = ConnectionPool(name="explicit", open=False)
    empty: ConnectionPool = ConnectionPool(name="", open=False)
    apool: AsyncConnectionPool = AsyncConnectionPool(open=False)
    anull: AsyncNullConnectionPool = AsyncNullConnectionPool(open=False)
    last: ConnectionPool = ConnectionPool(open=False)
    assert null.name == f"pool-{n + 1}"
    assert named.name == "explicit"
    assert empty.name == f"pool-{n + 2}"
    assert apool.name == f"pool-{n + 3}"
    assert anull.name == f"pool-{n + 4}"
    assert last.name == f"pool-{n + 5}"


def test_repr() -> None:
    pool: ConnectionPool = ConnectionPool(name="the-name", open=False)
    assert repr(pool) == f"<psycopg_pool.pool.ConnectionPool 'the-name' at 0x{id(pool):x}>"
    null: NullConnectionPool = NullConnectionPool(open=False)
    assert re.fullmatch(
        r"<psycopg_pool\.null_pool\.NullConnectionPool 'pool-\d+' at 0x[0-9a-f]+>", repr(null)
    )


# ---------------------------------------------------------------------------
# How Django and SQLAlchemy use the pool (last appendix)


def test_pool_is_truthy_in_every_state(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    assert pool
    pool.open()
    try:
        assert pool
        conn = pool.getconn(timeout=5)
        assert pool
        pool.putconn(conn)
    finally:
        pool.close()
    assert pool


def test_django_style_usage(dsn: str) -> None:
    """open() before every getconn(), putconn() through conn._pool, close()."""
    configured: list[int] = []

    def configure(conn: psycopg.Connection[Any]) -> None:
        configured.append(backend_pid(conn))

    pool: ConnectionPool = ConnectionPool(
        dsn,
        kwargs={},
        open=False,
        configure=configure,
        check=ConnectionPool.check_connection,
        min_size=2,
        max_size=4,
        timeout=5,
    )
    try:
        pool.open()
        pool.wait(5)
        before = pool.get_stats()["connections_num"]
        for _ in range(20):
            pool.open()  # cheap and idempotent
            conn = pool.getconn()
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.commit()
            assert conn._pool is pool
            conn._pool.putconn(conn)
        stats = pool.get_stats()
        assert stats["connections_num"] == before == 2
        assert stats["pool_size"] == 2
        assert len(configured) == 2
    finally:
        pool.close()
    assert pool.closed
    # Django's worker recycling: a pool closed by someone else comes back on open().
    pool.open()
    try:
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()


def test_sqlalchemy_nullpool_style_usage(dsn: str) -> None:
    """SQLAlchemy's creator=pool.getconn with close_returns=True gives back with close()."""
    with ConnectionPool(dsn, min_size=1, close_returns=True, open=False) as pool:
        creator = pool.getconn
        pids = set()
        for _ in range(5):
            conn = creator(5)
            pids.add(backend_pid(conn))
            conn.execute("SELECT 1")
            conn.rollback()
            conn.close()  # what SQLAlchemy's NullPool does
            assert not conn.closed
            wait_until(lambda: pool.get_stats()["pool_available"] == 1, "the connection back")
        assert len(pids) == 1
        assert pool.get_stats()["connections_num"] == 1


def test_psycopg_pool_33_style_script(dsn: str) -> None:
    """A script written for psycopg-pool 3.3 runs unchanged."""
    resets: list[int] = []

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET application_name = 'script33'")
        conn.commit()

    def reset(conn: psycopg.Connection[Any]) -> None:
        resets.append(1)
        conn.execute("RESET search_path")

    def check(conn: psycopg.Connection[Any]) -> None:
        ConnectionPool.check_connection(conn)

    pool = ConnectionPool(
        dsn,
        min_size=2,
        max_size=4,
        open=True,
        configure=configure,
        check=check,
        reset=reset,
        max_waiting=10,
        timeout=5,
        name="script33",
    )
    try:
        pool.wait()
        with pool.connection() as conn:
            conn.execute("SET search_path TO pg_catalog")
            cur = conn.execute("SHOW application_name")
            assert cur.fetchone() == ("script33",)
        pool.resize(3, 5)
        pool.check()
        with pool.connection() as conn:
            assert conn.execute("SHOW search_path").fetchone() != ("pg_catalog",)
        wait_until(lambda: len(resets) == 2, "the reset callback to run on both returns")
        stats = pool.get_stats()
        assert stats["pool_min"] == 3
        assert stats["pool_max"] == 5
        assert stats["requests_num"] == 2
    finally:
        pool.close()
