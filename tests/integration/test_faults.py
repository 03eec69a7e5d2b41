"""Fault injection against the real server: what users see, and that nothing is lost (issue 4).

Each scenario of `faults.py` runs once (a module-scoped fixture) against the session's
server, which it stops, restarts or reconfigures, and leaves running as it found it;
the tests below assert on its report, one property each, so that one property that
fails does not hide the others. The same
scenarios run against upstream psycopg-pool in `bench/faults.py` (FAULTS.md).

"Lost" is always checked the same way: once the fault is over the pool's `pool_size`
equals the live server backends carrying the pool's `application_name` (and its
`min_size` where the pool must get back to it). "Hung" means a client call still
running a second after its own deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import faults

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(pg_server: Any) -> Iterator[Any]:
    """The session's server, ours to stop and reconfigure; running, as it was, afterwards."""
    if pg_server is None:
        pytest.skip("an external server is not ours to stop or reconfigure")
    hba = pg_server.hba_lines
    yield pg_server
    pg_server.start()
    if pg_server.hba_lines != hba:
        pg_server.set_hba(hba)


def once(fn: Callable[..., dict[str, Any]], **params: Any) -> Callable[..., dict[str, Any]]:
    """A module-scoped fixture running scenario `fn(server, **params)` for all its tests."""

    @pytest.fixture(scope="module")
    def report(server: Any) -> dict[str, Any]:
        return fn(server, **params)

    return report


def assert_nothing_lost(report: dict[str, Any]) -> None:
    assert report["settled"], f"pool_size {report['pool_size']} != live {report['live']}"
    assert report["lost"] == 0, report
    assert report["closed"], "close() hung"


# ----------------------------------------------------------------------
# Wrong password, no password, missing database: fail fast, say why

AUTH_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def auth_report(server: Any) -> dict[str, Any]:
    with faults.password_auth(server):
        return faults.scenario_auth(server, timeout=AUTH_TIMEOUT)


@pytest.mark.parametrize("case", list(faults.AUTH_CASES))
@pytest.mark.parametrize(
    "call",
    [
        "getconn",
        "getconn_later",
        "wait",
        "wait_later",
        "open_wait",
    ],
)
def test_config_error_raises_at_once_saying_why(
    auth_report: dict[str, Any], case: str, call: str
) -> None:
    got = auth_report["cases"][case][call]
    assert got["type"] == "PoolTimeout", got
    assert not got["hung"]
    # "At once": one connect attempt, not the timeout. Only "well before" is asserted.
    assert got["elapsed"] < AUTH_TIMEOUT / 2, got
    assert got["says_why"], got["message"]
    assert got["cause_is_psycopg_error"] and got["cause_says_why"], got["cause"]


def test_config_error_never_shows_a_password(auth_report: dict[str, Any]) -> None:
    assert auth_report["pool_log_records"] > 0  # the failures were logged...
    assert auth_report["secret_leaks"] == []  # ...and raised, without the password


# ----------------------------------------------------------------------
# Connection refused at open, the server starts 3 s later

refused_report = once(faults.scenario_refused, outage=3.0)

# Waiting clients must be served this soon after the server is up (the README promises
# a probe every 0.2 s while clients wait; the rest is slack for a loaded machine).
SOON = 1.0


def test_refused_at_open_waiting_clients_are_served(refused_report: dict[str, Any]) -> None:
    assert refused_report["errors"] == 0, refused_report["clients"]
    assert refused_report["hangs"] == 0


def test_refused_at_open_reconnect_failed_once_per_outage(
    refused_report: dict[str, Any],
) -> None:
    assert refused_report["reconnect_failed_calls"] == 1, refused_report


def test_refused_at_open_pool_refills_by_itself(refused_report: dict[str, Any]) -> None:
    assert refused_report["refilled"], refused_report
    assert_nothing_lost(refused_report)


def test_refused_at_open_waiting_clients_are_served_soon(
    refused_report: dict[str, Any],
) -> None:
    assert refused_report["last_served_after_up"] <= SOON, refused_report


# ----------------------------------------------------------------------
# Server restart with an idle pool: no dead connection handed out

restart_idle = once(faults.scenario_restart_idle)
restart_idle_check = once(faults.scenario_restart_idle, check=True)
restart_idle_async = once(faults.scenario_restart_idle, use_async=True)


@pytest.mark.parametrize("variant", ["restart_idle", "restart_idle_check", "restart_idle_async"])
def test_restart_idle_pool_hands_out_no_dead_connection(
    request: pytest.FixtureRequest, variant: str
) -> None:
    report = request.getfixturevalue(variant)
    assert report["errors"] == 0, report["requests"]
    assert report["hangs"] == 0
    assert_nothing_lost(report)


# ----------------------------------------------------------------------
# Server restart with 8 busy clients

restart_busy = once(faults.scenario_restart_busy)
restart_busy_async = once(faults.scenario_restart_busy, use_async=True)


@pytest.mark.parametrize("variant", ["restart_busy", "restart_busy_async"])
def test_restart_busy_errors_only_on_connections_in_use(
    request: pytest.FixtureRequest, variant: str
) -> None:
    report = request.getfixturevalue(variant)
    assert report["errors_other"] == 0, report["errors_other_detail"]
    assert report["errors"] <= report["in_use_at_restart"], report


@pytest.mark.parametrize("variant", ["restart_busy", "restart_busy_async"])
def test_restart_busy_full_service_afterwards(request: pytest.FixtureRequest, variant: str) -> None:
    report = request.getfixturevalue(variant)
    assert report["clients_never_served_again"] == 0, report
    assert report["hangs"] == 0
    assert_nothing_lost(report)


