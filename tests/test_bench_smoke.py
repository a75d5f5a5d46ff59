"""The speed report (`convengine._bench`, behind `python -m convengine bench`) and the pytest-benchmark suite in
benchmarks/ keep working: the report's numbers are finite, positive and agree with each other, and the suite runs
once in smoke mode. No timing is judged here; speed targets live in the report itself."""
import contextlib
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import convengine
from convengine import _bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One quick report on the tiny shapes, shared by the tests below (module scope: capsys is not available,
    and the report prints to sys.stdout as it is at call time)."""
    folder = tmp_path_factory.mktemp("bench")
    path, md = folder / "report.json", folder / "report.md"
    threads_before = convengine.get_num_threads()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = _bench.main(["--quick", "--shapes", "tiny", "--repeat", "3", "--threads", "1",
                              "--json", str(path), "--markdown", str(md)])
    return {"status": status, "json": json.loads(path.read_text()), "printed": buf.getvalue(),
            "markdown": md.read_text(), "threads_before": threads_before}


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_report_rows_finite_positive_and_complete(quick_report):
    rep = quick_report["json"]
    assert quick_report["status"] == 0
    assert rep["threads"] == 1
    assert all(_positive(v) for v in rep["matmul_by_library"].values())
    assert rep["matmul_gflops"] == max(rep["matmul_by_library"].values())
    rows = rep["rows"]
    conv = [r for r in rows if r["op"] == "conv2d"]
    pools = [r for r in rows if r["op"] != "conv2d"]
    assert [(r["shape"], r["direction"]) for r in conv] == [
        (c.name, d) for c in _bench.TINY_CONV_CASES for d in _bench.CONV_DIRECTIONS]
    assert [(r["op"], r["shape"], r["direction"]) for r in pools] == [
        (c.op_name, c.name, d) for c in _bench.TINY_POOL_CASES for d in _bench.POOL_DIRECTIONS]
    for r in rows:
        assert set(r["ms"]) == set(rep["impls"])
        for impl, ms in r["ms"].items():
            if r["direction"] == "grad_input" and ms is None:
                continue  # backward - grad_weight lost in noise; checked below
            assert _positive(ms), (r["shape"], r["direction"], impl, ms)
            assert _positive(r["rate"][impl])
            assert r["rate"][impl] == pytest.approx(r["work"] / (ms / 1e3), rel=1e-9)
        assert _positive(r["work"])


def test_report_ratios_follow_from_times(quick_report):
    rows = quick_report["json"]["rows"]
    for r in rows:
        ms = r["ms"]
        for impl, key in (("reference", "vs_reference"), ("torch", "vs_torch")):
            if ms.get(impl) is None or ms["engine"] is None:
                assert r[key] is None
            else:
                assert r[key] == pytest.approx(ms[impl] / ms["engine"], rel=1e-9), (r["shape"], r["direction"])
    # Each median is that of its samples; grad_input is the median of the round-by-round backward - grad_weight.
    by = {(r["shape"], r["direction"]): r for r in rows if r["op"] == "conv2d"}
    for r in rows:
        if r["direction"] != "grad_input":
            for impl, ms in r["ms"].items():
                assert ms == pytest.approx(statistics.median(r["samples_ms"][impl]), rel=1e-9)
    for case in _bench.TINY_CONV_CASES:
        gi = by[(case.name, "grad_input")]
        for impl in gi["ms"]:
            back = by[(case.name, "backward")]["samples_ms"][impl]
            part = by[(case.name, "grad_weight")]["samples_ms"][impl]
            assert len(back) == len(part) == len(gi["samples_ms"][impl]) > 0
            diff = statistics.median(b - w for b, w in zip(back, part))
            if diff > 0:
                assert gi["ms"][impl] == pytest.approx(diff, rel=1e-9)
            else:
                assert gi["ms"][impl] is None
    # GFLOP per call: the forward's multiply-adds twice, backward counting grad_input and grad_weight.
    case = _bench.TINY_CONV_CASES[1]
    macs = case.batch * case.out_channels * case.height * case.width * case.channels * 9
    assert case.flops("forward") == 2 * macs
    assert case.flops("backward") == 4 * macs


def test_report_summary_is_geomean_of_rows(quick_report):
    rep = quick_report["json"]
    rows, summary = rep["rows"], rep["summary"]
    for direction in _bench.CONV_DIRECTIONS:
        ratios = [r["vs_reference"] for r in rows if r["op"] == "conv2d" and r["direction"] == direction
                  and r["vs_reference"]]
        expect = math.exp(sum(map(math.log, ratios)) / len(ratios))
        assert summary["conv"][direction]["vs_reference"] == pytest.approx(expect, rel=1e-9)
    assert summary["targets"]["conv_forward_vs_torch"] == summary["conv"]["forward"]["vs_torch"]
    pct = [r["pct_peak"] for r in rows if r.get("pct_peak") is not None]
    assert pct, "the tiny set has a compute-bound shape"
    for r in rows:
        if r.get("pct_peak") is not None:
            assert r["compute_bound"]
            assert r["pct_peak"] == pytest.approx(100 * r["engine_rate"] / rep["matmul_gflops"], rel=1e-9)


def _printed_rows(text):
    """The table lines: op shape direction ref_ms engine_ms torch_ms engine_rate torch_rate x_ref x_torch %peak."""
    out = []
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 11 and cells[0] in ("conv2d", "max_pool2d", "avg_pool2d") and cells[2] in (
                _bench.CONV_DIRECTIONS + _bench.POOL_DIRECTIONS):
            out.append([cells[0], cells[1], cells[2]] + [None if c == "-" else float(c) for c in cells[3:]])
    return out


def test_printed_table_matches_report(quick_report):
    printed = _printed_rows(quick_report["printed"])
    rows = quick_report["json"]["rows"]
    assert len(printed) == len(rows)
    for p, r in zip(printed, rows):
        op, shape, direction, ref_ms, eng_ms, torch_ms, eng_rate, _, x_ref, x_torch, _ = p
        assert (op, shape, direction) == (r["op"], r["shape"], r["direction"])
        if eng_ms is not None:
            assert eng_ms == pytest.approx(r["ms"]["engine"], rel=1e-3)
        # The printed speedups agree with the printed times, to the rounding of 4 and 3 significant digits.
        if x_ref is not None:
            assert x_ref == pytest.approx(ref_ms / eng_ms, rel=1e-2)
        if x_torch is not None:
            assert x_torch == pytest.approx(torch_ms / eng_ms, rel=1e-2)
    assert re.search(r"float32 matmul .*peak yardstick [0-9.]+ GFLOP/s", quick_report["printed"])
    assert "issue 4 targets" in quick_report["printed"]


def test_markdown_holds_machine_and_table(quick_report):
    md = quick_report["markdown"]
    assert "## Machine" in md and '"simd"' in md
    assert "python -m convengine bench --quick --shapes tiny" in md
    table = [line for line in quick_report["printed"].splitlines() if line.startswith("conv2d ")]
    assert table and all(line in md.splitlines() for line in table)


def test_report_restores_thread_count(quick_report):
    assert convengine.get_num_threads() == quick_report["threads_before"]


def test_plot_writes_png(quick_report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert _bench.plot(quick_report["json"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--repeat", "0"], ["--shapes", "huge"]])
def test_bad_options_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _bench.main(argv)
    assert e.value.code == 2


def test_benchmark_suite_smoke():
    """`pytest benchmarks/ --benchmark-disable` on tiny shapes: every benchmark runs its call once."""
    pytest.importorskip("pytest_benchmark")
    if not (ROOT / "benchmarks" / "conftest.py").exists():
        pytest.skip("benchmarks/ is not beside the tests (installed package)")
    env = dict(os.environ, CONVENGINE_BENCH_SMOKE="1")
    package_parent = str(Path(convengine.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b\d+ passed", proc.stdout)
    assert "failed" not in proc.stdout.splitlines()[-1]
