"""The speed report (`convengine.bench`, behind `python -m convengine bench`) and the pytest-benchmark suite in
benchmarks/ keep working: the report's numbers are finite, positive and agree with each other, each section
follows the protocol of `convengine.bench.report`, and the suite runs once in smoke mode. No timing is judged."""
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import statistics
import types
import subprocess
import sys
from pathlib import Path

import pytest

import convengine
import numpy as np

from convengine.bench import cases, inference, report as bench_report, subnormal, training

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
        status = bench_report.main(["--quick", "--shapes", "tiny", "--repeat", "3", "--threads", "1",
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
    assert _positive(rep["peak_gflops"])
    rows = rep["sections"]["kernels"]["rows"]
    conv = [r for r in rows if r["op"] == "conv2d"]
    pools = [r for r in rows if r["op"] != "conv2d"]
    assert [(r["shape"], r["direction"]) for r in conv] == [
        (c.name, d) for c in cases.TINY_CONV_CASES for d in cases.CONV_DIRECTIONS]
    assert [(r["op"], r["shape"], r["direction"]) for r in pools] == [
        (c.op_name, c.name, d) for c in cases.TINY_POOL_CASES for d in cases.POOL_DIRECTIONS]
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
    rows = quick_report["json"]["sections"]["kernels"]["rows"]
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
    for case in cases.TINY_CONV_CASES:
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
    case = cases.TINY_CONV_CASES[1]
    macs = case.batch * case.out_channels * case.height * case.width * case.channels * 9
    assert case.flops("forward") == 2 * macs
    assert case.flops("backward") == 4 * macs


def test_report_summary_is_geomean_of_rows(quick_report):
    rep = quick_report["json"]
    rows, summary = rep["sections"]["kernels"]["rows"], rep["sections"]["kernels"]["summary"]
    for direction in cases.CONV_DIRECTIONS:
        ratios = [r["vs_reference"] for r in rows if r["op"] == "conv2d" and r["direction"] == direction
                  and r["vs_reference"]]
        expect = math.exp(sum(map(math.log, ratios)) / len(ratios))
        assert summary["conv"][direction]["vs_reference"] == pytest.approx(expect, rel=1e-9)
    comparisons = rep["comparisons"]
    assert comparisons["conv_forward_vs_torch"]["value"] == summary["conv"]["forward"]["vs_torch"]
    assert comparisons["pool_backward_vs_torch"]["value"] == summary["pool"]["backward"]["vs_torch"]
    pct = [r["pct_matmul"] for r in rows if r.get("pct_matmul") is not None]
    assert pct, "the tiny set has a compute-bound shape"
    for r in rows:
        if r.get("pct_matmul") is not None:
            assert r["compute_bound"]
            assert r["pct_matmul"] == pytest.approx(100 * r["engine_rate"] / rep["matmul_gflops"], rel=1e-9)
            assert r["pct_peak"] == pytest.approx(100 * r["engine_rate"] / rep["peak_gflops"], rel=1e-9)
        else:
            assert r.get("pct_peak") is None
    lowest = min(r["pct_matmul"] for r in rows if r.get("pct_matmul") is not None and r["direction"] != "backward")
    assert comparisons["compute_bound_min_pct_matmul"]["value"] == pytest.approx(lowest, rel=1e-12)
    lowest = min(r["pct_peak"] for r in rows if r.get("pct_peak") is not None and r["direction"] != "backward")
    assert comparisons["compute_bound_min_pct_peak"]["value"] == pytest.approx(lowest, rel=1e-12)
    forward = [r["pct_peak"] for r in rows if r.get("pct_peak") is not None and r["direction"] == "forward"]
    assert summary["conv"]["forward"]["pct_peak_min"] == pytest.approx(min(forward), rel=1e-12)


def _printed_rows(text):
    """The table lines: op shape direction ref_ms engine_ms torch_ms engine_rate torch_rate x_ref x_torch %matmul
    %peak."""
    out = []
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 12 and cells[0] in ("conv2d", "max_pool2d", "avg_pool2d") and cells[2] in (
                cases.CONV_DIRECTIONS + cases.POOL_DIRECTIONS):
            out.append([cells[0], cells[1], cells[2]] + [None if c == "-" else float(c) for c in cells[3:]])
    return out


def test_printed_table_matches_report(quick_report):
    printed = _printed_rows(quick_report["printed"])
    rows = quick_report["json"]["sections"]["kernels"]["rows"]
    assert len(printed) == len(rows)
    for p, r in zip(printed, rows):
        op, shape, direction, ref_ms, eng_ms, torch_ms, eng_rate, _, x_ref, x_torch, _, pct_peak = p
        if pct_peak is not None:
            assert pct_peak == pytest.approx(r["pct_peak"], abs=0.5)
        assert (op, shape, direction) == (r["op"], r["shape"], r["direction"])
        if eng_ms is not None:
            assert eng_ms == pytest.approx(r["ms"]["engine"], rel=1e-3)
        # The printed speedups agree with the printed times, to the rounding of 4 and 3 significant digits.
        if x_ref is not None:
            assert x_ref == pytest.approx(ref_ms / eng_ms, rel=1e-2)
        if x_torch is not None:
            assert x_torch == pytest.approx(torch_ms / eng_ms, rel=1e-2)
    assert re.search(r"float32 matmul .* share of [0-9.]+ GFLOP/s", quick_report["printed"])
    assert re.search(r"multiply-add peak of this build \(\w+\) at 1 threads: [0-9.]+ GFLOP/s",
                     quick_report["printed"])


def test_summary_states_comparisons_without_pass_marks(quick_report):
    """The closing lines name each comparison for what it is and print its value, nothing more."""
    printed = quick_report["printed"]
    rep = quick_report["json"]
    block = printed[printed.index("\ncomparisons ("):].splitlines()
    for c in rep["comparisons"].values():
        line = next(line for line in block if line.strip().startswith(c["label"]))
        value = line[len(line.rstrip()) - 8:].strip()
        if c["value"] is None:
            assert value == "-"
        elif c["unit"] == "%":
            assert value == f"{c['value']:.0f}%"
        else:
            assert value == f"{c['value']:.3g}x"
    for word in ("issue", "target", "met", ">="):
        assert word not in " ".join(block).lower().split(), word
    # --quick leaves the thread-scaling and training sections out, and says so.
    assert set(rep["skipped"]) == {"scaling", "training"}
    assert f"{training.TITLE}: not run" in printed


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
    assert bench_report.plot(quick_report["json"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--repeat", "0"], ["--shapes", "huge"]])
def test_bad_options_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_report.main(argv)
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


def _tiny_run(argv, sections=None, monkeypatch=None):
    """A tiny report's JSON and printed text (the pools and convs of the tiny set at one thread)."""
    if sections is not None:
        monkeypatch.setattr(bench_report, "SECTIONS", sections)
    opts = bench_report.parse_args(["--shapes", "tiny", "--repeat", "1", "--threads", "1", *argv])
    out = io.StringIO()
    return bench_report.run(opts, out), out.getvalue()


def test_without_pytorch_the_report_and_chart_say_so(tmp_path):
    """--no-torch stands for a machine without PyTorch: no torch column has a value, the vs-PyTorch comparisons
    are empty, and the report and the chart say why instead of showing an unexplained empty panel."""
    path = tmp_path / "chart.png"
    rep, printed = _tiny_run(["--no-torch", "--plot", str(path)])
    assert rep["impls"] == ["reference", "engine"]
    assert rep["torch_note"] == bench_report.TORCH_LEFT_OUT
    assert printed.count(bench_report.TORCH_LEFT_OUT) == 2  # under the header and under the comparisons
    for r in rep["sections"]["kernels"]["rows"]:
        assert "torch" not in r["ms"] and r["vs_torch"] is None
    vs_torch = [c for c in rep["comparisons"].values() if "PyTorch" in c["label"]]
    assert vs_torch and all(c["value"] is None for c in vs_torch)
    assert bench_report.torch_note(("reference", "engine"), bench_report.parse_args([])) == bench_report.TORCH_MISSING
    if importlib.util.find_spec("matplotlib") is not None:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_new_section_is_one_module(monkeypatch):
    """A module following the section protocol, added to SECTIONS, is measured, summarised and compared, and a
    section that fails is reported without losing the others."""
    calls = []
    extra = types.ModuleType("extra")
    extra.NAME, extra.TITLE = "extra", "an extra section"
    extra.wanted = lambda ctx: True
    extra.measure = lambda ctx: calls.append(ctx.threads) or {"value": 2.5}
    extra.summary = lambda result, ctx: [f"extra summary {result['value']}"]
    extra.comparisons = lambda result: [dict(key="extra_x", label="extra, speedup vs nothing",
                                             value=result["value"], unit="x")]
    broken = types.ModuleType("broken")
    broken.NAME, broken.TITLE = "broken", "a broken section"
    broken.wanted = lambda ctx: True
    broken.measure = lambda ctx: 1 / 0
    off = types.ModuleType("off")
    off.NAME, off.TITLE = "off", "a section left out"
    off.wanted = lambda ctx: "not today"
    from convengine.bench import kernels
    rep, printed = _tiny_run([], [kernels, extra, broken, off], monkeypatch)
    assert calls == [1]
    assert rep["sections"]["extra"] == {"value": 2.5}
    assert rep["sections"]["broken"]["error"].startswith("ZeroDivisionError")
    assert rep["skipped"] == {"off": "not today"}
    assert rep["comparisons"]["extra_x"]["value"] == 2.5
    assert "extra summary 2.5" in printed and "a section left out: not run, not today" in printed
    assert re.search(r"extra, speedup vs nothing +2\.5x", printed)


def test_the_multiply_add_peak_probe():
    """engine.fma_peak_gflops runs its chains on every thread asked for and reports a finite rate; timing's
    fma_peak_gflops takes it at the thread count in force; bad arguments are refused."""
    from convengine._kernels import engine
    from convengine.bench.timing import SameThreads, fma_peak_gflops
    for n in (1, 2, 3):
        assert _positive(engine.fma_peak_gflops(n, 1000))
    with SameThreads(2):
        assert _positive(fma_peak_gflops(repeat=2))
    for bad in ((0, 1000), (1, 0), (65, 1000)):
        with pytest.raises(ValueError, match="fma_peak_gflops"):
            engine.fma_peak_gflops(*bad)


def test_training_section_ships_in_the_package():
    """The training comparison lives in the package (the installed CLI has it) and times real epochs."""
    assert Path(training.__file__).resolve().parent == Path(bench_report.__file__).resolve().parent
    result = training.epoch_seconds(1, repeats=1, images=64, use_torch=False)
    assert _positive(result["engine_s"]) and result["torch_s"] is None and result["speedup"] is None
    assert result["images"] == 64 and result["threads"] == 1
    assert training.summary(result, None) == [
        f"training, default digits net, median s/epoch: engine {result['engine_s']:.4g}, PyTorch -, x_torch -"]


def test_training_steps_of_the_three_nets():
    """One timed step per net at batch 4: rows whose rates follow from the times and the step's FLOPs; the step
    really trains (the weights move)."""
    rows = training.step_rows(1, repeats=1, batch=4, use_torch=False, matmul_rate=100.0, peak_rate=50.0)
    assert [r["net"] for r in rows] == list(training.STEP_NETS)
    for r in rows:
        model = training.inference.build(r["net"])
        assert r["gflops"] == pytest.approx(training.step_flops(model, 4) / (r["engine_ms"] * 1e6))
        assert r["matmul_pct"] == pytest.approx(r["gflops"]) and r["peak_pct"] == pytest.approx(2 * r["gflops"])
        assert r["images_per_s"] == pytest.approx(4e3 / r["engine_ms"]) and r["torch_ms"] is None
        assert r["memory_mb"] == model.training_memory_bytes(4) / 1e6
        # the opt-in Winograd step is timed for the nets it takes convs of, and has no ratio without PyTorch
        assert (r["wino_ms"] is not None and r["wino_ms"] > 0) == (r["net"] in training.inference.WINOGRAD_NETS)
        assert r["wino_ratio"] is None
    # cifar per image: convs 3->32 (32x32), 32->64 (16x16), 64->128 (8x8), linear 128->10; no input gradient for
    # the first conv
    forward = 2 * (3 * 32 * 9 * 1024 + 32 * 64 * 9 * 256 + 64 * 128 * 9 * 64 + 128 * 10)
    assert training.step_flops(training.inference.build("cifar"), 1) == 3 * forward - 2 * 3 * 32 * 9 * 1024
    run, model = training.engine_step("lenet5", batch=4)
    before = [p.data.copy() for p in model.parameters()]
    run()
    assert all(not np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))
    summary = training.summary({"engine_s": 1.0, "torch_s": None, "speedup": None, "steps": rows}, None)
    assert summary[1].startswith("training steps at 1 thread(s), engine/PyTorch step time: cifar -")
    cifar = rows[0]
    assert summary[2] == (f"  winograd=True (cifar): step time / default cifar "
                          f"{cifar['wino_ms'] / cifar['engine_ms']:.3g}, / PyTorch cifar -")
    # the VGG-style net's row (EXTRA_STEP_NETS) is reported outside the geometric mean of the three nets
    timed = [dict(r, torch_ms=2 * r["engine_ms"], ratio=0.5, wino_ratio=None) for r in rows]
    vgg = dict(timed[0], net="vgg", ratio=0.9, wino_ms=1.0, engine_ms=2.0, wino_ratio=0.45)
    lines = training.summary({"engine_s": 1.0, "torch_s": None, "speedup": None, "steps": timed + [vgg]}, None)
    assert "(geomean 0.5)" in lines[1] and lines[2] == "  also vgg 0.9 (outside the geomean)"
    assert lines[3].endswith("vgg 0.5, / PyTorch cifar -, vgg 0.45")
    assert training.comparisons({"speedup": None, "steps": timed + [vgg]})[1]["value"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------------------------
# The inference and subnormal sections (both run in the quick tiny report above)
# ---------------------------------------------------------------------------------------------------------------

def test_inference_section_rows_follow_from_times(quick_report):
    """Every net at both tiny batch sizes at the run's thread count; each implementation in the run agreed with
    the engine's op-by-op forward before it was timed; ratios, rates and shares follow from the times."""
    rep = quick_report["json"]
    result = rep["sections"]["inference"]
    rows = result["rows"]
    assert [(r["net"], r["batch"], r["threads"]) for r in rows] == [
        (n, b, 1) for n in inference.NETS for b in inference.TINY_BATCHES]
    ort_in_run = inference.ort_module()[0] is not None
    torch_in_run = "torch" in rep["impls"]
    for r in rows:
        assert r["agree"] and all(e <= inference.AGREEMENT for e in r["max_rel_err"].values()), r
        for impl in inference.IMPLS:
            present = impl in ("frozen", "predict") or (impl == "torch" and torch_in_run) or (
                impl == "ort" and ort_in_run) or (impl == "winograd" and r["net"] in inference.WINOGRAD_NETS)
            ms = r["ms"][impl]
            assert _positive(ms) if present else ms is None, (impl, ms)
            if present:
                assert r["rate"][impl] == pytest.approx(r["gflop"] / (ms / 1e3), rel=1e-9)
                assert r["pct_matmul"][impl] == pytest.approx(100 * r["rate"][impl] / rep["matmul_gflops"],
                                                              rel=1e-9)
        for key, mine, other in (("frozen_vs_ort", "frozen", "ort"), ("frozen_vs_torch", "frozen", "torch"),
                                 ("winograd_vs_ort", "winograd", "ort"), ("winograd_vs_torch", "winograd", "torch")):
            expect = None if r["ms"][other] is None or r["ms"][mine] is None else r["ms"][mine] / r["ms"][other]
            assert r[key] == (None if expect is None else pytest.approx(expect, rel=1e-12))
        assert r["gflop"] == pytest.approx(inference.flops(inference.build(r["net"])) * r["batch"] / 1e9)
        assert _positive(r["memory_mb"])
    printed = quick_report["printed"]
    if not ort_in_run:
        assert inference.ORT_MISSING in printed or inference.ONNX_MISSING in printed
    geo = result["summary"]["1"]["frozen_vs_torch"]["geomean"]
    if torch_in_run:
        ratios = [r["frozen_vs_torch"] for r in rows]
        assert geo == pytest.approx(math.exp(statistics.fmean(map(math.log, ratios))), rel=1e-9)
        assert rep["comparisons"]["inference_vs_torch"]["value"] == pytest.approx(1 / geo, rel=1e-12)
        assert rep["comparisons"]["inference_vs_torch_worst"]["value"] == pytest.approx(1 / max(ratios), rel=1e-12)
    else:
        assert geo is None and rep["comparisons"]["inference_vs_torch"]["value"] is None


def test_inference_flops_count_the_gemm_work():
    """lenet5 by hand: conv 3->6 5x5 to 28x28, conv 6->16 5x5 to 10x10, then 400x120, 120x84, 84x10."""
    expect = 2 * (28 * 28 * 6 * 3 * 25 + 10 * 10 * 16 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10)
    assert inference.flops(inference.build("lenet5")) == expect


def test_inference_torch_copy_computes_the_same(monkeypatch):
    """The PyTorch twin gets the engine's weights and batch norm statistics layer for layer (folding changes
    the rounding only), and an unknown layer is refused by name."""
    torch = pytest.importorskip("torch")
    model = inference.build("separable", seed=3)
    x = np.random.default_rng(1).standard_normal((3,) + inference.INPUT_SHAPE, dtype=np.float32)
    with torch.inference_mode():
        got = inference.to_torch(model, torch)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, model.forward(x), rtol=1e-4, atol=1e-5)
    from convengine.layers import Tanh
    from convengine.model import Sequential
    with pytest.raises(ValueError, match="Tanh"):
        inference.to_torch(Sequential([Tanh()]), torch)


def test_inference_without_onnx_runtime_says_so(monkeypatch):
    """A machine without ONNX Runtime: the ort columns are empty, the comparisons with it too, and the report
    says why (under the section's header and in its summary)."""
    monkeypatch.setattr(inference, "ort_module", lambda: (None, inference.ORT_MISSING))
    rep, printed = _tiny_run(["--no-torch", "--section", "inference"])
    rows = rep["sections"]["inference"]["rows"]
    assert rows and all(r["ms"]["ort"] is None and r["frozen_vs_ort"] is None for r in rows)
    assert all(r["ms"]["torch"] is None for r in rows)
    assert rep["comparisons"]["inference_vs_ort"]["value"] is None
    assert printed.count(inference.ORT_MISSING) == 2
    assert set(rep["skipped"]) == {"kernels", "scaling", "training", "subnormal"}


def test_with_subnormals_replaces_the_given_share():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 100), dtype=np.float32)
    tiny = np.finfo(np.float32).tiny
    for fraction, count in ((0.0, 0), (0.01, 10), (1.0, 1000)):
        y = subnormal.with_subnormals(x, fraction, rng)
        sub = (np.abs(y) < tiny) & (y != 0)
        assert sub.sum() == count and y.dtype == np.float32
        assert np.array_equal(y[~sub], x[~sub])
    assert x.min() < -1 and np.all(np.abs(x[np.abs(x) > 0]) > tiny)   # the input is untouched


def test_subnormal_section_rows_follow_from_times(quick_report):
    result = quick_report["json"]["sections"]["subnormal"]
    rows = result["rows"]
    ops = ["conv2d forward", "conv2d backward", "max_pool2d forward", "avg_pool2d forward", "relu forward",
           "batch_norm2d forward", "batch_norm2d backward", "linear forward", "training step"]
    assert [(r["op"], r["flush"]) for r in rows] == [(op, flag) for op in ops for flag in (True, False)]
    for r in rows:
        assert _positive(r["ms"]["normal"])
        expected = ("100%",) if r["op"] == "training step" else ("1%", "100%")
        for v in expected:
            assert _positive(r["ms"][v])
            assert r["vs_normal"][v] == pytest.approx(r["ms"][v] / r["ms"]["normal"], rel=1e-12)
        has_products = r["op"] in ("conv2d forward", "linear forward")
        assert (r["ms"]["products"] is not None) == has_products
    on = result["summary"]["on"]
    worst = max(v for r in rows if r["flush"] and r["op"] != "training step" for v in r["vs_normal"].values()
                if v is not None)
    assert on["worst"] == pytest.approx(worst, rel=1e-12)
    assert quick_report["json"]["comparisons"]["subnormal_worst_flush_on"]["value"] == on["worst"]
    # the section sets the flag per call and leaves the user's setting as it was
    assert convengine.get_flush_denormal() is True


def test_subnormal_training_step_really_is_subnormal():
    """The scaled step's weights and data are all subnormal (or zero) while the normal step's are normal, and the
    step runs with flushing on and off, leaving the caller's setting as it was."""
    tiny = np.finfo(np.float32).tiny
    scaled = subnormal.training_step((4, 3, 8, 8), subnormal.TRAIN_SCALE)
    normal = subnormal.training_step((4, 3, 8, 8), np.float32(1))
    for step, below in ((scaled, True), (normal, False)):
        arrays = [p.data for p in step.model.parameters()] + [step.x]
        values = np.concatenate([a.reshape(-1) for a in arrays])
        assert np.all((np.abs(values) < tiny) == below)
    before = convengine.get_flush_denormal()
    try:
        for flag in (False, True):
            convengine.set_flush_denormal(flag)
            scaled()
            assert convengine.get_flush_denormal() is flag
    finally:
        convengine.set_flush_denormal(before)


def test_time_interleaved_takes_turns_in_rounds(monkeypatch):
    """rounds=3 cuts each implementation's repeats into three turns, each after a park and one untimed call, so a
    slow spell of the machine falls on every implementation; every repeat is timed once."""
    from convengine.bench import timing
    log, parks = [], []
    monkeypatch.setattr(timing.time, "sleep", parks.append)
    calls = {"a": lambda: log.append("a"), ("b", 1): lambda: log.append("b1"), ("b", 2): lambda: log.append("b2")}
    times = timing.time_interleaved(calls, {"a": 6, ("b", 1): 6, ("b", 2): 3}, warmup=2, park=0.5, rounds=3, warm=0)
    assert {name: len(t) for name, t in times.items()} == {"a": 6, ("b", 1): 6, ("b", 2): 3}
    assert parks == [0.5] * 6
    runs = [name for i, name in enumerate(log) if i == 0 or log[i - 1][0] != name[0]]
    assert [r[0] for r in runs] == ["a", "b"] * 3                     # three turns each, alternating
    assert log.count("a") == 2 + 6 + 2 and log.count("b2") == 2 + 3 + 2
    one = timing.time_interleaved(calls, {"a": 6, ("b", 1): 6, ("b", 2): 3}, warmup=1, park=0)
    assert {name: len(t) for name, t in one.items()} == {"a": 6, ("b", 1): 6, ("b", 2): 3}


def test_time_interleaved_warms_up_after_each_park(monkeypatch):
    """After a park the cores wake slowly, so each turn first runs its calls untimed for `warm` seconds (by
    default after parks of 0.1 s and more); a 2 ms call with warm=0.02 runs about ten times more per turn. The
    clock is the test's own, 2 ms a call: a real busy wait counted calls against wall time, and a loaded machine
    that preempted the test fitted fewer into the 20 ms (18 calls, not 27, with both cores busy)."""
    from convengine.bench import timing
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    counts = {"a": 0, "b": 0}

    def call(name):
        counts[name] += 1
        clock[0] += 0.002
    calls = {"a": lambda: call("a"), "b": lambda: call("b")}
    times = timing.time_interleaved(calls, {"a": 3, "b": 3}, warmup=1, park=0.5, rounds=3, warm=0.02)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    assert counts["a"] >= 3 + 3 * 8 and counts["b"] >= 3 + 3 * 8
    counts.update(a=0, b=0)
    timing.time_interleaved(calls, {"a": 3, "b": 3}, warmup=1, park=0.01, rounds=3)   # short park: no warm-up
    assert counts == {"a": 6, "b": 6}
