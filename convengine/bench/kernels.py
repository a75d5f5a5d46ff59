"""Report section: conv2d and pooling, per shape and direction, the engine against the NumPy reference and
PyTorch (when installed).

Per row: the median time of each implementation, the rate (conv2d: GFLOP/s; pools: GB/s of the least memory
traffic), the engine's speedup over the reference and over PyTorch, and, on compute-bound conv shapes, the
engine's rate as a percentage of the machine's float32 matmul rate and of the build's multiply-add peak (a library's
matmul can be well below that peak: timing.fma_peak_gflops). Each implementation's calls of one shape are
interleaved in rotating order (all directions in the same rounds), and the implementations of a shape run back to
back, not mixed (see timing.time_interleaved). grad_input is the median over rounds of backward minus
grad_weight, the two timed back to back; it is left out ("-") when noise makes that non-positive.
"""
import statistics

import numpy as np

from .._threads import get_num_threads
from .cases import (CONV_CASES, CONV_DIRECTIONS, CONV_TIMED, POOL_CASES, POOL_DIRECTIONS, TINY_CONV_CASES,
                    TINY_POOL_CASES, conv_calls, pool_calls)
from .timing import geomean, positive_median_ms, ratio, time_interleaved

NAME = "kernels"
TITLE = "conv2d and pooling per shape and direction"

HEADER = ("op", "shape", "direction", "ref_ms", "engine_ms", "torch_ms", "engine_{rate}", "torch_{rate}",
          "x_ref", "x_torch", "%matmul", "%peak")
WIDTHS = (10, 32, 11, 9, 9, 9, 11, 11, 7, 7, 7, 5)


def wanted(ctx):
    return True


def cases(ctx):
    """(conv cases, pool cases) of this run: the tiny set, the --quick subset or all."""
    if ctx.tiny:
        return TINY_CONV_CASES, TINY_POOL_CASES
    quick = ctx.opts.quick
    return ([c for c in CONV_CASES if c.quick or not quick], [c for c in POOL_CASES if c.quick or not quick])


def measure(ctx):
    conv_cases, pool_cases = cases(ctx)
    scratch = _scratch_probe()
    rows = []
    ctx.say(header("GF/s"))
    for case in conv_cases:
        for row in measure_conv(case, ctx, scratch):
            rows.append(row)
            ctx.say(format_row(row))
    ctx.say("")
    ctx.say(header("GB/s"))
    for case in pool_cases:
        for row in measure_pool(case, ctx):
            rows.append(row)
            ctx.say(format_row(row))
    return {"rows": rows, "summary": summarise(rows), "scratch_reported": scratch is not None}


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------

def _repeats(case, ctx):
    opts = ctx.opts
    ref = 0 if (case.big and opts.quick) else min(opts.repeat, opts.reference_repeat)
    return {impl: ref if impl == "reference" else opts.repeat for impl in ctx.impls}


def _warmup(ctx):
    """The reference is plain NumPy with nothing to warm up; --quick saves its slow first call."""
    return {"reference": 0 if ctx.opts.quick else 1, "engine": 1, "torch": 1}


def _measure(case, ctx, make_calls, directions):
    """Time every implementation and direction of one case, all interleaved in the same rounds.
    Returns direction -> impl -> list of seconds (empty for an implementation left out)."""
    rng = np.random.default_rng(0)
    repeats = _repeats(case, ctx)
    warmup = _warmup(ctx)
    calls, reps, warm = {}, {}, {}
    for impl in ctx.impls:
        if repeats[impl]:
            for direction, call in make_calls(impl, case, rng).items():
                key = (impl, direction)
                calls[key], reps[key], warm[key] = call, repeats[impl], warmup[impl]
    # tiny smoke-run shapes: no pause between implementations, the numbers are not read
    times = time_interleaved(calls, reps, warm, park=0 if ctx.tiny else None)
    return {d: {impl: times.get((impl, d), []) for impl in ctx.impls} for d in directions}


