"""The `slow` list in conftest.py names real tests, and `-m "not slow"` leaves exactly those out."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import SLOW

TESTS = Path(__file__).resolve().parent


def test_every_slow_entry_names_a_real_test():
    for entry in SLOW:
        file, _, name = entry.partition("::")
        path = TESTS / file
        assert path.exists(), entry
        if name:
            tree = ast.parse(path.read_text())
            names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
            assert name in names, entry


def test_not_slow_deselects_the_slow_tests():
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider",
                          str(TESTS / "test_build.py"), str(TESTS / "test_markers.py")],
                         cwd=TESTS.parent, capture_output=True, text=True, timeout=120)
    selected = [line for line in run.stdout.splitlines() if "::" in line]
    assert selected == ["tests/test_build.py::test_a_module_is_reused_only_when_nothing_changed"], run.stdout
