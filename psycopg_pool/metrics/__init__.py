"""Metrics exporters for the pools, each an optional extra.

- `psycopg_pool.metrics.prometheus`: a Prometheus collector (extra ``prometheus``);
- `psycopg_pool.metrics.otel`: OpenTelemetry metrics following the database client
  connection-pool semantic conventions (extra ``otel``).

Import the module you use: neither is imported by ``import psycopg_pool`` (nor by
this package), so the pool works, and costs nothing more, without them.
"""
