"""The cutover's statements (orchestrator/sql/swap.py), rendered without a server."""

import pytest

from orchestrator.sql import QualifiedName, swap
from orchestrator.sql.compose import text

T = QualifiedName("app", "Order Items")
TW = QualifiedName("app", "Order Items_partitioned")
OLD = QualifiedName("app", "Order Items_retired")
T_SQL = '"app"."Order Items"'
TW_SQL = '"app"."Order Items_partitioned"'
OLD_SQL = '"app"."Order Items_retired"'


def test_lock_and_renames():
    # ONLY: the parent's lock already covers its partitions.
    assert text(swap.lock_table(T)) == f"LOCK TABLE ONLY {T_SQL} IN ACCESS EXCLUSIVE MODE"
    assert text(swap.rename(T, OLD.name)) == f'ALTER TABLE {T_SQL} RENAME TO "Order Items_retired"'
    assert text(swap.rename(TW, T.name)) == f'ALTER TABLE {TW_SQL} RENAME TO "Order Items"'
    # cutover: live out, twin in; its rollback: live (the partitioned one) out, retired back in
    assert [text(s) for s in swap.renames(T, TW, OLD.name)] == [
        f'ALTER TABLE {T_SQL} RENAME TO "Order Items_retired"', f'ALTER TABLE {TW_SQL} RENAME TO "Order Items"']
    assert [text(s) for s in swap.renames(T, OLD, TW.name)] == [
        f'ALTER TABLE {T_SQL} RENAME TO "Order Items_partitioned"', f'ALTER TABLE {OLD_SQL} RENAME TO "Order Items"']


def test_foreign_keys():
    ref, fk = QualifiedName("app", "Line"), "line_order_fk"
    definition = 'FOREIGN KEY (o) REFERENCES app."Order Items"(id)'
    assert text(swap.drop_constraint(ref, fk)) == 'ALTER TABLE "app"."Line" DROP CONSTRAINT "line_order_fk"'
    assert text(swap.add_foreign_key_not_valid(ref, fk, definition)) == \
        f'ALTER TABLE "app"."Line" ADD CONSTRAINT "line_order_fk" {definition} NOT VALID'
    assert text(swap.validate_constraint(ref, fk)) == 'ALTER TABLE "app"."Line" VALIDATE CONSTRAINT "line_order_fk"'


def test_owner_sequences_identity():
    assert text(swap.owner_to(T, "App Owner")) == f'ALTER TABLE {T_SQL} OWNER TO "App Owner"'
    seq = QualifiedName("app", "Order Items_id_seq")
    assert text(swap.sequence_owned_by(seq, T, "id")) == \
        f'ALTER SEQUENCE "app"."Order Items_id_seq" OWNED BY {T_SQL}."id"'
    assert text(swap.sequence_state(seq)) == 'SELECT last_value, is_called FROM "app"."Order Items_id_seq"'
    assert text(swap.SETVAL) == "SELECT pg_catalog.setval(%s::pg_catalog.regclass, %s::bigint, %s::boolean)"


def test_grants():
    assert text(swap.grant("SELECT", T, None)) == f"GRANT SELECT ON {T_SQL} TO PUBLIC"
    # A role named PUBLIC is a name, not everyone.
    assert text(swap.grant("SELECT", T, "PUBLIC")) == f'GRANT SELECT ON {T_SQL} TO "PUBLIC"'
    assert text(swap.grant_column("SELECT", "id", T, None)) == f'GRANT SELECT ("id") ON {T_SQL} TO PUBLIC'
    assert text(swap.grant("INSERT", T, "Reporter", grantable=True)) == \
        f'GRANT INSERT ON {T_SQL} TO "Reporter" WITH GRANT OPTION'
    assert text(swap.grant_column("UPDATE", "Note", T, "app")) == f'GRANT UPDATE ("Note") ON {T_SQL} TO "app"'
    with pytest.raises(ValueError):
        swap.grant("SELECT; DROP TABLE x", T, "app")


def test_comment_statistics_rls():
    assert text(swap.comment_on_table(T, "it's")) == f"COMMENT ON TABLE {T_SQL} IS 'it''s'"
    assert text(swap.comment_on_table(T, None)) == f"COMMENT ON TABLE {T_SQL} IS NULL"
    assert text(swap.set_statistics(T, "Note", 500)) == f'ALTER TABLE {T_SQL} ALTER COLUMN "Note" SET STATISTICS 500'
    assert text(swap.row_level_security(T)) == f"ALTER TABLE {T_SQL} ENABLE ROW LEVEL SECURITY"
    assert text(swap.row_level_security(T, force=True)) == f"ALTER TABLE {T_SQL} FORCE ROW LEVEL SECURITY"


