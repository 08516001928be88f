"""The engine runs no SQL text of its own: every statement it executes is rendered by the SQL
package (orchestrator/sql/) or the state store (orchestrator/state/store.py, whose statements
are the state schema's). Checked on the source: an ``execute`` whose statement is written
in place (a string, an f-string, a % or + expression) fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"
EXEMPT = {"sql", "lab", "cli", "state"}  # the SQL package, the harness, the command line, the store


def _written_in_place(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return _written_in_place(node.left) or _written_in_place(node.right)
    return False


def _engine_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in EXEMPT)


def test_every_executed_statement_comes_from_the_sql_package():
    found = []
    for path in _engine_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("execute", "executemany") and node.args
                    and _written_in_place(node.args[0])):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, f"SQL written in place, not by orchestrator/sql/: {found}"


def test_the_check_sees_a_statement_written_in_place():
    tree = ast.parse('conn.execute(f"SELECT {x}")\ncur.execute("SET a = 1")\nconn.execute(q.render())')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "execute"]
    assert [_written_in_place(c.args[0]) for c in calls] == [True, True, False]
