"""orchestrate: zero-downtime range partitioning of live PostgreSQL tables."""

__version__ = "0.1.0"
