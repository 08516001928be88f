"""The owner boundary's statements, rendered without a server (security-critical text)."""

from psycopg.sql import Identifier, Literal

from orchestrator.sql import QualifiedName
from orchestrator.sql import owner as o
from orchestrator.sql.compose import SQL, text

FN = QualifiedName("app", "Order Items_as_owner")
SIG = SQL('"app"."Order Items_as_owner"(text)')
OWNER = 'Owner "A"'


def test_fixed_statements_are_schema_qualified():
    assert text(o.SEES_ALL_SESSIONS) == (
        "SELECT r.rolsuper OR pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') "
        "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user")
    assert text(o.ACTING_MODE) == (
        "SELECT current_user = %s::name, r.rolsuper, pg_catalog.pg_has_role(current_user, %s::name, 'MEMBER') "
        "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user")
    assert text(o.TABLE_OWNER_ROLE) == (
        "SELECT relowner::int, pg_catalog.pg_get_userbyid(relowner)::text FROM pg_catalog.pg_class WHERE oid = %s")


def test_giving_a_function_to_the_owner():
    q = '"Owner ""A"""'
    assert text(o.security_definer(SIG)) == 'ALTER FUNCTION "app"."Order Items_as_owner"(text) SECURITY DEFINER'
    assert text(o.owner_to(SIG, OWNER)) == f'ALTER FUNCTION "app"."Order Items_as_owner"(text) OWNER TO {q}'
    assert text(o.grant_create_on_state_schema(OWNER)) == f'GRANT CREATE ON SCHEMA "orchestrate" TO {q}'
    assert text(o.revoke_create_on_state_schema(OWNER)) == f'REVOKE CREATE ON SCHEMA "orchestrate" FROM {q}'
    assert text(o.revoke_from_public(SIG)) == 'REVOKE ALL ON FUNCTION "app"."Order Items_as_owner"(text) FROM PUBLIC'
    assert text(o.grant_execute_to_us(SIG)) == (
        'GRANT EXECUTE ON FUNCTION "app"."Order Items_as_owner"(text) TO CURRENT_USER')


def test_executor_pins_search_path_and_checks_current_user():
    assert text(o.executor_function(FN, "app's owner")) == '''\
CREATE OR REPLACE FUNCTION "app"."Order Items_as_owner"(q text) RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET row_security = off AS $orchestrate$
DECLARE n bigint;
BEGIN
  IF current_user OPERATOR(pg_catalog.<>) 'app''s owner'::pg_catalog.name THEN
    RAISE EXCEPTION 'orchestrate: % runs as %, not as the table owner', 'app."Order Items_as_owner"', current_user;
  END IF;
  EXECUTE q;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$orchestrate$'''
    assert text(o.call(FN)) == '"app"."Order Items_as_owner"(%s::text)'
    assert text(o.as_owner_sql(FN)) == 'SELECT "app"."Order Items_as_owner"(%s::text)'


def test_bindable_doubles_the_percent_of_names_and_literals_only():
    q = SQL("DELETE FROM {} WHERE {} = %s AND note LIKE 'x%%' AND tag = {}").format(
        Identifier("public", "100% orders"), Identifier("pct%"), Literal("5%"))
    assert text(o.bindable(q)) == (
        """DELETE FROM "public"."100%% orders" WHERE "pct%%" = %s AND note LIKE 'x%%' AND tag = '5%%'""")
    plain = SQL("SELECT {}").format(Identifier("t"))
    assert text(o.bindable(plain)) == text(plain)
