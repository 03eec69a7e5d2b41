"""A small Django project, configured in code, using the pool (issue 6, item 4).

Run by tests/integration/test_django.py in a subprocess, because Django's settings
are process-global::

    python -W error -m tests.integration.django_app.run '{"conninfo": "...", ...}'

It configures Django with ``DATABASES["default"]["OPTIONS"]["pool"]`` (Django then
builds a ``psycopg_pool.ConnectionPool`` itself), runs the migrations, runs ORM
queries from several threads (each "request" returns its connection with
``connection.close()``, as Django does at the end of a request), then returns every
connection and closes the pool. It prints one JSON object with what it saw; the test
makes the assertions. Any exception makes it exit non-zero with a traceback.
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

THREADS = 6
ROUNDS = 10
POOL = {"min_size": 2, "max_size": 4, "timeout": 10, "name": "django"}


def server_backends(conninfo: str, application_name: str) -> int:
    """Backends on the server opened with this application_name (seen from outside)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        ).fetchone()
    assert row is not None
    return int(row[0])


def main(config: dict[str, Any]) -> dict[str, Any]:
    conninfo = config["conninfo"]  # the server, for our own observations
    params = conninfo_to_dict(conninfo)
    app_name = config["application_name"]

    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "tests.integration.django_app",
        ],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": config["dbname"],
                "USER": params.get("user", ""),
                "PASSWORD": params.get("password", ""),
                "HOST": params.get("host", ""),
                "PORT": params.get("port", ""),
                "CONN_HEALTH_CHECKS": True,  # Django passes check=ConnectionPool.check_connection
                "OPTIONS": {"application_name": app_name, "pool": dict(POOL)},
            }
        },
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()

    from django.core.management import call_command
    from django.db import connection, connections, transaction
    from django.db.migrations.recorder import MigrationRecorder
    from django.db.models import F

    from .models import Note

    report: dict[str, Any] = {}
    call_command("migrate", interactive=False, verbosity=0)
    # The hand-written migration matches the model (raises SystemExit if not).
    call_command("makemigrations", "django_app", check=True, dry_run=True, verbosity=0)
    report["applied"] = sorted(
        f"{app}.{name}" for app, name in MigrationRecorder(connection).applied_migrations()
    )
    pool: Any = connection.pool
    report["pool_class"] = f"{type(pool).__module__}.{type(pool).__qualname__}"
    report["pool_file"] = inspect.getfile(type(pool))
    with connection.cursor() as cur:  # Django's configure callback set it
        cur.execute("SHOW TimeZone")
        report["timezone"] = cur.fetchone()[0]
    connection.close()  # the main thread's connection goes back to the pool

    errors: list[str] = []
    pools_seen: set[int] = set()
    lock = threading.Lock()

    def worker(w: int) -> None:
        try:
            for i in range(ROUNDS):
                # One "request": ORM work, then the connection goes back to the pool.
                Note.objects.create(author=f"w{w}", n=i, body="hello")
                with transaction.atomic():
                    note = Note.objects.select_for_update().get(author=f"w{w}", n=i)
                    Note.objects.filter(pk=note.pk).update(n=F("n") + 1000)
                assert Note.objects.filter(author=f"w{w}", n=i + 1000).count() == 1
                with lock:
                    pools_seen.add(id(connection.pool))
                connection.close()
        except Exception as ex:
            with lock:
                errors.append(f"{type(ex).__name__}: {ex}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    report["threads_alive"] = sum(t.is_alive() for t in threads)
    report["errors"] = errors
    report["pools_seen"] = len(pools_seen)
    report["same_pool"] = pools_seen == {id(pool)}
    report["notes"] = Note.objects.count()
    report["notes_n_sum"] = sum(Note.objects.values_list("n", flat=True))
    connections.close_all()  # every connection back to the pool

    report["stats"] = pool.get_stats()
    report["backends"] = server_backends(conninfo, app_name)

    def pool_threads() -> list[str]:  # our pool names its threads after itself
        return [t.name for t in threading.enumerate() if t.name.startswith(f"{pool.name}-")]

    report["pool_threads_open"] = pool_threads()
    connection.close_pool()  # pool.close(), as Django's own test runner does
    report["pool_closed"] = pool.closed
    report["pool_threads"] = pool_threads()
    # The server ends a backend a moment after its client said goodbye: poll (bounded).
    deadline = time.monotonic() + 10
    while (n := server_backends(conninfo, app_name)) and time.monotonic() < deadline:
        time.sleep(0.02)
    report["backends_after_close"] = n
    return report


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print(json.dumps(result))
