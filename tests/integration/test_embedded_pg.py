"""The throw-away PostgreSQL cluster the integration tests run against."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from psycopg_pool import _embedded_pg
from psycopg_pool._embedded_pg import DEFAULT_HBA, EmbeddedPostgres, find_pg_bindir

from ..conftest import external_dsn

SCRAM_HBA = [
    "local all all trust",
    "host all all 127.0.0.1/32 scram-sha-256",
]

needs_binaries = pytest.mark.skipif(
    external_dsn() is not None and find_pg_bindir() is None,
    reason="external server and no local PostgreSQL binaries",
)


@pytest.fixture
def no_password_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Keep libpq from finding a password anywhere; return a passfile to pass along."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    return str(tmp_path / "no-such-passfile")


def select_one(dsn: str, **kwargs: str) -> int:
    with psycopg.connect(make_conninfo(dsn, connect_timeout=10, **kwargs)) as conn:
        row = conn.execute("SELECT 1").fetchone()
    assert row is not None
    value: int = row[0]
    return value


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `predicate` (something outside this process, nothing to wait on) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_select_one(dsn: str) -> None:
    assert select_one(dsn) == 1


def test_dsn_shape(pg_control: EmbeddedPostgres) -> None:
    assert pg_control.dsn == (
        f"host=127.0.0.1 port={pg_control.port} user=postgres dbname=postgres"
    )
    with psycopg.connect(pg_control.dsn) as conn:
        assert conn.info.port == pg_control.port
        row = conn.execute("SELECT current_setting('fsync'), current_user").fetchone()
    assert row == ("off", "postgres")


def test_stop_and_start(pg_control: EmbeddedPostgres) -> None:
    dsn = pg_control.dsn
    conn = psycopg.connect(dsn)
    try:
        pg_control.stop()
        assert not pg_control.is_running()
        with pytest.raises(psycopg.OperationalError):
            select_one(dsn)
        # The connection opened before the stop was terminated by it.
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()

    pg_control.stop()  # no-op when stopped
    pg_control.start()
    assert pg_control.is_running()
    assert select_one(dsn) == 1
    pg_control.start()  # no-op when running
    assert select_one(dsn) == 1


@pytest.mark.parametrize("mode", ["smart", "fast", "immediate"])
def test_stop_modes(pg_control: EmbeddedPostgres, mode: str) -> None:
    pg_control.stop(mode)
    assert not pg_control.is_running()
    with pytest.raises(psycopg.OperationalError):
        select_one(pg_control.dsn)
    pg_control.start()
    assert select_one(pg_control.dsn) == 1


def test_stop_rejects_unknown_mode(pg_control: EmbeddedPostgres) -> None:
    with pytest.raises(ValueError, match="stop mode"):
        pg_control.stop("gentle")
    assert pg_control.is_running()


def test_restart(pg_control: EmbeddedPostgres) -> None:
    query = "SELECT pg_postmaster_start_time()"
    with psycopg.connect(pg_control.dsn) as conn:
        before = conn.execute(query).fetchone()
        pg_control.restart()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert pg_control.is_running()
    with psycopg.connect(pg_control.dsn) as conn:
        after = conn.execute(query).fetchone()
    assert before is not None and after is not None
    assert after[0] > before[0]


def test_scram_password(pg_control: EmbeddedPostgres, no_password_source: str) -> None:
    dsn = pg_control.dsn
    pg_control.set_password("s3cret'pw")
    pg_control.set_hba(SCRAM_HBA)
    assert pg_control.hba_lines == SCRAM_HBA

    with pytest.raises(psycopg.OperationalError, match="password"):
        select_one(dsn, passfile=no_password_source)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        select_one(dsn, passfile=no_password_source, password="wrong")
    assert select_one(dsn, passfile=no_password_source, password="s3cret'pw") == 1

    # Back to trust: the connection without a password works again at once.
    pg_control.set_hba(list(DEFAULT_HBA))
    assert select_one(dsn, passfile=no_password_source) == 1


def test_set_hba_rejects_bad_line(pg_control: EmbeddedPostgres, no_password_source: str) -> None:
    before = pg_control.hba_lines
    with pytest.raises(ValueError, match=r"pg_hba\.conf rejected"):
        pg_control.set_hba(["local all all trust", "hostt all all 127.0.0.1/32 trust"])
    assert pg_control.hba_lines == before
    pg_control.reload()
    assert select_one(pg_control.dsn, passfile=no_password_source) == 1


def test_set_settings_reload(pg_control: EmbeddedPostgres) -> None:
    pg_control.set_settings({"work_mem": "1234kB"})
    with psycopg.connect(pg_control.dsn) as conn:
        row = conn.execute("SHOW work_mem").fetchone()
    assert row == ("1234kB",)


def test_execute(pg_control: EmbeddedPostgres) -> None:
    assert pg_control.execute("SELECT 1, 'a' UNION ALL SELECT 2, 'b'") == "1|a\n2|b"
    with pytest.raises(RuntimeError, match="psql failed"):
        pg_control.execute("SELECT * FROM no_such_table")


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="managed"):
        EmbeddedPostgres(settings={"port": "5432"}, bindir="/nonexistent")
    with pytest.raises(ValueError, match="invalid setting name"):
        _embedded_pg._check_settings({"work_mem = 1\nfsync": "on"})
    with pytest.raises(ValueError, match="newlines"):
        _embedded_pg._check_settings({"work_mem": "1\nfsync = on"})


@needs_binaries
def test_password_and_hba_at_construction(no_password_source: str) -> None:
    scram_everywhere = [
        "local all all scram-sha-256",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]
    with EmbeddedPostgres(password="pw", hba_lines=scram_everywhere) as pg:
        assert pg.hba_lines == scram_everywhere
        with pytest.raises(psycopg.OperationalError, match="password"):
            select_one(pg.dsn, passfile=no_password_source)
        assert select_one(pg.dsn, passfile=no_password_source, password="pw") == 1
        # The instance's own psql connections go through the unix socket with it.
        assert pg.execute("SELECT current_user") == "postgres"


@needs_binaries
def test_standby_and_promote(no_password_source: str) -> None:
    scram_with_replication = [
        "local all all scram-sha-256",
        "local replication all scram-sha-256",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host replication all 127.0.0.1/32 scram-sha-256",
    ]
    with EmbeddedPostgres(password="pw", hba_lines=scram_with_replication) as primary:
        primary.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        standby = primary.create_standby()
        try:
            assert not standby.is_running()
            assert standby.port != primary.port
            assert standby.password == "pw"
            assert standby.hba_lines == scram_with_replication
            standby.start()
            assert standby.execute("SELECT pg_is_in_recovery()") == "t"
            assert standby.execute("SELECT x FROM t") == "1"  # in the base backup
            primary.execute("INSERT INTO t VALUES (2)")
            wait_until(lambda: standby.execute("SELECT count(*) FROM t") == "2", "WAL streaming")
            with pytest.raises(RuntimeError, match="read-only"):
                standby.execute("INSERT INTO t VALUES (3)")
            standby.promote()
            assert standby.execute("SELECT pg_is_in_recovery()") == "f"
            standby.execute("INSERT INTO t VALUES (3)")
            assert select_one(standby.dsn, passfile=no_password_source, password="pw") == 1
        finally:
            standby.cleanup()
        with pytest.raises(RuntimeError, match="promote"):
            primary.promote()  # not a standby


@needs_binaries
def test_cleanup_removes_everything() -> None:
    with EmbeddedPostgres() as pg:
        assert pg.is_running()
        base = pg.base_dir
        pid = pg._postmaster_pid()
        assert pid is not None
        assert select_one(pg.dsn) == 1
    assert not os.path.exists(base)
    assert not _embedded_pg._pid_alive(pid)
    assert not pg.is_running()
    pg.cleanup()  # idempotent
    with pytest.raises(RuntimeError, match="cleaned up"):
        pg.start()


@needs_binaries
def test_start_failure_reports_log() -> None:
    pg = EmbeddedPostgres(settings={"shared_buffers": "not a size"})
    try:
        with pytest.raises(RuntimeError, match="shared_buffers") as excinfo:
            pg.start(timeout=10)
        assert "server log tail" in str(excinfo.value)
        assert not pg.is_running()
    finally:
        pg.cleanup()


@needs_binaries
def test_killed_process_leaves_nothing_behind() -> None:
    # A process killed outright (no atexit) still gets its server stopped and its
    # files removed, by the watchdog.
    code = textwrap.dedent(
        """
        import os, signal
        from psycopg_pool._embedded_pg import EmbeddedPostgres
        pg = EmbeddedPostgres()
        pg.start()
        print(pg.base_dir, pg._postmaster_pid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    base, pid = res.stdout.split()
    wait_until(lambda: not os.path.exists(base), "the watchdog to remove the cluster")
    assert not _embedded_pg._pid_alive(int(pid))


@needs_binaries
def test_exiting_process_cleans_up() -> None:
    code = textwrap.dedent(
        """
        from psycopg_pool._embedded_pg import EmbeddedPostgres
        pg = EmbeddedPostgres(watchdog=False)
        pg.start()
        print(pg.base_dir, pg._postmaster_pid(), flush=True)
        raise SystemExit(3)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 3, res.stderr
    base, pid = res.stdout.split()
    # atexit did the work before the process ended: nothing to wait for.
    assert not os.path.exists(base)
    assert not _embedded_pg._pid_alive(int(pid))


def test_module_does_not_import_psycopg() -> None:
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("embedded_pg", {_embedded_pg.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert not [m for m in sys.modules if m.startswith("psycopg")], sys.modules
        """
    )
    res = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr


def test_find_pg_bindir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PG_BINDIR", raising=False)
    found = find_pg_bindir()
    if found is None:
        pytest.skip("no local PostgreSQL binaries")

    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("initdb", "pg_ctl"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PG_BINDIR", str(fake))
    assert find_pg_bindir() == str(fake)

    # A PG_BINDIR without the binaries is passed over.
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    assert find_pg_bindir() == found
