"""How the tests are kept: shared helpers come from tests/support, never from a conftest
or another test module (whose fixtures and side effects would come along)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

TESTS = Path(__file__).parent


def imported_test_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            last = name.rsplit(".", 1)[-1]
            if name.startswith("tests.") and (last == "conftest" or last.startswith("test_")):
                found.append(name)
    return found


def test_no_test_imports_a_conftest_or_another_test_module():
    offenders = {
        str(path.relative_to(TESTS)): modules
        for path in sorted(TESTS.rglob("*.py"))
        if (modules := imported_test_modules(path))
    }
    assert offenders == {}, "move what they share to tests/support"


def test_the_check_sees_such_imports(tmp_path):
    module = tmp_path / "test_x.py"
    module.write_text("from tests.conftest import SECRETS\nimport tests.api.test_auth\n")
    assert imported_test_modules(module) == ["tests.conftest", "tests.api.test_auth"]