def test_views_and_policies():
    v = QualifiedName("app", "Daily")
    assert text(swap.replace_view(v, " SELECT 1;")) == 'CREATE OR REPLACE VIEW "app"."Daily" AS  SELECT 1;'
    assert text(swap.replace_view(v, " SELECT 1;", ("security_barrier=true", "check_option=local"))) == \
        'CREATE OR REPLACE VIEW "app"."Daily" WITH (security_barrier=true, check_option=local) AS  SELECT 1;'
    assert text(swap.create_policy(T, "own", True, "*", None, "(owner = CURRENT_USER)", None)) == \
        f'CREATE POLICY "own" ON {T_SQL} AS PERMISSIVE FOR ALL TO PUBLIC USING ((owner = CURRENT_USER))'
    assert text(swap.create_policy(T, "Paid", False, "w", ("PUBLIC", "Support"), None, "(amount < 10)")) == \
        f'CREATE POLICY "Paid" ON {T_SQL} AS RESTRICTIVE FOR UPDATE TO "PUBLIC", "Support" WITH CHECK ((amount < 10))'
    # The expressions are taken whole: braces, and our old placeholder, are left alone.
    assert text(swap.create_policy(T, "p", True, "r", ("app",), "(tags @> '{a}' AND note <> '{table}')", None)) == \
        f"CREATE POLICY \"p\" ON {T_SQL} AS PERMISSIVE FOR SELECT TO \"app\" " \
        "USING ((tags @> '{a}' AND note <> '{table}'))"


@pytest.mark.parametrize("state, verb", [("O", "ENABLE"), ("D", "DISABLE"), ("R", "ENABLE REPLICA"),
                                         ("A", "ENABLE ALWAYS")])
def test_trigger_state(state, verb):
    assert text(swap.trigger_state(T, "Audit", state)) == f'ALTER TABLE {T_SQL} {verb} TRIGGER "Audit"'


def test_triggers():
    assert text(swap.drop_trigger(T, "Audit")) == f'DROP TRIGGER IF EXISTS "Audit" ON {T_SQL}'
    definition = 'CREATE TRIGGER "Audit" AFTER INSERT ON app."Order Items" FOR EACH ROW EXECUTE FUNCTION app.f()'
    assert text(swap.create_trigger(definition)) == definition


def test_replica_identity():
    assert text(swap.replica_identity(T, "f")) == f"ALTER TABLE {T_SQL} REPLICA IDENTITY FULL"
    assert text(swap.replica_identity(T, "n")) == f"ALTER TABLE {T_SQL} REPLICA IDENTITY NOTHING"
    assert text(swap.replica_identity_index(T, "Order Items_uq_twin")) == \
        f'ALTER TABLE {T_SQL} REPLICA IDENTITY USING INDEX "Order Items_uq_twin"'


def test_publications():
    assert text(swap.publish_via_partition_root("Pub")) == \
        'ALTER PUBLICATION "Pub" SET (publish_via_partition_root = true)'
    assert text(swap.publication_drop_table("Pub", OLD)) == f'ALTER PUBLICATION "Pub" DROP TABLE {OLD_SQL}'
    assert text(swap.publication_add_table("Pub", T)) == f'ALTER PUBLICATION "Pub" ADD TABLE {T_SQL}'
    assert text(swap.publication_add_table("Pub", T, ["id", "Note"], "(id > 10)")) == \
        f'ALTER PUBLICATION "Pub" ADD TABLE {T_SQL} ("id", "Note") WHERE ((id > 10))'


def test_storage_parameters():
    part = QualifiedName("app", "Order Items_p2026_01")
    assert text(swap.set_storage_parameters(part, ["fillfactor=70", "autovacuum_enabled=false"])) == \
        'ALTER TABLE "app"."Order Items_p2026_01" SET (fillfactor=70, autovacuum_enabled=false)'


def test_signals_and_reads():
    assert text(swap.SIGNAL_BACKEND["pg_cancel_backend"]) == "SELECT pg_catalog.pg_cancel_backend(%s)"
    assert text(swap.SIGNAL_BACKEND["pg_terminate_backend"]) == "SELECT pg_catalog.pg_terminate_backend(%s)"
    # a literal % is doubled: these run with parameters
    assert "application_name NOT LIKE 'orchestrate:%%'" in text(swap.OLD_SNAPSHOTS)
    assert text(swap.REGCLASS_OID) == "SELECT %s::regclass::oid"
