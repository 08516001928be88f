"""fidelity's statements, rendered without a server: the twin's copies of the table's constraints."""

import pytest

from orchestrator.sql import QualifiedName
from orchestrator.sql import fidelity as f
from orchestrator.sql.compose import text

TWIN = QualifiedName("app", "Order Items_partitioned")
QT = '"app"."Order Items_partitioned"'


def test_catalog_reads():
    assert text(f.DEFERRABLE_PRIMARY_KEY) == (
        "SELECT conname FROM pg_constraint WHERE conrelid = %s AND contype = 'p' AND condeferrable")
    for q, t in ((f.NOT_VALID_CHECKS_MISSING, "c"), (f.NOT_VALID_FKS_MISSING, "f")):
        assert text(q) == (
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
            f"AND contype = '{t}' AND NOT convalidated AND conname NOT IN "
            f"(SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = '{t}') ORDER BY 1")
    assert text(f.DEFERRABLE_UNIQUES) == (
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s AND contype = 'u' AND condeferrable")
    assert "WHERE prrelid = %s) ORDER BY 1" in text(f.PUBLICATIONS_OF)
    assert text(f.SCHEMA_PUBLICATIONS_OF).endswith("JOIN pg_class c ON c.relnamespace = pn.pnnspid AND c.oid = %s "
                                                   "ORDER BY 1")


def test_constraints_on_the_twin():
    assert text(f.drop_constraint(TWIN, "Qty Positive")) == f'ALTER TABLE {QT} DROP CONSTRAINT "Qty Positive"'
    assert text(f.add_constraint(TWIN, "Qty Positive", "CHECK ((qty > 0)) NOT VALID")) == (
        f'ALTER TABLE {QT} ADD CONSTRAINT "Qty Positive" CHECK ((qty > 0)) NOT VALID')


@pytest.mark.parametrize("add_key, cols", [(None, '"Slot", line'), ("Created At", '"Slot", line, "Created At"')])
def test_deferrable_unique_keeps_its_properties_and_takes_the_key(add_key, cols):
    definition = 'UNIQUE ("Slot", line) DEFERRABLE INITIALLY DEFERRED'
    assert text(f.unique_constraint(TWIN, "Order Items_slot_key_twin", definition, add_key)) == (
        f'ALTER TABLE {QT} ADD CONSTRAINT "Order Items_slot_key_twin" UNIQUE ({cols}) DEFERRABLE INITIALLY DEFERRED')