def measure_conv(case, ctx, scratch):
    """Rows for one conv2d case, one per direction. grad_input is the median over rounds of backward minus
    grad_weight, the two timed back to back in each round."""
    impls = ctx.impls
    samples = _measure(case, ctx, conv_calls, CONV_TIMED)
    samples["grad_input"] = {impl: [b - w for b, w in zip(samples["backward"][impl], samples["grad_weight"][impl])]
                             for impl in impls}
    ms = {d: {impl: positive_median_ms(samples[d][impl]) for impl in impls} for d in CONV_DIRECTIONS}
    scratch_bytes = scratch(case) if scratch is not None else {}
    rows = []
    for direction in CONV_DIRECTIONS:
        row = _row("conv2d", case, direction, ms[direction], samples[direction], case.flops(direction) / 1e9,
                   "gflops")
        if case.compute_bound and row["engine_rate"] is not None:
            row["pct_matmul"] = 100 * row["engine_rate"] / ctx.matmul_gflops
            row["pct_peak"] = 100 * row["engine_rate"] / ctx.peak_gflops
        if direction in scratch_bytes:
            row["scratch_bytes"], row["path"] = scratch_bytes[direction]
        rows.append(row)
    return rows


def measure_pool(case, ctx):
    samples = _measure(case, ctx, pool_calls, POOL_DIRECTIONS)
    rows = []
    for direction in POOL_DIRECTIONS:
        ms = {impl: positive_median_ms(samples[direction][impl]) for impl in ctx.impls}
        rows.append(_row(case.op_name, case, direction, ms, samples[direction], case.bytes(direction) / 1e9,
                         "gbytes"))
    return rows


def _row(op, case, direction, ms, samples, work, unit):
    """One report line. `work` is GFLOP (unit "gflops") or GB (unit "gbytes") per call; `samples`: impl -> the
    seconds of each timed call."""
    rate = {impl: (work / (v / 1e3) if v else None) for impl, v in ms.items()}
    return {
        "op": op, "shape": case.name, "direction": direction, "unit": unit, "work": work,
        "compute_bound": bool(getattr(case, "compute_bound", False)),
        "ms": ms, "rate": rate, "engine_rate": rate.get("engine"),
        "samples_ms": {impl: [1e3 * t for t in v] for impl, v in samples.items()},
        "vs_reference": ratio(ms.get("reference"), ms.get("engine")),
        "vs_torch": ratio(ms.get("torch"), ms.get("engine")),
    }


def _scratch_probe():
    """(bytes, path) per conv2d direction: the strategy the kernels take (`conv2d_paths`) and the extra bytes one
    call allocates (packed weights, per-thread panels and padded rows, grad_weight's partial sums), from the
    kernels' own account of their path choices (`conv2d_scratch_bytes`). None where the kernel module offers no
    such account."""
    from .._kernels import engine
    account = getattr(engine, "conv2d_scratch_bytes", None)
    if not callable(account):
        return None

    def scratch(case):
        g = case.geometry
        params = (g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dilation_h, g.dilation_w, g.groups, g.out_h,
                  g.out_w)
        by = account(case.x_shape, case.w_shape, params, 4, get_num_threads())
        path = engine.conv2d_paths(case.x_shape, case.w_shape, params, 4)
        return {"forward": (by["forward"], path["forward"]),
                "grad_input": (by["grad_input"], path["grad_input"]),
                "grad_weight": (by["grad_weight"], path["grad_weight"]),
                "backward": (max(by["grad_input"], by["grad_weight"]),
                             f"{path['grad_input']} + {path['grad_weight']}")}
    return scratch


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------

# the shares a compute-bound conv row carries: of the float32 matmul rate and of the multiply-add peak
PCT_KEYS = ("pct_matmul", "pct_peak")


def summarise(rows):
    """Per direction, geometric means of the engine's speedups and the mean and lowest % of the matmul rate and of
    the multiply-add peak."""
    conv = [r for r in rows if r["op"] == "conv2d"]
    pools = [r for r in rows if r["op"] != "conv2d"]
    s = {"conv": {}, "pool": {}}
    for direction in CONV_DIRECTIONS:
        sel = [r for r in conv if r["direction"] == direction]
        s["conv"][direction] = {"vs_reference": geomean(r["vs_reference"] for r in sel),
                                "vs_torch": geomean(r["vs_torch"] for r in sel)}
        for key in PCT_KEYS:
            pct = [r[key] for r in sel if r.get(key) is not None]
            s["conv"][direction][key + "_mean"] = statistics.mean(pct) if pct else None
            s["conv"][direction][key + "_min"] = min(pct) if pct else None
    for direction in POOL_DIRECTIONS:
        sel = [r for r in pools if r["direction"] == direction]
        s["pool"][direction] = {"vs_reference": geomean(r["vs_reference"] for r in sel),
                                "vs_torch": geomean(r["vs_torch"] for r in sel)}
    # forward + backward against the reference, shape by shape.
    by_shape = {}
    for r in conv:
        by_shape.setdefault(r["shape"], {})[r["direction"]] = r["ms"]
    fwd_bwd = []
    for ms in by_shape.values():
        ref = _sum(ms["forward"]["reference"], ms["backward"]["reference"])
        eng = _sum(ms["forward"]["engine"], ms["backward"]["engine"])
        fwd_bwd.append(ratio(ref, eng))
    s["conv_fwd_bwd_vs_reference"] = geomean(fwd_bwd)
    for key in PCT_KEYS:
        pct = [r[key] for r in conv if r.get(key) is not None and r["direction"] != "backward"]
        s["compute_bound_min_" + key] = min(pct) if pct else None
    return s


