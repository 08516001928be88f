"""The drift comparison and the twin statements it renders, without a database."""

from __future__ import annotations

import copy

from orchestrator.drift import Change, diff, twin_ddl
from orchestrator.sql import QualifiedName, fit_name
from orchestrator.sql.compose import text

BASE = {
    "columns": [
        {"name": "id", "attnum": 1, "type": "bigint", "collation": None, "not_null": True,
         "default": "nextval('public.t_id_seq'::regclass)", "generated": "", "identity": ""},
        {"name": "created_at", "attnum": 2, "type": "timestamp with time zone", "collation": None,
         "not_null": True, "default": None, "generated": "", "identity": ""},
        {"name": "note", "attnum": 3, "type": "text", "collation": None, "not_null": False, "default": None,
         "generated": "", "identity": ""},
    ],
    "pk": ["id"], "key": "created_at",
    "checks": {"c1": "CHECK ((id > 0))"},
    "indexes": {"t_note": "CREATE INDEX t_note ON public.t USING btree (note)"},
}
TWIN = QualifiedName("public", "t_partitioned")


def changed(**edits) -> dict:
    new = copy.deepcopy(BASE)
    for k, v in edits.items():
        new[k] = v
    return new


def kinds(new: dict) -> tuple[list[str], list[str]]:
    carried, refused = diff(BASE, new)
    return [c.kind for c in carried], refused


def test_no_change():
    assert diff(BASE, copy.deepcopy(BASE)) == ([], [])


def test_compatible_kinds():
    new = copy.deepcopy(BASE)
    new["columns"].append({"name": "region", "attnum": 4, "type": "text", "collation": None, "not_null": True,
                           "default": "'eu'::text", "generated": "", "identity": ""})
    new["columns"][2] = {**new["columns"][2], "name": "label", "default": "'x'::text"}
    new["checks"] = {"c1": "CHECK ((id > 0))", "c2": "CHECK ((id < 10)) NOT VALID"}
    new["indexes"] = {"t_label": "CREATE INDEX t_label ON public.t USING btree (label)"}
    got, refused = kinds(new)
    assert refused == []
    assert sorted(got) == sorted(["add_column", "rename_column", "default", "add_check", "drop_index", "add_index"])


def test_validate_and_drop_check():
    base_nv = copy.deepcopy(BASE)
    base_nv["checks"] = {"c1": "CHECK ((id > 0)) NOT VALID"}
    carried, _ = diff(base_nv, copy.deepcopy(BASE))
    assert [c.kind for c in carried] == ["validate_check"]
    assert kinds(changed(checks={}))[0] == ["drop_check"]


def test_refused_kinds():
    new = copy.deepcopy(BASE)
    new["columns"][2] = {**new["columns"][2], "type": "character varying(10)"}
    assert "column note changed type text -> character varying(10)" in kinds(new)[1]
    new = copy.deepcopy(BASE)
    new["pk"] = ["id", "note"]
    assert any("primary key changed (id) -> (id, note)" in r for r in kinds(new)[1])
    new = copy.deepcopy(BASE)
    new["columns"][1] = {**new["columns"][1], "name": "at"}
    assert any("partition key column created_at was renamed" in r for r in kinds(new)[1])
    new = copy.deepcopy(BASE)
    del new["columns"][1]
    assert any("created_at (part of the partition key) was dropped" in r for r in kinds(new)[1])
    new = copy.deepcopy(BASE)
    new["columns"][2] = {**new["columns"][2], "collation": 'pg_catalog."C"'}
    assert any("collation" in r for r in kinds(new)[1])


def test_twin_statements():
    add = Change("add_column", "region", {"type": "text", "collation": None, "generated": "", "default": "'eu'::text",
                                          "not_null": True}, "")

    def ddl(ch):
        return [text(q) for q in twin_ddl(TWIN, ch, "created_at")]

    assert ddl(add) == [
        'ALTER TABLE "public"."t_partitioned" ADD COLUMN "region" text DEFAULT \'eu\'::text NOT NULL']
    assert ddl(Change("drop_column", "Note", {}, "")) == [
        'ALTER TABLE "public"."t_partitioned" DROP COLUMN IF EXISTS "Note"']
    assert ddl(Change("default", "note", {"default": None}, "")) == [
        'ALTER TABLE "public"."t_partitioned" ALTER COLUMN "note" DROP DEFAULT']
    assert ddl(Change("add_check", "c2", {"definition": "CHECK ((id < 10))"}, "")) == [
        'ALTER TABLE "public"."t_partitioned" ADD CONSTRAINT "c2" CHECK ((id < 10)) NOT VALID']


def test_fit_name_is_unique_within_63_bytes():
    a, b = "x" * 60 + "_a", "x" * 60 + "_b"
    na, nb = fit_name(a, "_p2026_01"), fit_name(b, "_p2026_01")
    assert na != nb and len(na.encode()) <= 63 and len(nb.encode()) <= 63 and na.endswith("_p2026_01")
    assert fit_name("orders", "_p2026_01") == "orders_p2026_01"
    assert len(fit_name("é" * 40, "_twin").encode()) <= 63
