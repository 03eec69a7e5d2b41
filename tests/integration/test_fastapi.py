"""FastAPI over the async pool: a request cut short keeps its connection.

FastAPI and Starlette run on anyio, whose cancel scopes cancel a task again at each
wait until the scope is left. A request timed out by a middleware leaves the
handler's `pool.connection()` block cancelled, and the rollback that block owes must
not wait in the cancelled task: psycopg would close the connection it interrupts, and
each timed-out request would cost a reconnection. (FastAPI shields the exit of a
dependency that yields: a block there was safe already.)
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from psycopg_pool import AsyncConnectionPool

from .helpers import wait_until

anyio = pytest.importorskip("anyio")
fastapi = pytest.importorskip("fastapi")
testclient = pytest.importorskip("fastapi.testclient")

Scope = dict[str, Any]


class Deadline:
    """ASGI middleware: answer 504 to a request not done within `seconds`."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with anyio.move_on_after(self.seconds) as cut:
            await self.app(scope, receive, send)
        if cut.cancelled_caught:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b""})


def make_app(dsn: str) -> Any:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with AsyncConnectionPool(dsn, min_size=2, max_size=2, open=False, name="api") as pool:
            await pool.wait()
            app.state.pool = pool
            yield

    app = fastapi.FastAPI(lifespan=lifespan)

    @app.post("/orders")
    async def add_order(request: fastapi.Request, hold: float) -> dict[str, str]:
        async with request.app.state.pool.connection() as conn:
            await conn.execute("INSERT INTO orders DEFAULT VALUES")
            await anyio.sleep(hold)  # a slow payment service, say
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: fastapi.Request) -> dict[str, int]:
        result: dict[str, int] = request.app.state.pool.get_stats()
        return result

    app.add_middleware(Deadline, seconds=0.2)
    return app


def count_orders(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM orders").fetchone()
        assert row is not None
        return int(row[0])


def test_requests_cut_short_keep_their_connections(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS orders")
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY)")
    with testclient.TestClient(make_app(dsn)) as client:
        assert client.post("/orders", params={"hold": 0}).status_code == 200
        for _ in range(5):
            assert client.post("/orders", params={"hold": 30}).status_code == 504

        def settled() -> dict[str, int]:
            stats: dict[str, int] = client.get("/stats").json()
            return stats

        wait_until(lambda: settled()["pool_available"] == 2, "both connections back")
        stats = settled()
        assert stats["connections_num"] == 2  # none closed and replaced
        assert stats.get("returns_bad", 0) == 0
        # What the cut-short requests did was rolled back; the first one committed.
        assert count_orders(dsn) == 1
        assert client.post("/orders", params={"hold": 0}).status_code == 200
    assert count_orders(dsn) == 2


def test_a_stream_whose_client_went_away_gives_its_connection_back(dsn: str) -> None:
    # Starlette stops iterating the body of a streaming response whose client went
    # away, and never closes it: the generator keeps its connection until the cycle
    # collector runs. Turned off here, so that only the pool's own request for it (a
    # client has waited a second with every connection out) brings it back.
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with AsyncConnectionPool(
            dsn, min_size=1, max_size=1, timeout=10.0, open=False
        ) as pool:
            await pool.wait()
            app.state.pool = pool
            yield

    app = fastapi.FastAPI(lifespan=lifespan)

    @app.get("/numbers")
    async def numbers(request: fastapi.Request) -> Any:
        pool = request.app.state.pool

        async def body() -> AsyncIterator[bytes]:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT generate_series(1, 100000)")
                for (n,) in await cur.fetchall():
                    yield b"%d\n" % n

        return fastapi.responses.StreamingResponse(body())

    gc.collect()
    gc.disable()
    try:
        with testclient.TestClient(app) as client:
            for _ in range(2):  # the second waits for the first one's connection
                with client.stream("GET", "/numbers") as response:
                    assert next(response.iter_lines()) == "1"
    finally:
        gc.enable()
