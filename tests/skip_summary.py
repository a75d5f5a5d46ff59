"""A closing section of the test run that says what was skipped, why, and the one command that runs it.

Most skips are optional packages: PyTorch (the reference's second oracle), matplotlib, ONNX, MPI. pytest's own
`-ra` lines list every skipped test; this groups them, so that "1,045 skipped" reads as "1,045 tests need
PyTorch: pip install -e '.[test,oracle]'". tests/conftest.py hooks it in (`pytest_terminal_summary`).
"""
import re

# Top-level module of a failed importorskip -> (what it is, the command that installs it).
NEEDS = {
    "torch": ("PyTorch 2.13.0, the reference's second oracle and the benchmarks' yardstick",
              "pip install -e '.[test,oracle]'"),
    "matplotlib": ("matplotlib (plots)", "pip install -e '.[plot]'"),
    "onnx": ("onnx (model export)", "pip install -e '.[onnx]' onnxruntime onnxscript"),
    "onnxruntime": ("ONNX Runtime (runs the exported models)", "pip install onnxruntime onnxscript"),
    "onnxscript": ("onnxscript (PyTorch's ONNX exporter)", "pip install onnxscript"),
    "mpi4py": ("mpi4py and an MPI (data-parallel training)", "pip install -e '.[mpi]'"),
    "sklearn": ("scikit-learn (its copy of the digits, compared with the embedded one)", "pip install scikit-learn"),
    "pytest_benchmark": ("pytest-benchmark (the benchmark suite)", "pip install -e '.[bench]'"),
}
# Skips whose reason names an environment switch: pattern -> the command.
SWITCHES = {
    "CONVENGINE_BIG_TESTS": "CONVENGINE_BIG_TESTS=1 python -m pytest tests/test_sizes.py",
}
_IMPORT = re.compile(r"could not import '([\w.]+)'")


def skip_reason(report):
    """The reason text of a skipped test's report ("" when pytest gave none)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr or "")
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def group(reason):
    """(what the tests lack, the command that runs them or None) for one skip reason."""
    m = _IMPORT.search(reason)
    if m:
        module = m.group(1).split(".")[0]
        what, command = NEEDS.get(module, (f"the package {module!r}", f"pip install {module}"))
        return (f"need {what}", command)
    for switch, command in SWITCHES.items():
        if switch in reason:
            return (f"skipped ({reason})", command)
    return (f"skipped ({reason})", None)


def summary_lines(reports):
    """One line per group of skipped tests, the biggest group first."""
    counts = {}
    for report in reports:
        key = group(skip_reason(report))
        counts[key] = counts.get(key, 0) + 1
    width = len(str(max(counts.values()))) if counts else 1
    lines = []
    for (what, command), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0])):
        tests = "test" if n == 1 else "tests"
        if n == 1 and what.startswith("need "):
            what = "needs " + what[len("need "):]
        lines.append(f"{n:>{width}} {tests} {what}" + (f": {command}" if command else ""))
    return lines


def pytest_terminal_summary(terminalreporter):
    reports = [r for r in terminalreporter.stats.get("skipped", []) if getattr(r, "longrepr", None) is not None]
    if not reports:
        return
    terminalreporter.section("skipped tests: what they need")
    for line in summary_lines(reports):
        terminalreporter.write_line(line)
