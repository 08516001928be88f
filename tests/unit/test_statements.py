"""Which application statements break after cutover: the pure parser over pg_stat_statements text."""

from __future__ import annotations

import pytest

from orchestrator.inspect import TableInfo
from orchestrator.sql import QualifiedName
from orchestrator.statements import breaks


def info(schema: str = "public", name: str = "orders") -> TableInfo:
    return TableInfo(name=QualifiedName(schema, name), oid=1, relkind="r", owner="o", comment=None, acl=[],
                     columns=[], primary_key=["id"], indexes=[], checks=[], outgoing_fks=[], incoming_fks=[],
                     dependents=[], triggers=[], sequences=[], replica_identity="d", replica_identity_index=None,
                     rls_enabled=False, rls_forced=False, policies=[], publications=[], reloptions=[],
                     estimated_rows=0, total_bytes=0)


@pytest.mark.parametrize("query", [
    "INSERT INTO orders (id, created_at, v) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
    "insert into public.orders(id, v) values ($1,$2) on conflict(id) do nothing",
    'INSERT INTO "public"."orders" (id) VALUES ($1) ON CONFLICT ("id") DO NOTHING',
    "INSERT INTO orders (email) VALUES ($1) ON CONFLICT (lower(email)) DO NOTHING",
    "INSERT INTO orders (id) VALUES ($1) ON CONFLICT (id) WHERE id > $2 DO NOTHING",
    "INSERT INTO orders (id) VALUES ($1) ON CONFLICT ON CONSTRAINT orders_pkey DO NOTHING",
])
def test_breaking(query):
    assert breaks(query, info(), "created_at", {"orders_pkey"})


@pytest.mark.parametrize("query", [
    "INSERT INTO orders (id, created_at) VALUES ($1, $2) ON CONFLICT (id, created_at) DO NOTHING",
    "INSERT INTO orders (id) VALUES ($1) ON CONFLICT DO NOTHING",
    "INSERT INTO orders_archive (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
    "INSERT INTO other.orders (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
    "UPDATE orders SET v = $1 WHERE id = $2",
    "INSERT INTO orders (id) VALUES ($1) ON CONFLICT ON CONSTRAINT something_else DO NOTHING",
    "INSERT INTO orders (id, created_at) VALUES ($1, $2) ON CONFLICT (date_trunc('day', created_at), id) DO NOTHING",
])
def test_not_breaking(query):
    assert breaks(query, info(), "created_at", {"orders_pkey"}) is None
