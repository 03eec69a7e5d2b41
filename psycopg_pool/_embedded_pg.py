"""Throw-away PostgreSQL clusters for the test suite, the demo and tools.

An `EmbeddedPostgres` owns a fresh data directory in a temporary folder, a private
unix-socket folder and a log file next to them. It listens on 127.0.0.1 only, trusts
every local connection unless told otherwise, and trades durability for speed
(no fsync, no full page writes, asynchronous commit). Nothing here survives the
process: every instance is cleaned up at interpreter exit, and a small watchdog
process stops the server and removes the files even if this process is killed.

PostgreSQL refuses to run as root, so when the effective user is root the server
binaries run as the ``postgres`` system account (created on demand) and the
temporary folder is handed over to it. Otherwise the binaries run as the current
user.

This module uses the standard library only: it must stay importable without
psycopg, and it never imports psycopg.
"""

from __future__ import annotations

import atexit
import glob
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

__all__ = ["DEFAULT_HBA", "STOP_MODES", "EmbeddedPostgres", "find_pg_bindir"]

HOST = "127.0.0.1"
SUPERUSER = "postgres"
SERVER_ACCOUNT = "postgres"

#: pg_hba.conf used when none is given: every local and loopback connection is trusted.
DEFAULT_HBA: tuple[str, ...] = (
    "local all all trust",
    "local replication all trust",
    f"host all all {HOST}/32 trust",
    f"host replication all {HOST}/32 trust",
)

STOP_MODES = ("smart", "fast", "immediate")

# Settings owned by the instance itself: changing them would make `port`/`dsn` lie
# about where the server listens, or hide from `reload()` the log lines it waits for
# (which is also why log_min_messages must not be "fatal" or "panic").
_RESERVED_SETTINGS = frozenset(
    {"port", "listen_addresses", "unix_socket_directories", "logging_collector", "log_destination"}
)
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")

# A placeholder setting bumped on every reload: the postmaster logs its change while it
# processes the reload, which tells us the new configuration (and pg_hba.conf) is live.
_MARKER = "embedded_pg.generation"
_CONF_NAME = "embedded_pg.conf"

# unix domain socket paths are limited to 107 bytes; ".s.PGSQL.65535" and the folders
# below the temporary directory need about 30 of them.
_MAX_BASE_LEN = 70


def _has_server_binaries(path: str) -> bool:
    return all(os.access(os.path.join(path, name), os.X_OK) for name in ("initdb", "pg_ctl"))


