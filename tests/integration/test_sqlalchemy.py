"""SQLAlchemy 2.x on top of the pool (issue 6, item 3).

SQLAlchemy gets its DBAPI connections from our pool through ``creator`` (sync) or
``async_creator`` (asyncio), with its own pooling turned off (``NullPool``): when it
is done with a connection it calls ``close()``, which ``close_returns=True`` turns
into a return to our pool. The tests run Core and ORM round trips and prove with
`get_stats()` that every connection SQLAlchemy used came from our pool and went
back to it (no connection opened or closed behind its back).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from psycopg_pool import AsyncConnectionPool, ConnectionPool

from .helpers import await_until, run_async, running_threads, terminate_backends, wait_until


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sa_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    qty: Mapped[int]


core_metadata = MetaData()
notes = Table(
    "sa_notes",
    core_metadata,
    Column("id", Integer, primary_key=True),
    Column("body", String(100), nullable=False),
)


def engine_for(pool: ConnectionPool) -> Engine:
    return create_engine("postgresql+psycopg://", creator=pool.getconn, poolclass=NullPool)


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(
        dsn, min_size=2, max_size=3, close_returns=True, timeout=10, open=False, name="sa"
    ) as pool:
        pool.wait(10)
        yield pool


@pytest.fixture
def engine(pool: ConnectionPool) -> Iterator[Engine]:
    engine = engine_for(pool)
    Base.metadata.create_all(engine)
    core_metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    core_metadata.drop_all(engine)
    engine.dispose()


def all_back(pool: Any) -> bool:
    """Every connection is idle in the pool. (A connection the pool started opening
    for a client that was served meanwhile counts in pool_size until it is ready.)"""
    stats = pool.get_stats()
    return bool(stats["pool_available"] == stats["pool_size"])


def assert_all_back(pool: Any, checkouts: int) -> None:
    """Every connection is back in the pool, which served `checkouts` requests
    without opening more than its size or losing any connection."""
    wait_until(lambda: all_back(pool), "every connection back in the pool")
    stats = pool.get_stats()
    assert stats["requests_num"] == checkouts
    assert stats["connections_num"] == stats["pool_size"] <= pool.max_size
    assert stats.get("returns_bad", 0) == 0
    assert stats.get("connections_lost", 0) == 0


def test_core_round_trip(pool: ConnectionPool, engine: Engine) -> None:
    before = pool.get_stats()["requests_num"]
    with engine.begin() as conn:
        # The DBAPI connection under SQLAlchemy's is one of ours, checked out.
        dbapi_conn: Any = conn.connection.dbapi_connection
        assert dbapi_conn._pool is pool
        assert pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"] - 1
        conn.execute(insert(notes), [{"body": "one"}, {"body": "two"}])
    assert dbapi_conn._pool is None  # returned, not closed
    assert not dbapi_conn.closed
    with engine.connect() as conn:
        rows = conn.execute(select(notes.c.body).order_by(notes.c.id)).scalars().all()
        assert rows == ["one", "two"]
        assert conn.execute(text("SELECT :x + 1"), {"x": 41}).scalar_one() == 42
    # A failed transaction: SQLAlchemy rolls back, the connection still comes back.
    with pytest.raises(Exception, match="division by zero"):
        with engine.begin() as conn:
            conn.execute(insert(notes), [{"body": "three"}])
            conn.execute(text("SELECT 1/0"))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(notes)).scalar_one() == 2
    assert_all_back(pool, before + 4)


def test_orm_round_trip_from_threads(pool: ConnectionPool, engine: Engine) -> None:
    """Sessions in 6 threads share a pool of at most 3 connections."""
    before = pool.get_stats()["requests_num"]
    errors: list[Exception] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        try:
            for i in range(5):
                with Session(engine) as session:
                    session.add(Item(name=f"w{w}-{i}", qty=i))
                    session.commit()
                with Session(engine) as session:
                    item = session.scalars(select(Item).where(Item.name == f"w{w}-{i}")).one()
                    assert item.qty == i
                    item.qty += 100
                    session.commit()
        except Exception as ex:
            with lock:
                errors.append(ex)

    with running_threads(*(lambda w=w: worker(w) for w in range(6))):
        pass
    assert errors == []
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 30
        assert session.scalar(select(func.sum(Item.qty))) == 6 * sum(range(5)) + 30 * 100
    # Each session used one connection per transaction (two per loop: 6 x 5 x 2), +1.
    assert_all_back(pool, before + 61)


def test_disconnect_is_invalidated_and_replaced(
    dsn: str, pool: ConnectionPool, engine: Engine
) -> None:
    """A server-side disconnect: SQLAlchemy invalidates the connection (it calls
    close(), which should hand the broken connection back), our pool discards and
    replaces it, and the next checkout works."""
    with engine.connect() as conn:
        dbapi_conn: Any = conn.connection.dbapi_connection
        terminate_backends(dsn, dbapi_conn.info.backend_pid)
        with pytest.raises(DBAPIError) as excinfo:
            conn.execute(text("SELECT 1"))
        assert excinfo.value.connection_invalidated
    assert dbapi_conn.closed
    wait_until(
        lambda: pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"] == 2,
        "the broken connection to be replaced",
    )
    assert pool.get_stats()["returns_bad"] == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


@run_async
async def test_async_disconnect_is_invalidated_and_replaced(dsn: str) -> None:
    async with AsyncConnectionPool(
        dsn, min_size=2, close_returns=True, timeout=10, open=False, name="sa-async-bad"
    ) as pool:
        await pool.wait(10)
        engine = create_async_engine(
            "postgresql+psycopg://", async_creator=pool.getconn, poolclass=NullPool
        )
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                await asyncio.to_thread(terminate_backends, dsn, driver.info.backend_pid)
                with pytest.raises(DBAPIError) as excinfo:
                    await conn.execute(text("SELECT 1"))
                assert excinfo.value.connection_invalidated
            assert driver.closed
            await await_until(
                lambda: pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"] == 2,
                "the broken connection to be replaced",
            )
            assert pool.get_stats()["returns_bad"] == 1
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        finally:
            await engine.dispose()


@run_async
async def test_async_engine(dsn: str) -> None:
    async with AsyncConnectionPool(
        dsn, min_size=2, max_size=3, close_returns=True, timeout=10, open=False, name="sa-async"
    ) as pool:
        await pool.wait(10)
        engine = create_async_engine(
            "postgresql+psycopg://", async_creator=pool.getconn, poolclass=NullPool
        )
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                await conn.run_sync(core_metadata.create_all)
            before = pool.get_stats()["requests_num"]

            # Core
            async with engine.begin() as conn:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                assert driver._pool is pool
                await conn.execute(insert(notes), [{"body": "async"}])
            async with engine.connect() as conn:
                body = (await conn.execute(select(notes.c.body))).scalar_one()
                assert body == "async"

            # ORM
            async with AsyncSession(engine) as session:
                session.add_all([Item(name="a", qty=1), Item(name="b", qty=2)])
                await session.commit()
            async with AsyncSession(engine) as session:
                items = (await session.scalars(select(Item).order_by(Item.name))).all()
                assert [(i.name, i.qty) for i in items] == [("a", 1), ("b", 2)]

            await await_until(lambda: all_back(pool), "every connection back in the pool")
            assert_all_back(pool, before + 4)
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
                await conn.run_sync(core_metadata.drop_all)
        finally:
            await engine.dispose()
        await await_until(lambda: all_back(pool), "every connection back in the pool")