def summary(result, ctx):
    s = result["summary"]
    lines = ["geometric means of the engine's speedup (x_ref, x_torch); % of the matmul rate and of the multiply-add "
             "peak on compute-bound shapes"]
    for direction, v in s["conv"].items():
        lines.append(f"  conv2d {direction:<11} x_ref {num(v['vs_reference'], '{:.3g}'):>6}  "
                     f"x_torch {num(v['vs_torch'], '{:.3g}'):>6}  %matmul mean "
                     f"{num(v['pct_matmul_mean'], '{:.0f}'):>4}  min {num(v['pct_matmul_min'], '{:.0f}'):>4}  "
                     f"%peak mean {num(v['pct_peak_mean'], '{:.0f}'):>3}  "
                     f"min {num(v['pct_peak_min'], '{:.0f}'):>3}")
    for direction, v in s["pool"].items():
        lines.append(f"  pool   {direction:<11} x_ref {num(v['vs_reference'], '{:.3g}'):>6}  "
                     f"x_torch {num(v['vs_torch'], '{:.3g}'):>6}")
    scratch = [r for r in result["rows"] if "scratch_bytes" in r]
    if scratch:
        lines += ["", "engine path and scratch per call (peak extra bytes beyond inputs and outputs)"]
        lines += [f"  conv2d {r['shape']:<32} {r['direction']:<11} {r['path']:<28} {fmt_bytes(r['scratch_bytes'])}"
                  for r in scratch]
    return lines


def comparisons(result):
    s = result["summary"]
    return [
        dict(key="conv_forward_vs_torch", label="conv2d forward, speedup vs PyTorch (geomean)",
             value=s["conv"]["forward"]["vs_torch"], unit="x"),
        dict(key="conv_backward_vs_torch", label="conv2d backward, speedup vs PyTorch (geomean)",
             value=s["conv"]["backward"]["vs_torch"], unit="x"),
        dict(key="conv_fwd_bwd_vs_reference", label="conv2d forward+backward, speedup vs reference (geomean)",
             value=s["conv_fwd_bwd_vs_reference"], unit="x"),
        dict(key="compute_bound_min_pct_matmul", label="compute-bound conv2d, lowest % of matmul rate",
             value=s["compute_bound_min_pct_matmul"], unit="%"),
        dict(key="compute_bound_min_pct_peak", label="compute-bound conv2d, lowest % of multiply-add peak",
             value=s["compute_bound_min_pct_peak"], unit="%"),
        dict(key="pool_forward_vs_torch", label="pooling forward, speedup vs PyTorch (geomean)",
             value=s["pool"]["forward"]["vs_torch"], unit="x"),
        dict(key="pool_backward_vs_torch", label="pooling backward, speedup vs PyTorch (geomean)",
             value=s["pool"]["backward"]["vs_torch"], unit="x"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------

def _sum(a, b):
    return a + b if a is not None and b is not None else None


def num(v, fmt="{:.4g}"):
    return "-" if v is None else fmt.format(v)


def _line(cells):
    first = [f"{c:<{w}}" for c, w in zip(cells[:3], WIDTHS[:3])]
    rest = [f"{c:>{w}}" for c, w in zip(cells[3:], WIDTHS[3:])]
    return " ".join(first + rest).rstrip()


def format_row(r):
    ms, rate = r["ms"], r["rate"]
    return _line([r["op"], r["shape"], r["direction"], num(ms.get("reference")), num(ms.get("engine")),
                  num(ms.get("torch")), num(rate.get("engine"), "{:.1f}"), num(rate.get("torch"), "{:.1f}"),
                  num(r["vs_reference"], "{:.3g}"), num(r["vs_torch"], "{:.3g}"),
                  num(r.get("pct_matmul"), "{:.0f}"), num(r.get("pct_peak"), "{:.0f}")])


def header(rate):
    return _line([h.format(rate=rate) for h in HEADER])


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
