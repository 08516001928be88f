"""The lab: what the demo, the benchmarks and the tests run against, never the engine itself.

Local servers (a primary + streaming replica, a Citus coordinator + workers, PgBouncer in
front of them), the sample ``orders`` table, the application-like workload with its golden
record, ``orchestrate bench`` and ``orchestrate demo``. The lab imports the engine; the
engine never imports the lab (an import-linter contract in pyproject.toml, run by CI).
"""