def _version_key(bindir: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin, where version is "15" or "9.6"
    version = os.path.basename(os.path.dirname(bindir))
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def find_pg_bindir() -> str | None:
    """Return a folder holding the PostgreSQL server binaries, or None.

    Looked up in order: ``$PG_BINDIR``, ``pg_config --bindir``, then the newest
    ``/usr/lib/postgresql/*/bin``. A candidate counts only if it holds executable
    ``initdb`` and ``pg_ctl``; one that does not is passed over.
    """
    from_env = os.environ.get("PG_BINDIR")
    if from_env and _has_server_binaries(from_env):
        return from_env

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
                stdin=subprocess.DEVNULL,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_binaries(out):
            return out

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_server_binaries(candidate):
            return candidate
    return None


def _server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        pass
    res = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", SERVER_ACCOUNT],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    try:
        return pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        raise RuntimeError(
            f"running as root and there is no {SERVER_ACCOUNT!r} account to run PostgreSQL"
            f" as; useradd failed: {res.stderr.strip()}"
        ) from None


def _temp_parent(account: pwd.struct_passwd | None) -> str | None:
    """Where to create the temporary folder (None: tempfile's default)."""
    parent = tempfile.gettempdir()
    if len(parent) > _MAX_BASE_LEN - 30:
        return "/tmp"
    if account is not None:
        # The server account must be able to reach the folder: every ancestor needs
        # the "x" bit for others (we cannot ask os.access on behalf of another user).
        path = os.path.realpath(parent)
        while True:
            try:
                if not os.stat(path).st_mode & 0o001:
                    return "/tmp"
            except OSError:
                return "/tmp"
            up = os.path.dirname(path)
            if up == path:
                break
            path = up
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"setting values cannot contain newlines: {value!r}")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie answers kill(0) but is gone for our purposes (it happens when the
    # postmaster's adoptive parent does not reap its children, e.g. in containers).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return True
    state = stat.rpartition(")")[2].split()
    return not (state and state[0] in ("Z", "X"))


def _child_env(password: str | None = None) -> dict[str, str]:
    # Drop the caller's libpq/server variables (PGDATA, PGPORT, PGHOST, ...): every
    # command gets what it needs on its command line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["PGCONNECT_TIMEOUT"] = "10"
    env["PGPASSFILE"] = os.devnull
    if password is not None:
        env["PGPASSWORD"] = password
    return env


# The watchdog runs in its own session and waits for its stdin to reach end of file:
# that happens when we close the pipe in cleanup() or when this process dies in any
# way, SIGKILL included. It then stops the server (if still up) and removes the files.
_WATCHDOG = """\
import os, shutil, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
pg_ctl, data, base, uid, gid = sys.argv[1:6]
sys.stdin.buffer.read()
if os.path.exists(os.path.join(data, "postmaster.pid")):
    kw = {}
    if int(uid) >= 0:
        kw = dict(user=int(uid), group=int(gid), extra_groups=[])
    subprocess.run(
        [pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "30", "-s"],
        cwd=base, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, check=False, **kw)
shutil.rmtree(base, ignore_errors=True)
"""

_live: set[EmbeddedPostgres] = set()


def _cleanup_at_exit() -> None:
    for instance in list(_live):
        instance._cleanup_if_owner()


atexit.register(_cleanup_at_exit)


class EmbeddedPostgres:
    """A private PostgreSQL cluster in a temporary folder; see the module docstring.

    The cluster is created (initdb) by the constructor and started by `start()` or by
    entering the ``with`` block; `cleanup()` (or leaving the block) stops it and
    removes every file. `create_standby()` makes another instance whose cluster is a
    streaming-replication copy of this one.
    """

    # Set (before __init__ runs) only by create_standby(): copy this running server
    # with pg_basebackup instead of running initdb.
    _standby_of: EmbeddedPostgres | None = None

    def __init__(
        self,
        *,
        port: int | None = None,
        bindir: str | None = None,
        max_connections: int = 100,
        settings: dict[str, str] | None = None,
        hba_lines: list[str] | None = None,
        password: str | None = None,
        watchdog: bool = True,
    ) -> None:
        settings = dict(settings or {})
        _check_settings(settings)
        hba = list(hba_lines) if hba_lines is not None else list(DEFAULT_HBA)
        _check_hba(hba)
        found = bindir if bindir is not None else find_pg_bindir()
        if found is None:
            raise RuntimeError(
                "PostgreSQL server binaries (initdb, pg_ctl) not found: install the"
                " 'postgresql' package (scripts/bootstrap.sh does) or set PG_BINDIR"
            )
        if not _has_server_binaries(found):
            raise RuntimeError(f"no executable initdb and pg_ctl in {found!r}")

        self._bindir = found
        self._account = _server_account()
        self._fixed_port = port is not None
        self._port = port if port is not None else _free_port()
        self._max_connections = max_connections
        self._settings = settings
        self._hba = hba
        self._password = password
        self._password_pending = password is not None
        self._generation = 0
        self._owner_pid = os.getpid()
        self._closed = False
        self._watchdog: subprocess.Popen[bytes] | None = None

        self._base = tempfile.mkdtemp(prefix="pgpool-", dir=_temp_parent(self._account))
        _live.add(self)
        try:
            self._chown(self._base)
            os.mkdir(self.socket_dir, 0o700)
            self._chown(self.socket_dir)
            if watchdog:
                self._start_watchdog()
            if self._standby_of is None:
                self._initdb()
            else:
                self._basebackup(self._standby_of)
        except BaseException:
            self.cleanup()
            raise

    # -- public properties -------------------------------------------------------

    @property
    def dsn(self) -> str:
        """libpq conninfo string for TCP connections as the superuser."""
        return f"host={HOST} port={self._port} user={SUPERUSER} dbname=postgres"

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return HOST

    @property
    def bindir(self) -> str:
        return self._bindir

    @property
    def base_dir(self) -> str:
        """The temporary folder holding everything below."""
        return self._base

    @property
    def datadir(self) -> str:
        return os.path.join(self._base, "data")

    @property
    def socket_dir(self) -> str:
        return os.path.join(self._base, "socket")

    @property
    def log_path(self) -> str:
        return os.path.join(self._base, "server.log")

    @property
    def password(self) -> str | None:
        """The superuser's password, if one was set."""
        return self._password

    @property
    def settings(self) -> dict[str, str]:
        """The server settings given by the caller (on top of the instance's own)."""
        return dict(self._settings)

    @property
    def hba_lines(self) -> list[str]:
        """The lines currently written in pg_hba.conf."""
        return list(self._hba)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {state} port={self._port} dir={self._base!r}>"

    # -- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections (no-op if running).

        Raise RuntimeError, with the end of the server log, if it does not come up.
        """
        self._check_open()
        if self.is_running():
            return
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            offset = self._log_size()
            res = self._run(
                [
                    self._bin("pg_ctl"),
                    "start",
                    "-D",
                    self.datadir,
                    "-l",
                    self.log_path,
                    "-w",
                    "-s",
                    "-t",
                    str(max(1, math.ceil(timeout))),
                ],
                timeout=timeout + 30,
            )
            if res.returncode == 0 and self.is_running():
                break
            log = self._read_log(offset)
            self._kill_leftover()
            if attempt + 1 < attempts and "could not bind" in log:
                # Someone took the port we picked: pick another one.
                self._port = _free_port()
                self._write_conf()
                continue
            raise RuntimeError(
                f"PostgreSQL did not start (data directory {self.datadir}):"
                f" {(res.stderr or res.stdout).strip()}\n"
                f"--- server log tail ---\n{_tail(log)}"
            )
        if self._password_pending:
            # The first start runs with a trusting pg_hba.conf until the password the
            # caller's pg_hba.conf may ask for is in place.
            assert self._password is not None
            self.set_password(self._password)
            self._password_pending = False
            self._write_hba()
            self.reload()

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``); no-op if not running."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {STOP_MODES}, got {mode!r}")
        if not self.is_running():
            return
        res = self._run(
            [
                self._bin("pg_ctl"),
                "stop",
                "-D",
                self.datadir,
                "-m",
                mode,
                "-w",
                "-s",
                "-t",
                str(max(1, math.ceil(timeout))),
            ],
            timeout=timeout + 30,
        )
        if res.returncode != 0 and self.is_running():
            raise RuntimeError(
                f"PostgreSQL did not stop ({mode}): {(res.stderr or res.stdout).strip()}\n"
                f"--- server log tail ---\n{self.log_tail()}"
            )

    def restart(self, mode: str = "fast") -> None:
        """Stop the server (if running) with `mode`, then start it again."""
        self.stop(mode)
        self.start()

    def create_standby(self, *, port: int | None = None, watchdog: bool = True) -> EmbeddedPostgres:
        """Return a new, stopped instance: a streaming-replication standby of this one.

        This server must be running and let the superuser make replication connections
        over TCP from 127.0.0.1 (`DEFAULT_HBA` does), with ``wal_level`` ``replica`` or
        ``logical`` (PostgreSQL's default). The standby's data directory is a
        ``pg_basebackup -R -X stream`` copy of this cluster, so once started it runs as
        a hot standby (read-only) streaming WAL from this server's `port`; `promote()`
        makes it a primary. It gets this instance's bindir, max_connections, settings,
        pg_hba.conf lines and password, and its own port (`port`, or a free one), folder
        and watchdog. It is an independent instance: clean it up on its own.
        """
        self._check_open()
        if not self.is_running():
            raise RuntimeError(f"{self!r} must be running to make a standby of it")
        standby = EmbeddedPostgres.__new__(EmbeddedPostgres)
        standby._standby_of = self
        EmbeddedPostgres.__init__(
            standby,
            port=port,
            bindir=self._bindir,
            max_connections=self._max_connections,
            settings=self._settings,
            hba_lines=self._hba,
            watchdog=watchdog,
        )
        standby._standby_of = None
        standby._password = self._password  # the role's password came with the copy
        return standby

    def promote(self, timeout: float = 60.0) -> None:
        """Make a running standby a primary (``pg_ctl promote``); return once it is one.

        Raise RuntimeError if the server is not running or not a standby.
        """
        self._check_open()
        res = self._run(
            [
                self._bin("pg_ctl"),
                "promote",
                "-D",
                self.datadir,
                "-w",
                "-s",
                "-t",
                str(max(1, math.ceil(timeout))),
            ],
            timeout=timeout + 30,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"pg_ctl promote failed: {(res.stderr or res.stdout).strip()}\n"
                f"--- server log tail ---\n{self.log_tail()}"
            )

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def reload(self, timeout: float = 30.0) -> None:
        """Make the server re-read its configuration files and pg_hba.conf.

        Return once the server has processed the reload, so connections opened
        afterwards see the new configuration. If the server is stopped, there is
        nothing to do: the files are read when it starts.
        """
        self._check_open()
        self._generation += 1
        self._write_conf()
        if not self.is_running():
            return
        offset = self._log_size()
        res = self._run([self._bin("pg_ctl"), "reload", "-D", self.datadir, "-s"])
        if res.returncode != 0:
            raise RuntimeError(f"pg_ctl reload failed: {(res.stderr or res.stdout).strip()}")
        needle = f'parameter "{_MARKER}" changed to "{self._generation}"'
        deadline = time.monotonic() + timeout
        while True:
            log = self._read_log(offset)
            if needle in log:
                return
            if "contains errors" in log:
                raise RuntimeError(f"the configuration has errors:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not reload in {timeout}s:\n{_tail(log)}")
            if not self.is_running():
                raise RuntimeError(f"PostgreSQL stopped while reloading:\n{_tail(log)}")
            # Nothing to wait on but the log file: poll it.
            time.sleep(0.005)

    def set_hba(self, lines: list[str]) -> None:
        """Replace pg_hba.conf with `lines` and, if the server is running, reload it.

        Raise ValueError (and keep the old file) if the server rejects a line.
        """
        self._check_open()
        lines = list(lines)
        _check_hba(lines)
        previous = self._hba
        self._hba = lines
        if self._password_pending:
            return  # written by start() once the password is set
        self._write_hba()
        if not self.is_running():
            return
        errors = self._hba_errors()
        if errors:
            self._hba = previous
            self._write_hba()
            raise ValueError(f"pg_hba.conf rejected: {errors}")
        self.reload()

    def set_settings(self, settings: dict[str, str], *, replace: bool = False) -> None:
        """Add or change server settings (all of them with `replace`) and reload.

        Settings that PostgreSQL only reads at start need a `restart()` as well.
        """
        self._check_open()
        _check_settings(settings)
        if replace:
            self._settings = dict(settings)
        else:
            self._settings.update(settings)
        self.reload()

    def set_password(self, password: str | None) -> None:
        """Set (or, with None, remove) the superuser's password; the server must run."""
        self._check_open()
        literal = "NULL" if password is None else _sql_literal(password)
        self.execute(f"ALTER ROLE {SUPERUSER} PASSWORD {literal}")
        self._password = password

    def execute(self, sql: str, timeout: float = 60.0) -> str:
        """Run `sql` with psql over the unix socket as the superuser; return its output.

        The output is unaligned and tuples-only: one row a line, ``|`` between fields.
        """
        res = self._psql(sql, timeout)
        if res.returncode != 0:
            raise RuntimeError(f"psql failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip()

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the server log."""
        return _tail(self._read_log(0), lines)

    def cleanup(self) -> None:
        """Stop the server at once if running and remove the temporary folder."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        try:
            if self.is_running():
                try:
                    self.stop("immediate")
                except (RuntimeError, OSError, subprocess.SubprocessError):
                    self._kill_leftover()
        finally:
            shutil.rmtree(self._base, ignore_errors=True)
            self._stop_watchdog()

    def __enter__(self) -> EmbeddedPostgres:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- internals ----------------------------------------------------------------

    def _cleanup_if_owner(self) -> None:
        # A forked child inherits our atexit handlers; only the creator cleans up.
        if os.getpid() == self._owner_pid:
            self.cleanup()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} has been cleaned up")

    def _bin(self, name: str) -> str:
        return os.path.join(self._bindir, name)

    def _chown(self, path: str) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _run(
        self, args: list[str], timeout: float = 60.0, password: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the server account when we are root."""
        acct = self._account
        return subprocess.run(
            args,
            cwd=self._base,
            env=_child_env(password),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=acct.pw_uid if acct is not None else None,
            group=acct.pw_gid if acct is not None else None,
            extra_groups=[] if acct is not None else None,
        )

    def _psql(self, sql: str, timeout: float) -> subprocess.CompletedProcess[str]:
        psql = self._bin("psql")
        if not os.access(psql, os.X_OK):
            psql = shutil.which("psql") or psql
        # psql is a client: it runs as ourselves, even as root.
        return subprocess.run(
            [
                psql,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.socket_dir,
                "-p",
                str(self._port),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-c",
                sql,
            ],
            cwd=self._base,
            env=_child_env(self._password),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _initdb(self) -> None:
        res = self._run(
            [
                self._bin("initdb"),
                "-D",
                self.datadir,
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=300,
        )
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed: {res.stderr.strip() or res.stdout.strip()}")
        with open(os.path.join(self.datadir, "postgresql.conf"), "a", encoding="utf-8") as f:
            f.write(f"\ninclude '{_CONF_NAME}'\n")
        self._write_conf()
        if self._password_pending:
            self._write_file("pg_hba.conf", _hba_text(list(DEFAULT_HBA)))
        else:
            self._write_hba()

    def _basebackup(self, source: EmbeddedPostgres) -> None:
        """Create the data directory as a standby of `source` (see create_standby)."""
        res = self._run(
            [
                self._bin("pg_basebackup"),
                "-D",
                self.datadir,
                "-h",
                HOST,
                "-p",
                str(source.port),
                "-U",
                SUPERUSER,
                "-w",
                "-R",  # standby.signal + primary_conninfo in postgresql.auto.conf
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            timeout=300,
            password=source.password,
        )
        if res.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {res.stderr.strip() or res.stdout.strip()}")
        # The copy has the source's postgresql.conf (with our include line) and files:
        # give the standby its own port, socket folder and pg_hba.conf.
        self._write_conf()
        self._write_hba()

    def _write_file(self, name: str, text: str) -> None:
        path = os.path.join(self.datadir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        self._chown(tmp)
        os.replace(tmp, path)

    def _write_conf(self) -> None:
        base = {
            "listen_addresses": HOST,
            "port": str(self._port),
            "unix_socket_directories": self.socket_dir,
            "max_connections": str(self._max_connections),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            _MARKER: str(self._generation),
        }
        lines = ["# written by psycopg_pool._embedded_pg; rewritten on every reload"]
        lines.extend(f"{k} = {_quote(v)}" for k, v in {**base, **self._settings}.items())
        self._write_file(_CONF_NAME, "\n".join(lines) + "\n")

    def _write_hba(self) -> None:
        self._write_file("pg_hba.conf", _hba_text(self._hba))

    def _hba_errors(self) -> list[str]:
        """Errors the server finds in pg_hba.conf as written on disk (best effort)."""
        res = self._psql(
            "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL",
            timeout=30,
        )
        if res.returncode != 0:
            return []  # e.g. the current rules keep psql out: let the reload decide
        return [line for line in res.stdout.splitlines() if line.strip()]

    def _postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="ascii") as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def _kill_leftover(self) -> None:
        """Make sure no postmaster survives a failed start or stop."""
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        try:
            os.kill(pid, signal.SIGQUIT)  # the postmaster's "immediate shutdown"
        except OSError:
            return
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _start_watchdog(self) -> None:
        acct = self._account
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-c",
                _WATCHDOG,
                self._bin("pg_ctl"),
                self.datadir,
                self._base,
                str(acct.pw_uid if acct is not None else -1),
                str(acct.pw_gid if acct is not None else -1),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_child_env(),
            start_new_session=True,
        )

    def _stop_watchdog(self) -> None:
        proc, self._watchdog = self._watchdog, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if os.getpid() != self._owner_pid:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_settings(settings: dict[str, str]) -> None:
    for name, value in settings.items():
        if not _SETTING_NAME.match(name):
            raise ValueError(f"invalid setting name: {name!r}")
        if name in _RESERVED_SETTINGS:
            raise ValueError(f"the {name!r} setting is managed by EmbeddedPostgres")
        _quote(value)


def _check_hba(lines: list[str]) -> None:
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"pg_hba.conf lines cannot contain newlines: {line!r}")


def _hba_text(lines: list[str]) -> str:
    return "# written by psycopg_pool._embedded_pg\n" + "".join(f"{line}\n" for line in lines)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
