"""The closing section of a test run names what skipped tests need and the command that runs them
(tests/skip_summary.py, hooked in by conftest.py)."""
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import skip_summary

TESTS = Path(__file__).resolve().parent


def _skipped(reason):
    return types.SimpleNamespace(longrepr=("test_x.py", 3, f"Skipped: {reason}"))


def test_groups_by_what_is_missing_biggest_first():
    reports = ([_skipped("could not import 'torch': No module named 'torch'")] * 3
               + [_skipped("could not import 'matplotlib.pyplot': No module named 'matplotlib'")]
               + [_skipped("allocates a 9 GB image; set CONVENGINE_BIG_TESTS=1 to run")]
               + [_skipped("could not import 'leftpad': No module named 'leftpad'")] * 2
               + [_skipped("no mpiexec on PATH")])
    lines = skip_summary.summary_lines(reports)
    assert lines[0] == "3 tests need PyTorch 2.13.0, the reference's second oracle and the benchmarks' yardstick: " \
                       "pip install -e '.[test,oracle]'"
    assert lines[1] == "2 tests need the package 'leftpad': pip install leftpad"
    assert "1 test needs matplotlib (plots): pip install -e '.[plot]'" in lines
    assert "1 test skipped (no mpiexec on PATH)" in lines
    assert ("1 test skipped (allocates a 9 GB image; set CONVENGINE_BIG_TESTS=1 to run): "
            "CONVENGINE_BIG_TESTS=1 python -m pytest tests/test_sizes.py") in lines
    assert len(lines) == 5


def test_a_run_ends_with_the_summary(tmp_path):
    """A real pytest run with the plugin: PyTorch hidden, so its importorskip skips; the section comes last."""
    (tmp_path / "test_fake.py").write_text(textwrap.dedent("""
        import sys
        import pytest

        sys.modules["torch"] = None  # as if PyTorch were not installed

        @pytest.mark.parametrize("i", range(4))
        def test_needs_torch(i):
            pytest.importorskip("torch")

        def test_runs():
            pass
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_summary", "-p", "no:cacheprovider", "-q",
                           str(tmp_path / "test_fake.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "1 passed, 4 skipped" in out
    section = out[out.index("skipped tests: what they need"):]
    assert "4 tests need PyTorch 2.13.0" in section and "pip install -e '.[test,oracle]'" in section