# ----------------------------------------------------------------------
# pg_terminate_backend() of a random pool connection every 100 ms, mostly idle pool

terminate_report = once(faults.scenario_terminate, duration=3.0)


def test_terminate_storm_nothing_lost(terminate_report: dict[str, Any]) -> None:
    assert terminate_report["kills"] >= 10, terminate_report
    assert terminate_report["hangs"] == 0
    assert not terminate_report["check_hung"]
    assert_nothing_lost(terminate_report)


def test_terminate_storm_few_user_errors(terminate_report: dict[str, Any]) -> None:
    assert terminate_report["errors_per_kill"] <= 0.5, terminate_report


# ----------------------------------------------------------------------
# Black hole: the network stops forwarding (sockets open), later heals

blackhole = once(faults.scenario_blackhole)
blackhole_check = once(faults.scenario_blackhole, check=True)
# The network comes back for new connections only: the old ones stay silent for good.
blackhole_check_stranded = once(
    faults.scenario_blackhole, check=True, heal="strand", after_timeout=3.0
)
BLACKHOLES = ["blackhole", "blackhole_check", "blackhole_check_stranded"]


@pytest.mark.parametrize("variant", BLACKHOLES)
def test_blackhole_getconn_never_exceeds_its_timeout(
    request: pytest.FixtureRequest, variant: str
) -> None:
    report = request.getfixturevalue(variant)
    assert report["hangs"] == 0, report["during"] + report["after"]
    # Each client gets an idle connection (if its check passes) or a PoolTimeout.
    assert report["during_got_connection"] + report["during_timed_out"] == 4, report["during"]


@pytest.mark.parametrize("variant", ["blackhole", "blackhole_check"])
def test_blackhole_requests_succeed_once_the_network_is_back(
    request: pytest.FixtureRequest, variant: str
) -> None:
    report = request.getfixturevalue(variant)
    assert report["after_ok"] == 3, report["after"]
    assert_nothing_lost(report)


def test_blackhole_stranded_requests_succeed_once_the_network_is_back(
    blackhole_check_stranded: dict[str, Any],
) -> None:
    assert blackhole_check_stranded["after_ok"] == 3, blackhole_check_stranded["after"]


# ----------------------------------------------------------------------
# The server's max_connections is lower than max_size

max_connections_report = once(faults.scenario_max_connections)


def test_max_connections_below_max_size_no_user_error(
    max_connections_report: dict[str, Any],
) -> None:
    report = max_connections_report
    assert report["errors"] == 0, report["error_samples"]
    assert report["hangs"] == 0
    assert report["max_live_seen"] <= report["available"]
    # Attempts are reported apart: the real connections never exceed the backends.
    assert report["samples_real_above_live"] == 0, report
    # pool_size counts the real connections once the load is over.
    assert report["pool_size"] == report["live"], report
    assert_nothing_lost(report)


def test_max_connections_wait_names_too_many_clients(
    max_connections_report: dict[str, Any],
) -> None:
    assert max_connections_report["wait"]["error"] is not None
    assert max_connections_report["wait_says_too_many"], max_connections_report["wait_message"]


# ----------------------------------------------------------------------
# Leak: 4 x getconn without putconn, then the references are dropped

leak = once(faults.scenario_leak)
leak_tracked = once(faults.scenario_leak, leak_timeout=0.3)
LEAKS = ["leak", "leak_tracked"]


@pytest.mark.parametrize("variant", LEAKS)
def test_leak_timeout_names_the_pool_and_the_count(
    request: pytest.FixtureRequest, variant: str
) -> None:
    report = request.getfixturevalue(variant)
    assert report["timeout"]["error"].startswith("PoolTimeout"), report["timeout"]
    assert report["names_pool"] and report["says_all_in_use"], report["message"]


@pytest.mark.parametrize("variant", LEAKS)
def test_leak_timeout_names_the_oldest_holder(request: pytest.FixtureRequest, variant: str) -> None:
    report = request.getfixturevalue(variant)
    assert report["names_holder"], report["message"]


def test_leak_held_too_long_warning_on_time(leak_tracked: dict[str, Any]) -> None:
    # Within the leak_timeout plus 2 s of slack, saying where the connection was taken.
    assert leak_tracked["held_warning_after"] is not None, leak_tracked
    assert leak_tracked["held_warning_names_where"], leak_tracked["warning_sample"]


def test_leak_timeout_says_where_it_was_taken(leak_tracked: dict[str, Any]) -> None:
    assert leak_tracked["names_where"], leak_tracked["message"]


@pytest.mark.parametrize("variant", LEAKS)
def test_leak_slots_come_back_when_collected(request: pytest.FixtureRequest, variant: str) -> None:
    report = request.getfixturevalue(variant)
    assert report["served_after_drop"]["ok"], report["served_after_drop"]
    assert report["collected_warnings"] == 4, report["warning_sample"]
    assert_nothing_lost(report)


def test_leak_collected_warning_says_where_it_was_taken(leak_tracked: dict[str, Any]) -> None:
    assert leak_tracked["collected_warning_names_where"], leak_tracked["warning_sample"]


# ----------------------------------------------------------------------
# asyncio cancel storm, with a second cancel during the clean-up

cancel_storm = once(faults.scenario_cancel_storm, duration=2.0)


def test_cancel_storm_nothing_lost_nothing_hangs(cancel_storm: dict[str, Any]) -> None:
    assert cancel_storm["runs"] > 100, cancel_storm
    assert cancel_storm["hangs"] == 0
    assert cancel_storm["errors"] == 0, cancel_storm["error_samples"]
    assert cancel_storm["all_lendable"]
    assert_nothing_lost(cancel_storm)
