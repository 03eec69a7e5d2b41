"""Fixtures shared by every test layer: the PostgreSQL server of the integration tests.

The server is started lazily, the first time a test asks for `dsn`, `pg_server` or
`pg_control`, so tests/core and tests/shell never start one. Set
``PSYCOPG_POOL_TEST_DSN`` to run the integration tests against a server of your own
instead; tests that need to stop or reconfigure the server are then skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from psycopg_pool._embedded_pg import EmbeddedPostgres

DSN_ENV = "PSYCOPG_POOL_TEST_DSN"
INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a PostgreSQL server (every test in tests/integration/)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


def external_dsn() -> str | None:
    """The DSN given in the environment, if the tests must use an external server."""
    return os.environ.get(DSN_ENV) or None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres | None]:
    """The session's own PostgreSQL, started once; None when an external DSN is set."""
    if external_dsn() is not None:
        yield None
        return
    from psycopg_pool._embedded_pg import EmbeddedPostgres

    server = EmbeddedPostgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def dsn(pg_server: EmbeddedPostgres | None) -> str:
    """Conninfo string of the test server (the external one if configured)."""
    if pg_server is None:
        external = external_dsn()
        assert external is not None
        return external
    return pg_server.dsn


@pytest.fixture
def pg_control(pg_server: EmbeddedPostgres | None) -> Iterator[EmbeddedPostgres]:
    """The session's server, for tests that stop, restart or reconfigure it.

    Skips with an external DSN. Afterwards the server is running again, with the
    pg_hba.conf and settings it had before the test.
    """
    if pg_server is None:
        pytest.skip(f"{DSN_ENV} is set: the server is not ours to control")
    hba = pg_server.hba_lines
    settings = pg_server.settings
    yield pg_server
    if pg_server.settings != settings:
        pg_server.set_settings(settings, replace=True)
        pg_server.stop()  # some settings are only read at start
    pg_server.start()
    if pg_server.hba_lines != hba:
        pg_server.set_hba(hba)
