"""``psycopg-pool doctor DSN``: find what will stop a pool from working, say how to fix it.

The checks run in the order a connection goes through them: the conninfo, the host
name, the network, the login (authentication, database, role, free slots, TLS),
then the server's settings that matter to a pool (connection slots, idle timeouts,
keepalives, a PgBouncer in the way) and finally a real pool, opened as an
application would. Each check prints one line: its status, what it checked, what it
found; a problem adds a line with the fix. Passwords are never printed.

Exit status: 0 when nothing needs fixing, 1 when something does (WARN or FAIL), 2 on
a usage error.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .._connection_facts import add_network_defaults
from .._explain import mask, mask_pieces, password_pieces
from ..errors import PoolTimeout
from ..pool import ConnectionPool
from . import argtypes
from .display import fmt_seconds

APP_NAME = "psycopg-pool doctor"
SLOW_CONNECT = 0.1  # seconds: a connection slower than this to open is worth a word
INTEGRATIONS = "docs/integrations.md"

OK, NOTE, WARN, FAIL, SKIP = "ok", "note", "WARN", "FAIL", "skip"
PROBLEMS = (WARN, FAIL)


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "doctor",
        help="diagnose a DSN: explain what stops a pool from connecting, and the fix",
        description=(
            "Connect to DSN as a pool would and explain, one line per check, what works"
            " and what does not (authentication, network, missing database, connection"
            " slots, TLS, slow connections, idle timeouts, PgBouncer), with the fix."
            " Passwords are never printed. Exit status 0: all fine; 1: problems found."
        ),
    )
    p.add_argument("dsn", nargs="?", help="conninfo or URL (default: $DATABASE_URL)")
    p.add_argument("--min-size", type=argtypes.natural, default=4, help="the pool's min_size (4)")
    p.add_argument(
        "--max-size", type=argtypes.natural, help="the pool's max_size (default: min_size)"
    )
    p.add_argument(
        "--processes",
        type=argtypes.positive_int,
        default=1,
        help="processes that will each run a pool (1)",
    )
    p.add_argument(
        "--max-lifetime",
        type=argtypes.seconds,
        default=3600.0,
        help="the pool's max_lifetime, seconds (3600)",
    )
    p.add_argument(
        "--timeout",
        type=argtypes.seconds,
        default=10.0,
        help="for each connection and the pool (10 s)",
    )
    p.set_defaults(func=run)


@dataclass
class Finding:
    status: str
    check: str
    found: str
    fix: str = ""


class Problem(Exception):
    """A check failed in a way that makes the next ones pointless."""


class Doctor:
    def __init__(self, dsn: str, args: argparse.Namespace, out: TextIO) -> None:
        self.dsn = dsn
        self.args = args
        self.out = out
        self.findings: list[Finding] = []
        self.params: dict[str, Any] = {}
        try:
            given = conninfo_to_dict(dsn).get("password")
        except psycopg.Error:
            given = None
        self.password = str(given or os.environ.get("PGPASSWORD") or "")
        self.pieces = password_pieces(dsn)  # also of a DSN libpq misreads
        self.min_size: int = max(0, args.min_size)
        self.max_size: int = args.max_size if args.max_size is not None else max(1, self.min_size)
        self.processes: int = max(1, args.processes)
        self.local = False  # every host is this machine (unix socket or loopback)
        self.kwargs: dict[str, Any] = {}

    # -- output ----------------------------------------------------------------------

    def add(self, status: str, check: str, found: str, fix: str = "") -> None:
        f = Finding(status, check, found, fix)
        self.findings.append(f)
        self.say(f"{status:<5} {check:<16} {found}")
        if fix:
            self.say(f"{'':<5} {'':<16} fix: {fix}")

    def say(self, line: str) -> None:
        self.out.write(self.hide(line) + "\n")
        self.out.flush()

    def hide(self, text: str) -> str:
        """Mask anything that looks like a password, and the password itself."""
        text = mask_pieces(mask(text), self.pieces)
        if len(self.password) >= 3:
            text = text.replace(self.password, "***")
        return text

    # -- the checks ----------------------------------------------------------------

    def run(self) -> int:
        try:
            self.check_conninfo()
            self.check_network()
            conn = self.check_login()
            try:
                # Before the connect-time check: its connections, closed but maybe
                # still exiting on the server, would count as in use.
                self.check_server(conn)
                self.check_connect_time()
            finally:
                conn.close()
            self.check_pool()
        except Problem:
            self.add(SKIP, "the rest", "not checked: it needs the problem above fixed first")
        problems = [f for f in self.findings if f.status in PROBLEMS]
        if problems:
            n = len(problems)
            self.say(f"{n} problem{'s' if n > 1 else ''} found: see the fix lines above.")
            return 1
        self.say("no problem found.")
        return 0

    def check_conninfo(self) -> None:
        try:
            params = conninfo_to_dict(self.dsn)
        except psycopg.Error as ex:
            self.add(
                FAIL,
                "conninfo",
                f"cannot be parsed: {one_line(ex)}",
                "write it as key=value pairs (host=db port=5432 dbname=app user=app) or as"
                " a URL (postgresql://app@db:5432/app); quote values with spaces ('...')",
            )
            raise Problem from None
        self.params = params
        if params.get("password"):
            pw = "password given in the DSN"
        elif os.environ.get("PGPASSWORD"):
            pw = "password from $PGPASSWORD"
        else:
            pw = "no password given (~/.pgpass may supply one)"
        shown = {k: v for k, v in params.items() if k != "password"}
        where = " ".join(f"{k}={v}" for k, v in shown.items()) or "(libpq defaults)"
        self.add(OK, "conninfo", f"{where}; {pw}")
        self.kwargs = {}
        if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
            self.kwargs["connect_timeout"] = max(1, round(self.args.timeout))
        if "application_name" not in params:
            self.kwargs["application_name"] = APP_NAME
        add_network_defaults(self.dsn, self.kwargs)

    def targets(self) -> Iterator[tuple[str, str, int]]:
        """(host, hostaddr, port) for each host of the conninfo, as libpq reads it."""
        hosts = str(self.params.get("host") or os.environ.get("PGHOST") or "").split(",")
        addrs = str(self.params.get("hostaddr") or os.environ.get("PGHOSTADDR") or "").split(",")
        ports = str(self.params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
        n = max(len(hosts), len(addrs))
        for i in range(n):
            host = hosts[i] if i < len(hosts) else ""
            addr = addrs[i] if i < len(addrs) else ""
            port = ports[i] if len(ports) > 1 and i < len(ports) else ports[0]
            try:
                yield host.strip(), addr.strip(), int(port or 5432)
            except ValueError:
                yield host.strip(), addr.strip(), 5432

    def check_network(self) -> None:
        timeout = self.connect_timeout()
        reachable = 0
        local = True
        for host, addr, port in self.targets():
            if not host and not addr:
                self.add(OK, "host", "no host given: libpq uses its default unix socket")
                reachable += 1
                continue
            if not addr and host.startswith("/"):
                path = os.path.join(host, f".s.PGSQL.{port}")
                if os.path.exists(path):
                    self.add(OK, "server reachable", f"unix socket {path} exists")
                    reachable += 1
                else:
                    self.add(
                        FAIL,
                        "server reachable",
                        f"no server socket at {path}",
                        "start the server, or point host= at the folder in its"
                        " unix_socket_directories setting, with its port",
                    )
                continue
            addrs = [addr]
            if not addr:
                try:
                    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except socket.gaierror as ex:
                    self.add(
                        FAIL,
                        "host lookup",
                        f"cannot resolve {host!r}: {ex.strerror}",
                        "check the spelling of host=, and that this machine's DNS (or"
                        " /etc/hosts) knows the name",
                    )
                    continue
                # Every address, in order, as libpq tries them ("localhost" is often
                # ::1 first, then 127.0.0.1, and a server may listen on one only).
                addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
                if not _is_ip(host):
                    self.add(OK, "host lookup", f"{host} resolves to {', '.join(addrs)}")
            failed: list[tuple[str, str]] = []
            for addr in addrs:
                t0 = time.perf_counter()
                problem = self.tcp_problem(addr, port, timeout)
                if problem is None:
                    ms = (time.perf_counter() - t0) * 1000
                    found = f"{addr} port {port} accepts TCP ({ms:.1f} ms)"
                    if failed:
                        found += f"; before it, {'; '.join(text for text, _ in failed)}"
                    self.add(OK, "server reachable", found)
                    local = local and _is_loopback(addr)
                    reachable += 1
                    break
                failed.append(problem)
            else:
                for text, fix in failed:
                    self.add(FAIL, "server reachable", text, fix)
        self.local = local
        if not reachable:
            raise Problem

    @staticmethod
    def tcp_problem(addr: str, port: int, timeout: float) -> tuple[str, str] | None:
        """Why `addr` does not accept a TCP connection on `port`, and the fix; or None."""
        try:
            with socket.create_connection((addr, port), timeout=timeout):
                return None
        except ConnectionRefusedError:
            return (
                f"connection refused at {addr} port {port}: nothing listens there",
                "start the server, check the port (SHOW port), and that its"
                " listen_addresses includes this interface (it is 'localhost' by default)",
            )
        except TimeoutError:
            return (
                f"no answer from {addr} port {port} within {timeout:g} s",
                "a firewall or security group drops the packets, or the host is down:"
                " open the port from this machine to the server",
            )
        except OSError as ex:
            return (
                f"cannot reach {addr} port {port}: {ex.strerror or ex}",
                "check the address and the network route to the server",
            )

    def connect_timeout(self) -> float:
        """libpq's connect_timeout, or --timeout where it sets none (0 or less: none)."""
        value = self.params.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT")
        try:
            seconds = float(value) if value else 0.0
        except ValueError:
            seconds = 0.0
        return seconds if seconds > 0 else float(self.args.timeout)

    def connect(self, **extra: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, **{**self.kwargs, **extra})

    def check_login(self) -> psycopg.Connection[Any]:
        t0 = time.perf_counter()
        try:
            conn = self.connect()
        except psycopg.Error as ex:
            self.explain_connect_error(str(ex))
            raise Problem from None
        self.first_connect = time.perf_counter() - t0
        used = conn.pgconn.used_password
        user = conn.info.user
        how = "with a password" if used else "without a password (trust, peer or certificate)"
        self.add(OK, "authentication", f"logged in as {user!r} {how}")
        self.add(OK, "database", f"{conn.info.dbname!r} exists")
        return conn

    def explain_connect_error(self, message: str, check: str = "") -> None:
        """Turn a connection error into a finding (FAIL) with the fix."""
        f = diagnose(message, self.params, self.password)
        if f.check == "database":
            others = self.list_databases()
            if others:
                f.fix += f"; databases on this server: {others}"
        self.add(f.status, check or f.check, f.found, f.fix)

    def list_databases(self) -> str:
        for db in ("postgres", "template1"):
            try:
                with self.connect(dbname=db, connect_timeout=3) as conn:
                    rows = conn.execute(
                        "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1"
                    ).fetchall()
            except psycopg.Error:
                continue
            names = [r[0] for r in rows if r[0] not in ("template0", "template1")]
            return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return ""

    def check_connect_time(self) -> None:
        times = [self.first_connect]
        if self.first_connect < 2.0:
            for _ in range(2):
                t0 = time.perf_counter()
                try:
                    self.connect().close()
                except psycopg.Error:
                    break
                times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        found = f"opening a connection takes {median * 1000:.1f} ms (median of {len(times)})"
        if median > SLOW_CONNECT:
            self.add(
                WARN,
                "connect time",
                found + ": clients wait that long whenever the pool grows",
                "keep min_size at the usual number of busy connections so growth is rare;"
                " the usual causes are DNS (log_hostname=on on the server), TLS or SCRAM"
                " round trips over a long distance: run the application near the server",
            )
        else:
            self.add(OK, "connect time", found)

    def check_server(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "SELECT current_setting('server_version'), pg_backend_pid(),"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),"
            " current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " coalesce(current_setting('reserved_connections', true), '0')::int,"
            " current_setting('ssl')"
        ).fetchone()
        assert row is not None
        version, pid, superuser, max_conn, su_reserved, reserved, ssl = row
        proxied = pid != conn.info.backend_pid
        self.check_tls(conn, ssl, proxied)
        self.check_slots(conn, bool(superuser), max_conn, su_reserved + reserved, proxied)
        settings = dict(
            (name, _seconds(setting, unit))
            for name, setting, unit in conn.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name IN"
                " ('idle_session_timeout', 'idle_in_transaction_session_timeout',"
                " 'tcp_keepalives_idle', 'statement_timeout')"
            )
        )
        self.check_idle_timeouts(settings)
        self.check_keepalives(settings)
        self.check_pgbouncer(conn, proxied, pid, version)

    def check_tls(self, conn: psycopg.Connection[Any], server_ssl: str, proxied: bool) -> None:
        sslmode = str(self.params.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer")
        unix = conn.info.host.startswith("/")
        if conn.pgconn.ssl_in_use:
            version = ""
            if not proxied:
                r = conn.execute(
                    "SELECT version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                ).fetchone()
                if r and r[0]:
                    version = f" ({r[0]}, {r[1]})"
            if sslmode in ("verify-full", "verify-ca"):
                self.add(OK, "TLS", f"encrypted{version}, certificate verified (sslmode={sslmode})")
            else:
                self.add(
                    NOTE,
                    "TLS",
                    f"encrypted{version}, but the server's certificate is not verified"
                    f" (sslmode={sslmode}): anyone on the path could pose as the server",
                    "use sslmode=verify-full with sslrootcert= the CA that signed the"
                    " server's certificate",
                )
            return
        if sslmode in ("disable", "allow"):
            why = f"sslmode={sslmode}"
        else:
            why = f"server ssl={server_ssl}"
        if unix or self.local:
            where = "a unix socket" if unix else "this machine"
            self.add(OK, "TLS", f"not encrypted ({why}); fine for a connection to {where}")
            return
        self.add(
            WARN,
            "TLS",
            f"not encrypted ({why}): the traffic and the login cross the network in the clear",
            "turn ssl on in the server's postgresql.conf (with a certificate) and connect with"
            " sslmode=verify-full (or at least sslmode=require)",
        )

    def check_slots(
        self,
        conn: psycopg.Connection[Any],
        superuser: bool,
        max_conn: int,
        reserved: int,
        proxied: bool,
    ) -> None:
        rows = conn.execute(
            "SELECT coalesce(usename, '?'), count(*)::int FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        in_use = sum(n for _, n in rows)
        who = ", ".join(f"{u} {n}" for u, n in rows[:5]) + (", ..." if len(rows) > 5 else "")
        slots = max_conn if superuser else max_conn - reserved
        room = slots - in_use + (0 if proxied else 1)  # our own connection is about to close
        want_min = self.min_size * self.processes
        want_max = self.max_size * self.processes
        procs = f" x {self.processes} processes" if self.processes > 1 else ""
        if want_min == want_max:
            wants = f"{want_max} (min_size = max_size = {self.max_size}{procs})"
        else:
            wants = (
                f"{want_min} to {want_max} (min_size {self.min_size} to max_size"
                f" {self.max_size}{procs})"
            )
        res = "" if superuser else f", {reserved} reserved for superusers"
        found = (
            f"max_connections {max_conn}{res}; {in_use} in use ({who}): room for {room} more;"
            f" the pool wants {wants}"
        )
        if proxied:
            found += " [these are the server's numbers, behind PgBouncer]"
        fix = (
            "free slots (see who holds them: SELECT usename, application_name, count(*)"
            " FROM pg_stat_activity GROUP BY 1, 2), lower max_size or the number of"
            " processes, raise max_connections (restart needed), or put PgBouncer in front"
            f" ({INTEGRATIONS})"
        )
        if room < want_min:
            self.add(FAIL, "connection slots", "too many clients: " + found, fix)
        elif room < want_max:
            self.add(
                WARN,
                "connection slots",
                found + ": the pool cannot grow to max_size ('too many clients' errors)",
                fix,
            )
        else:
            self.add(OK, "connection slots", found)

    def check_idle_timeouts(self, settings: dict[str, float | None]) -> None:
        idle = settings.get("idle_session_timeout") or 0.0
        lifetime = float(self.args.max_lifetime)
        if idle and idle < lifetime:
            self.add(
                WARN,
                "idle timeouts",
                f"the server ends sessions idle for {fmt_seconds(idle)} (idle_session_timeout);"
                f" pooled connections can sit idle longer than that (max_lifetime"
                f" {fmt_seconds(lifetime)}, and min_size connections are kept however long they"
                " idle): they will be killed, and replaced at the cost of a reconnect",
                f"turn it off for the pool's role: ALTER ROLE {self.user()} SET"
                f" idle_session_timeout = 0; or set max_lifetime below it"
                f" (max_lifetime={max(1, int(idle * 0.8))})",
            )
        elif idle:
            self.add(
                OK,
                "idle timeouts",
                f"idle_session_timeout {fmt_seconds(idle)} is longer than max_lifetime"
                f" {fmt_seconds(lifetime)}: connections are replaced before the server ends them",
            )
        else:
            self.add(OK, "idle timeouts", "idle_session_timeout is off")
        in_tx = settings.get("idle_in_transaction_session_timeout") or 0.0
        if in_tx:
            self.add(
                NOTE,
                "idle timeouts",
                f"a session left idle inside a transaction for {fmt_seconds(in_tx)} is ended"
                " (idle_in_transaction_session_timeout): commit or roll back promptly; the"
                " pool discards such a connection when it comes back",
            )

    def check_keepalives(self, settings: dict[str, float | None]) -> None:
        if self.local and all(h.startswith("/") or not h for h, _, _ in self.targets()):
            self.add(OK, "keepalives", "not needed on a unix socket")
            return
        p = self.params
        server = settings.get("tcp_keepalives_idle")
        server_text = (
            f"the server's tcp_keepalives_idle is {fmt_seconds(server)}"
            if server
            else "the server uses the system's keepalive time (often 2h)"
        )
        if str(p.get("keepalives", "1")) == "0":
            self.add(
                WARN,
                "keepalives",
                "keepalives=0 in the DSN: a pooled connection whose server vanished"
                " (failover, a NAT or firewall dropping idle flows) looks alive for hours;"
                f" {server_text}",
                "remove keepalives=0: the pool then sends keepalives after 60 s idle",
            )
            return
        idle = float(str(self.kwargs.get("keepalives_idle") or p.get("keepalives_idle") or 60))
        self.add(
            OK,
            "keepalives",
            f"the client sends TCP keepalives after {fmt_seconds(idle)} idle; {server_text}",
        )

    def check_pgbouncer(
        self, conn: psycopg.Connection[Any], proxied: bool, pid: int, version: str
    ) -> None:
        if not proxied:
            self.add(OK, "PgBouncer", f"none: connected to PostgreSQL {version} directly")
            return
        found = (
            f"PgBouncer (or another proxy) is in the way: the server's process"
            f" ({pid}) is not the one given at login ({conn.info.backend_pid})"
        )
        mode = ""
        try:
            with self.connect(dbname="pgbouncer", connect_timeout=3) as admin:
                v = admin.execute("SHOW VERSION").fetchone()
                for row in admin.execute("SHOW CONFIG").fetchall():
                    if row[0] == "pool_mode":
                        mode = str(row[1])
            if v:
                found = f"{v[0]} is in the way (admin console)"
        except psycopg.Error as ex:
            found += f"; its admin console did not answer ({first_line(ex)})"
        if mode:
            found += f"; pool_mode={mode}"
        fix = (
            "with pool_mode=transaction: kwargs={'prepare_threshold': None} (or"
            " max_prepared_statements in pgbouncer.ini, 1.21+), and reset= running"
            f" RESET ALL; see {INTEGRATIONS}, PgBouncer"
        )
        self.add(NOTE, "PgBouncer", found, "" if mode == "session" else fix)

    def user(self) -> str:
        return str(self.params.get("user") or os.environ.get("PGUSER") or "CURRENT_USER")

    def check_pool(self) -> None:
        """Open a pool like an application would, and borrow a connection from it."""
        size = max(1, self.min_size)
        errors: list[str] = []
        event = threading.Event()
        opened = 0

        def configure(conn: psycopg.Connection[Any]) -> None:
            nonlocal opened
            opened += 1
            if opened >= size:
                event.set()

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if msg.startswith("error connecting"):
                    errors.append(msg)
                    event.set()

        handler = Catch(logging.WARNING)
        log = logging.getLogger("psycopg.pool")
        log.addHandler(handler)
        pool: ConnectionPool[Any] = ConnectionPool(
            self.dsn,
            kwargs=dict(self.kwargs),
            min_size=size,
            max_size=max(size, self.max_size),
            open=False,
            name="doctor",
            configure=configure,
            timeout=self.args.timeout,
        )
        t0 = time.perf_counter()
        try:
            pool.open()
            event.wait(self.args.timeout)
            if errors:
                msg = errors[0].split(": ", 1)[-1]
                f = diagnose(msg, self.params, self.password)
                self.add(
                    FAIL,
                    "pool",
                    f"opened {opened} of its {size} connections, then: {f.found}",
                    f.fix,
                )
                return
            try:
                pool.wait(self.args.timeout)
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            except (PoolTimeout, psycopg.Error) as ex:
                self.add(FAIL, "pool", f"did not work: {one_line(ex)}")
                return
            ms = (time.perf_counter() - t0) * 1000
            self.add(
                OK,
                "pool",
                f"opened {size} connection{'s' if size > 1 else ''} in {ms:.0f} ms;"
                " lent one, ran SELECT 1, took it back",
            )
        finally:
            pool.close()
            log.removeHandler(handler)


def diagnose(message: str, params: dict[str, Any], password: str) -> Finding:
    """Explain a connection error message (libpq's, the server's or PgBouncer's)."""
    low = message.lower()
    user = params.get("user") or os.environ.get("PGUSER") or "(your OS user)"
    db = params.get("dbname") or os.environ.get("PGDATABASE") or user
    text = first_fatal(message)

    def f(check: str, found: str, fix: str) -> Finding:
        return Finding(FAIL, check, f"{found} [{text}]", fix)

    if "no password supplied" in low:
        return f(
            "authentication",
            "no password given, and the server asks for one",
            "give the password: the DSN's password parameter (user:secret@host in a URL),"
            " the PGPASSWORD variable, or a line in ~/.pgpass (chmod 600)",
        )
    if "password authentication failed" in low or "sasl authentication failed" in low:
        return f(
            "authentication",
            f"wrong password for user {user!r}"
            + ("" if password else " (none was given: ~/.pgpass supplied one?)"),
            "use the right password (in the DSN, $PGPASSWORD or ~/.pgpass); the server"
            f" says the same when the role {user!r} does not exist",
        )
    if "no pg_hba.conf entry" in low or "pg_hba.conf rejects" in low:
        return f(
            "authentication",
            f"the server's pg_hba.conf has no line letting user {user!r} connect to"
            f" database {db!r} from this address (or one rejects it)",
            f"add a line to pg_hba.conf, e.g. 'host {db} {user} <this machine's address>/32"
            " scram-sha-256' (hostssl to require TLS), then SELECT pg_reload_conf()",
        )
    if "peer authentication failed" in low or "ident authentication failed" in low:
        return f(
            "authentication",
            f"the server checks that the OS user is {user!r} (peer/ident), and it is not",
            "run as that OS user, connect over TCP (host=localhost) with a password, or map"
            " the OS user in pg_ident.conf",
        )
    if ("does not exist" in low and "database" in low) or "no such database" in low:
        where = " (PgBouncer has no entry for it)" if "no such database" in low else ""
        return f(
            "database",
            f"database {db!r} does not exist{where}",
            f"create it (CREATE DATABASE {db}) or fix dbname=",
        )
    if "role" in low and "does not exist" in low:
        return f(
            "authentication",
            f"role {user!r} does not exist",
            f"create it (CREATE ROLE {user} LOGIN PASSWORD '...') or fix user=",
        )
    if "not permitted to log in" in low:
        return f(
            "authentication",
            f"role {user!r} may not log in",
            f"ALTER ROLE {user} LOGIN",
        )
    if "permission denied for database" in low:
        return f(
            "database",
            f"user {user!r} may not connect to {db!r}",
            f"GRANT CONNECT ON DATABASE {db} TO {user}",
        )
    if "too many clients" in low or "remaining connection slots" in low:
        return f(
            "connection slots",
            "too many clients: every connection slot the server has for this role is taken",
            "see who holds them (as a superuser: SELECT usename, application_name, count(*)"
            " FROM pg_stat_activity GROUP BY 1, 2); lower max_size x processes, raise"
            f" max_connections, or put PgBouncer in front ({INTEGRATIONS})",
        )
    if "no more connections allowed" in low or "max_client_conn" in low:
        return f(
            "connection slots",
            "PgBouncer refuses more clients (max_client_conn)",
            "raise max_client_conn in pgbouncer.ini, or lower max_size x processes",
        )
    if "pgbouncer cannot connect" in low or "server login has been failing" in low:
        return f(
            "server reachable",
            "PgBouncer answers, but cannot log in to the PostgreSQL server behind it",
            "check the [databases] entry and auth settings of pgbouncer.ini, and PgBouncer's log",
        )
    if "server does not support ssl" in low:
        return f(
            "TLS",
            "sslmode asks for TLS, and the server has ssl off",
            "turn ssl on in the server (ssl = on, with a certificate), or use sslmode=prefer"
            " on a network you trust",
        )
    if "certificate" in low or ("ssl" in low and ("error" in low or "verify" in low)):
        return f(
            "TLS",
            "the TLS handshake failed",
            "check sslrootcert (the CA of the server's certificate) and that the host name"
            " matches the certificate for sslmode=verify-full",
        )
    if "could not translate host name" in low or "name or service not known" in low:
        return f(
            "host lookup", "the host name does not resolve", "fix host=, or this machine's DNS"
        )
    if "connection refused" in low:
        return f(
            "server reachable",
            "connection refused: nothing listens at that address and port",
            "start the server, check the port, and its listen_addresses",
        )
    if "timeout expired" in low or "timed out" in low:
        return f(
            "server reachable",
            "no answer from the server in time",
            "a firewall drops the packets, or the server is overloaded or down",
        )
    if "no such file or directory" in low:
        return f(
            "server reachable",
            "no server socket there: the server is not running on that socket",
            "start the server, or give host= and port= of a running one",
        )
    if "starting up" in low or "shutting down" in low or "recovery" in low:
        return f(
            "server reachable",
            "the server is starting, stopping or recovering",
            "wait and run doctor again",
        )
    return f("connect", "connecting failed", "read the server's message above")


def first_fatal(message: str) -> str:
    """The useful part of a libpq message: from its FATAL (or its last line)."""
    text = " ".join(message.split())
    for marker in ("FATAL: ", "fe_sendauth: "):
        i = text.find(marker)
        if i >= 0:
            return text[i:]
    i = text.rfind("failed: ")
    if i >= 0:
        text = text[i + len("failed: ") :]
    return text[:300]


def one_line(ex: BaseException) -> str:
    return " ".join(str(ex).split())


def first_line(ex: BaseException) -> str:
    return first_fatal(str(ex))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


def _seconds(setting: str | None, unit: str | None) -> float | None:
    """A pg_settings value in seconds."""
    if setting is None:
        return None
    try:
        value = float(setting)
    except ValueError:
        return None
    scale = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}.get(unit or "s", 1.0)
    return value * scale


def run(args: argparse.Namespace) -> int:
    dsn = args.dsn if args.dsn is not None else os.environ.get("DATABASE_URL")
    if dsn is None:
        print(
            "psycopg-pool doctor: give a DSN (or set DATABASE_URL), e.g."
            " psycopg-pool doctor 'host=db.internal dbname=app user=app'",
            file=sys.stderr,
        )
        return 2
    if args.max_size is not None and args.max_size < max(1, args.min_size):
        print(
            f"psycopg-pool doctor: --max-size {args.max_size} is less than --min-size"
            f" {args.min_size} (or 1): the pool would refuse it",
            file=sys.stderr,
        )
        return 2
    out = sys.stdout
    doc = Doctor(dsn, args, out)
    doc.say(f"psycopg-pool doctor: {doc.hide(dsn) or '(empty DSN: libpq defaults)'}")
    return doc.run()
