"""The speed report behind `python -m convengine bench` (issue 4), and the shapes and calls the pytest-benchmark
suite in `benchmarks/` times.

Per shape and direction it prints the median time of each implementation (reference, engine, PyTorch when
installed), the engine's GFLOP/s, its speedup over the reference and over PyTorch, and, for the compute-bound
shapes, its share of the machine's own float32 matmul speed (numpy's BLAS at the same thread count). All
implementations run at one thread count: the engine through `set_num_threads`, PyTorch through
`torch.set_num_threads`, numpy's BLAS (which the reference leans on) through threadpoolctl. Each implementation's
calls of one shape are interleaved in rotating order (all directions in the same rounds), and the implementations
of a shape run back to back, not mixed, so that one runtime's spinning workers do not slow the other's calls (see
time_interleaved).

Conventions:
- conv2d directions: forward; grad_weight (`conv2d_backward(..., need_input_grad=False)`: weight and bias
  gradients); backward (all three gradients). grad_input is not a call of its own in the public API, so it is
  reported as backward minus grad_weight (the median over rounds of the difference of the two, timed back to back),
  for every implementation alike; it is left out ("-") when noise makes that non-positive. PyTorch's parts are timed with `aten.convolution_backward` and the
  matching output_mask.
- FLOPs of a conv2d direction: 2 * multiply-adds of the forward (grad_input and grad_weight cost the same; the bias
  sum is ignored); backward counts both.
- Pools are memory-bound, so their rate is GB/s of the least traffic a call needs (input read and output written,
  indices included). max_pool2d forward returns indices, as a training step needs them.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from . import _args, functional, reference
from ._kernels import build_info
from ._outputs import check_output_path
from ._threads import MAX_THREADS, _usable_cores, get_num_threads, set_num_threads

IMPLS = ("reference", "engine", "torch")
CONV_TIMED = ("forward", "grad_weight", "backward")
CONV_DIRECTIONS = ("forward", "grad_input", "grad_weight", "backward")
POOL_DIRECTIONS = ("forward", "backward")
MATMUL_SIZE = 1024

# The issue-4 targets, checked at the end of the report: (label, value key, threshold).
TARGETS = (
    ("conv2d forward vs PyTorch (geomean)", "conv_forward_vs_torch", 1.1),
    ("conv2d backward vs PyTorch (geomean)", "conv_backward_vs_torch", 1.0),
    ("conv2d forward+backward vs reference (geomean)", "conv_fwd_bwd_vs_reference", 5.0),
    ("compute-bound shapes, % of matmul peak (lowest)", "compute_bound_min_pct_peak", 75.0),
    ("pooling forward vs PyTorch (geomean)", "pool_forward_vs_torch", 1.25),
    ("pooling backward vs PyTorch (geomean)", "pool_backward_vs_torch", 1.25),
    ("training epoch vs PyTorch", "train_vs_torch", 1.3),
    ("N threads vs 1 thread, compute-bound (geomean)", "thread_scaling", 1.8),
)


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """conv2d of a (batch, channels, height, width) float32 input to out_channels maps, square kernel."""
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    big: bool = False   # the reference gets fewer rounds here, and none in --quick
    quick: bool = True  # part of the --quick subset

    @property
    def name(self):
        s = f"{self.batch}x{self.channels}x{self.height}x{self.width}->{self.out_channels},{self.kernel}x{self.kernel}"
        for tag, value, default in (("s", self.stride, 1), ("p", self.padding, 0), ("g", self.groups, 1)):
            if value != default:
                s += f",{tag}{value}"
        return s

    @property
    def x_shape(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def w_shape(self):
        return (self.out_channels, self.channels // self.groups, self.kernel, self.kernel)

    @property
    def geometry(self):
        return _args.conv2d_geometry(self.x_shape, self.w_shape, self.stride, self.padding, 1, self.groups)

    def flops(self, direction):
        f = _args.flops_conv2d(self.geometry)
        return 2 * f if direction == "backward" else f

    @property
    def compute_bound(self):
        """Enough channels per group and a 3x3 window for the GEMM to dominate (the issue's C >= 32, 3x3);
        a depthwise conv has one channel per group and is not."""
        return self.channels // self.groups >= 32 and self.kernel == 3


@dataclasses.dataclass(frozen=True)
class PoolCase:
    """max_pool2d or avg_pool2d of a (batch, channels, height, width) float32 input, square window."""
    op: str  # "max" or "avg"
    batch: int
    channels: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int = 0
    big: bool = False
    quick: bool = True

    @property
    def name(self):
        s = f"{self.batch}x{self.channels}x{self.height}x{self.width},{self.kernel}x{self.kernel},s{self.stride}"
        return s + (f",p{self.padding}" if self.padding else "")

    @property
    def op_name(self):
        return f"{self.op}_pool2d"

    @property
    def x_shape(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def out_shape(self):
        return _args.pool2d_geometry(self.x_shape, self.kernel, self.stride, self.padding, False).out_shape

    def bytes(self, direction):
        """Least memory traffic of one call: float32 input and output, plus the int64 indices of max pooling."""
        n_in, n_out = math.prod(self.x_shape), math.prod(self.out_shape)
        indices = 8 * n_out if self.op == "max" else 0
        return 4 * (n_in + n_out) + indices


# The shapes of issue 4.
CONV_CASES = (
    ConvCase(64, 3, 32, 32, 32, 5),
    ConvCase(128, 1, 28, 28, 32, 5, padding=2, quick=False),
    ConvCase(64, 32, 16, 16, 64, 3, padding=1),
    ConvCase(64, 128, 8, 8, 128, 3, padding=1),
    ConvCase(32, 64, 56, 56, 64, 3, padding=1, big=True),
    ConvCase(64, 64, 32, 32, 64, 1, quick=False),
    ConvCase(64, 32, 32, 32, 64, 3, stride=2, padding=1, quick=False),
    ConvCase(32, 128, 28, 28, 128, 3, padding=1, groups=128),
)
POOL_CASES = (
    PoolCase("max", 64, 64, 32, 32, 2, 2),
    PoolCase("max", 32, 64, 56, 56, 3, 2, padding=1, big=True),
    PoolCase("avg", 64, 64, 32, 32, 2, 2),
)
# Small enough for tests and smoke runs, still covering stride, padding and groups.
TINY_CONV_CASES = (
    ConvCase(4, 3, 12, 12, 8, 5),
    ConvCase(4, 32, 10, 10, 32, 3, padding=1),
    ConvCase(4, 16, 9, 9, 16, 3, stride=2, padding=1, groups=4),
)
TINY_POOL_CASES = (
    PoolCase("max", 4, 8, 12, 12, 2, 2),
    PoolCase("max", 4, 8, 11, 11, 3, 2, padding=1),
    PoolCase("avg", 4, 8, 12, 12, 2, 2),
)


# ---------------------------------------------------------------------------------------------------------------
# The calls: one zero-argument callable per implementation, case and direction, its data built beforehand
# ---------------------------------------------------------------------------------------------------------------

def torch_module():
    """PyTorch when installed, else None (it is optional everywhere)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _random(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def conv_calls(impl, case, rng):
    """direction -> callable running that conv2d direction of `impl` ("reference", "engine" or "torch") on one
    set of random data."""
    g = case.geometry
    x, w, b, gy = (_random(rng, s) for s in (case.x_shape, case.w_shape, (case.out_channels,), g.out_shape))
    kw = dict(stride=case.stride, padding=case.padding, groups=case.groups)
    if impl in ("reference", "engine"):
        mod = reference if impl == "reference" else functional
        return {
            "forward": lambda: mod.conv2d(x, w, b, **kw),
            "grad_weight": lambda: mod.conv2d_backward(gy, x, w, need_input_grad=False, **kw),
            "backward": lambda: mod.conv2d_backward(gy, x, w, **kw),
        }
    if impl == "torch":
        torch = torch_module()
        xt, wt, bt, gyt = (torch.from_numpy(a) for a in (x, w, b, gy))
        args = ([case.out_channels], [case.stride] * 2, [case.padding] * 2, [1, 1], False, [0, 0], case.groups)
        backward = torch.ops.aten.convolution_backward
        return {
            "forward": lambda: torch.nn.functional.conv2d(xt, wt, bt, case.stride, case.padding, 1, case.groups),
            "grad_weight": lambda: backward(gyt, xt, wt, *args, [False, True, True]),
            "backward": lambda: backward(gyt, xt, wt, *args, [True, True, True]),
        }
    raise ValueError(f"unknown implementation {impl!r}")


def pool_calls(impl, case, rng):
    """direction -> callable running that direction of a pooling case of `impl` on one set of random data."""
    x = _random(rng, case.x_shape)
    gy = _random(rng, case.out_shape)
    k, s, p = case.kernel, case.stride, case.padding
    if impl in ("reference", "engine"):
        mod = reference if impl == "reference" else functional
        if case.op == "max":
            _, indices = mod.max_pool2d(x, k, s, p, return_indices=True)
            return {
                "forward": lambda: mod.max_pool2d(x, k, s, p, return_indices=True),
                "backward": lambda: mod.max_pool2d_backward(gy, indices, x.shape),
            }
        return {
            "forward": lambda: mod.avg_pool2d(x, k, s, p),
            "backward": lambda: mod.avg_pool2d_backward(gy, x.shape, k, s, p),
        }
    if impl == "torch":
        torch = torch_module()
        aten = torch.ops.aten
        xt, gyt = torch.from_numpy(x), torch.from_numpy(gy)
        window = ([k, k], [s, s], [p, p])
        if case.op == "max":
            _, indices = aten.max_pool2d_with_indices(xt, *window, [1, 1], False)
            return {
                "forward": lambda: aten.max_pool2d_with_indices(xt, *window, [1, 1], False),
                "backward": lambda: aten.max_pool2d_with_indices_backward(gyt, xt, *window, [1, 1], False, indices),
            }
        return {
            "forward": lambda: aten.avg_pool2d(xt, *window, False, True, None),
            "backward": lambda: aten.avg_pool2d_backward(gyt, xt, *window, False, True, None),
        }
    raise ValueError(f"unknown implementation {impl!r}")


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------

class SameThreads:
    """Every implementation at n threads for the duration of a `with`; the previous settings come back after."""

    def __init__(self, n):
        self.n = n
        self.blas_limited = False

    def __enter__(self):
        self._engine = get_num_threads()
        set_num_threads(self.n)
        torch = torch_module()
        self._torch = torch.get_num_threads() if torch else None
        if torch:
            torch.set_num_threads(self.n)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self._limits = None
        else:
            self._limits = threadpool_limits(self.n, user_api="blas")
            self.blas_limited = True
        return self

    def __exit__(self, *exc):
        if self._limits is not None:
            self._limits.restore_original_limits()
        if self._torch is not None:
            torch_module().set_num_threads(self._torch)
        set_num_threads(self._engine)


# Seconds for thread pools that spin after a call (OpenBLAS, PyTorch's OpenMP) to go to sleep.
PARK_SECONDS = 0.25


def time_interleaved(calls, repeats, warmup=1, park=None):
    """Seconds of each call in `calls` (name -> callable), `repeats[name]` times each. Calls of one implementation
    (the first item of a tuple name, else the name) are interleaved: round r runs them one after another from a
    rotating offset. Implementations run one after another, not mixed: each brings its own thread pool (the
    engine's libgomp, PyTorch's own, OpenBLAS), whose workers keep spinning after a call and took the cores from
    the other's next call when they were interleaved (a 3.8 ms engine backward read 7.7 ms right after PyTorch's).
    Before each implementation the previous one's workers get `park` seconds (default PARK_SECONDS) to stop
    spinning and sleep (OpenBLAS spins about 0.1 s after a call: the engine's backward read twice its time right
    after the reference's).
    `warmup`: untimed calls first, an int or a dict by name. Returns name -> list of seconds."""
    names = [n for n in calls if repeats[n] > 0]
    groups = {}
    for name in names:
        groups.setdefault(name[0] if isinstance(name, tuple) else name, []).append(name)
    times = {name: [] for name in names}
    for group in groups.values():
        if len(groups) > 1:
            time.sleep(PARK_SECONDS if park is None else park)
        for name in group:
            for _ in range(warmup.get(name, 1) if isinstance(warmup, dict) else warmup):
                calls[name]()
        for r in range(max(repeats[n] for n in group)):
            shift = r % len(group)
            for name in group[shift:] + group[:shift]:
                if r < repeats[name]:
                    t0 = time.perf_counter()
                    calls[name]()
                    times[name].append(time.perf_counter() - t0)
    return times


def median_ms(seconds):
    return 1e3 * statistics.median(seconds) if seconds else None


def matmul_gflops(size=MATMUL_SIZE, repeat=5, use_torch=True):
    """The machine's float32 matmul rate at the thread count in force (see SameThreads): GFLOP/s of the median
    size x size product through numpy's BLAS and, when installed, PyTorch's. The faster is the peak yardstick: a
    BLAS built without kernels for the CPU's widest vectors would otherwise flatter the engine."""
    rng = np.random.default_rng(0)
    a, b = _random(rng, (size, size)), _random(rng, (size, size))
    calls = {"numpy": lambda: a @ b}
    torch = torch_module() if use_torch else None
    if torch is not None:
        at, bt = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch"] = lambda: torch.mm(at, bt)
    times = time_interleaved(calls, {name: repeat for name in calls}, warmup=2)
    return {name: 2 * size ** 3 / (median_ms(t) * 1e6) for name, t in times.items()}


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _ratio(num, den):
    return num / den if num is not None and den is not None and den > 0 else None


def _scratch_probe():
    """The extra bytes one engine call of each conv2d direction allocates (packed weights, per-thread panels and
    padded rows, grad_weight's partial sums), from the kernels' own account of their path choices
    (`conv2d_scratch_bytes`). None where the kernel module offers no such account."""
    from ._kernels import engine
    account = getattr(engine, "conv2d_scratch_bytes", None)
    if not callable(account):
        return None

    def scratch(case):
        g = case.geometry
        params = (g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dilation_h, g.dilation_w, g.groups, g.out_h,
                  g.out_w)
        by = account(case.x_shape, case.w_shape, params, 4, get_num_threads())
        return {"forward": by["forward"], "grad_input": by["grad_input"], "grad_weight": by["grad_weight"],
                "backward": max(by["grad_input"], by["grad_weight"])}
    return scratch


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------

def _repeats(impls, case, opts):
    ref = 0 if (case.big and opts.quick) else min(opts.repeat, opts.reference_repeat)
    return {impl: ref if impl == "reference" else opts.repeat for impl in impls}


def _warmup(opts):
    """The reference is plain NumPy with nothing to warm up; --quick saves its slow first call."""
    return {"reference": 0 if opts.quick else 1, "engine": 1, "torch": 1}


def _measure(case, impls, opts, make_calls, directions):
    """Time every implementation and direction of one case, all interleaved in the same rounds.
    Returns direction -> impl -> list of seconds (empty for an implementation left out)."""
    rng = np.random.default_rng(0)
    repeats = _repeats(impls, case, opts)
    warmup = _warmup(opts)
    calls, reps, warm = {}, {}, {}
    for impl in impls:
        if repeats[impl]:
            for direction, call in make_calls(impl, case, rng).items():
                key = (impl, direction)
                calls[key], reps[key], warm[key] = call, repeats[impl], warmup[impl]
    # tiny smoke-run shapes: no pause between implementations, the numbers are not read
    times = time_interleaved(calls, reps, warm, park=0 if getattr(opts, "shapes", None) == "tiny" else None)
    return {d: {impl: times.get((impl, d), []) for impl in impls} for d in directions}


def measure_conv(case, impls, opts, peak, scratch):
    """Rows for one conv2d case, one per direction. grad_input is the median over rounds of backward minus
    grad_weight, the two timed back to back in each round."""
    samples = _measure(case, impls, opts, conv_calls, CONV_TIMED)
    samples["grad_input"] = {impl: [b - w for b, w in zip(samples["backward"][impl], samples["grad_weight"][impl])]
                             for impl in impls}
    ms = {d: {impl: _positive_median_ms(samples[d][impl]) for impl in impls} for d in CONV_DIRECTIONS}
    scratch_bytes = scratch(case) if scratch is not None else {}
    rows = []
    for direction in CONV_DIRECTIONS:
        row = _row("conv2d", case, direction, ms[direction], samples[direction], case.flops(direction) / 1e9,
                   "gflops")
        if case.compute_bound and row["engine_rate"] is not None:
            row["pct_peak"] = 100 * row["engine_rate"] / peak
        if direction in scratch_bytes:
            row["scratch_bytes"] = scratch_bytes[direction]
        rows.append(row)
    return rows


def measure_pool(case, impls, opts):
    samples = _measure(case, impls, opts, pool_calls, POOL_DIRECTIONS)
    rows = []
    for direction in POOL_DIRECTIONS:
        ms = {impl: _positive_median_ms(samples[direction][impl]) for impl in impls}
        rows.append(_row(case.op_name, case, direction, ms, samples[direction], case.bytes(direction) / 1e9,
                         "gbytes"))
    return rows


def _positive_median_ms(seconds):
    """Median in ms; None when there are no samples or when the median of a difference is lost in noise."""
    ms = median_ms(seconds)
    return ms if ms is not None and ms > 0 else None


def _row(op, case, direction, ms, samples, work, unit):
    """One report line. `work` is GFLOP (unit "gflops") or GB (unit "gbytes") per call; `samples`: impl -> the
    seconds of each timed call."""
    rate = {impl: (work / (v / 1e3) if v else None) for impl, v in ms.items()}
    return {
        "op": op, "shape": case.name, "direction": direction, "unit": unit, "work": work,
        "compute_bound": bool(getattr(case, "compute_bound", False)),
        "ms": ms, "rate": rate, "engine_rate": rate.get("engine"),
        "samples_ms": {impl: [1e3 * t for t in v] for impl, v in samples.items()},
        "vs_reference": _ratio(ms.get("reference"), ms.get("engine")),
        "vs_torch": _ratio(ms.get("torch"), ms.get("engine")),
    }


def measure_scaling(cases, n_threads, opts):
    """Engine forward+backward at 1 thread and at n_threads on the compute-bound cases, interleaved."""
    out = []
    rng = np.random.default_rng(0)
    for case in cases:
        if not case.compute_bound:
            continue
        calls = conv_calls("engine", case, rng)
        fwd, bwd = calls["forward"], calls["backward"]

        def at(n):
            def call():
                set_num_threads(n)
                fwd()
                bwd()
            return call

        calls = {"1": at(1), str(n_threads): at(n_threads)}
        times = time_interleaved(calls, {name: opts.repeat for name in calls})
        set_num_threads(n_threads)
        one, many = median_ms(times["1"]), median_ms(times[str(n_threads)])
        out.append({"shape": case.name, "ms_1": one, "ms_n": many, "speedup": _ratio(one, many)})
    return out


TRAIN_BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                               "bench_train.py")


def measure_training(n_threads):
    """Seconds per epoch of the default digits net, engine vs PyTorch, from `epoch_seconds` in
    benchmarks/bench_train.py (a source checkout has it beside the package; an installed package does not).
    Returns its dict, or {"skipped": why}."""
    if not os.path.exists(TRAIN_BENCHMARK):
        return {"skipped": f"{TRAIN_BENCHMARK} not found (it ships with the source, not the package)"}
    import importlib.util
    spec = importlib.util.spec_from_file_location("convengine_bench_train", TRAIN_BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        return {"skipped": f"bench_train.py needs {e.name or e}"}
    if not callable(getattr(module, "epoch_seconds", None)):
        return {"skipped": "bench_train.py has no epoch_seconds(n_threads)"}
    try:
        return module.epoch_seconds(n_threads)
    except Exception as e:  # a broken training benchmark must not throw away the conv and pool tables
        return {"skipped": f"epoch_seconds failed: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------------------------
# Summaries and printing
# ---------------------------------------------------------------------------------------------------------------

def summarise(rows, scaling, training):
    conv = [r for r in rows if r["op"] == "conv2d"]
    pools = [r for r in rows if r["op"] != "conv2d"]
    s = {"conv": {}, "pool": {}}
    for direction in CONV_DIRECTIONS:
        sel = [r for r in conv if r["direction"] == direction]
        pct = [r["pct_peak"] for r in sel if r.get("pct_peak") is not None]
        s["conv"][direction] = {
            "vs_reference": geomean(r["vs_reference"] for r in sel),
            "vs_torch": geomean(r["vs_torch"] for r in sel),
            "pct_peak_mean": statistics.mean(pct) if pct else None,
            "pct_peak_min": min(pct) if pct else None,
        }
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
        fwd_bwd.append(_ratio(ref, eng))
    compute_pct = [r["pct_peak"] for r in conv if r.get("pct_peak") is not None and r["direction"] != "backward"]
    s["targets"] = {
        "conv_forward_vs_torch": s["conv"]["forward"]["vs_torch"],
        "conv_backward_vs_torch": s["conv"]["backward"]["vs_torch"],
        "conv_fwd_bwd_vs_reference": geomean(fwd_bwd),
        "compute_bound_min_pct_peak": min(compute_pct) if compute_pct else None,
        "pool_forward_vs_torch": s["pool"]["forward"]["vs_torch"],
        "pool_backward_vs_torch": s["pool"]["backward"]["vs_torch"],
        "train_vs_torch": (training or {}).get("speedup"),
        "thread_scaling": geomean(r["speedup"] for r in scaling) if scaling else None,
    }
    return s


def _sum(a, b):
    return a + b if a is not None and b is not None else None


def _num(v, fmt="{:.4g}"):
    return "-" if v is None else fmt.format(v)


HEADER = ("op", "shape", "direction", "ref_ms", "engine_ms", "torch_ms", "engine_{rate}", "torch_{rate}",
          "x_ref", "x_torch", "%peak")
WIDTHS = (10, 32, 11, 9, 9, 9, 11, 11, 7, 7, 6)


def _line(cells):
    first = [f"{c:<{w}}" for c, w in zip(cells[:3], WIDTHS[:3])]
    rest = [f"{c:>{w}}" for c, w in zip(cells[3:], WIDTHS[3:])]
    return " ".join(first + rest).rstrip()


def format_row(r):
    ms, rate = r["ms"], r["rate"]
    return _line([r["op"], r["shape"], r["direction"], _num(ms.get("reference")), _num(ms.get("engine")),
                  _num(ms.get("torch")), _num(rate.get("engine"), "{:.1f}"), _num(rate.get("torch"), "{:.1f}"),
                  _num(r["vs_reference"], "{:.3g}"), _num(r["vs_torch"], "{:.3g}"),
                  _num(r.get("pct_peak"), "{:.0f}")])


def header(rate):
    return _line([h.format(rate=rate) for h in HEADER])


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def machine_info(n_threads):
    info = {
        "platform": platform.platform(), "processor": _cpu_model(), "python": platform.python_version(),
        "numpy": np.__version__, "cpus": os.cpu_count(), "threads": n_threads, "convengine": build_info(),
    }
    torch = torch_module()
    info["torch"] = torch.__version__ if torch else None
    info["load_average"] = _load_average()
    return info


def _load_average():
    """1-minute load average: on a shared machine, a run started under load is not worth comparing."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lscpu():
    """`lscpu` lines that describe the processor, where the command exists."""
    import subprocess
    keep = ("Model name", "Architecture", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
            "L1d cache", "L2 cache", "L3 cache", "Hypervisor vendor")
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in text.splitlines() if line.split(":")[0].strip() in keep]


def _load_warning(report):
    """A caveat for the top of the file when other work shared the machine during the run."""
    loads = [v for v in (report["machine"]["load_average"], report["load_average_end"]) if v is not None]
    if not loads or max(loads) < 0.5 * _usable_cores():
        return []
    return [f"**Measured under load** (1-minute load average up to {max(loads):.1f} on {_usable_cores()} usable "
            "cores): other work shared the machine, so the times are noisy and the thread figures pessimistic. "
            "Rerun on a quiet machine before drawing conclusions.", ""]


def markdown(report, text, argv):
    """The report as printed, under a description of the machine and the command that made it."""
    m = report["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Made by `python -m convengine bench {' '.join(argv)}`"
        f" on {time.strftime('%Y-%m-%d %H:%M %Z')}; rerun that command to refresh this file.",
        "Columns, directions and conventions: `benchmarks/README.md`. Times are medians; ratios are engine",
        "speedups (above 1: the engine is faster).",
        "",
        *_load_warning(report),
        "## Machine",
        "",
        "```",
        *(_lscpu() or [f"Model name: {m['processor']}", f"CPU(s): {m['cpus']}"]),
        f"usable cores (affinity, quota): {_usable_cores()}",
        f"platform: {m['platform']}",
        f"python {m['python']}, numpy {m['numpy']}, torch {m['torch'] or 'not installed'}",
        f"threads: {report['threads']}",
        f"load average (1 min) at the start: {_num(m['load_average'], '{:.2f}')}, "
        f"at the end: {_num(report['load_average_end'], '{:.2f}')}",
        "```",
        "",
        "`convengine.build_info()`:",
        "",
        "```",
        json.dumps(m["convengine"], indent=1),
        "```",
        "",
        "## Report",
        "",
        "```",
        text,
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(report, path):
    """A PNG: engine vs reference and vs PyTorch speedup per shape and direction, and conv GFLOP/s with the peak."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install 'convengine[plot]'); no chart written",
              file=sys.stderr)
        return False
    rows = report["rows"]
    conv = [r for r in rows if r["op"] == "conv2d"]
    shapes = list(dict.fromkeys(r["shape"] for r in conv))
    fig, axes = plt.subplots(3, 1, figsize=(13, 13))
    width = 0.8 / len(CONV_DIRECTIONS)
    for i, direction in enumerate(CONV_DIRECTIONS):
        sel = {r["shape"]: r for r in conv if r["direction"] == direction}
        xs = [j + (i - 1.5) * width for j in range(len(shapes))]
        axes[0].bar(xs, [sel[s]["engine_rate"] or 0 for s in shapes], width, label=direction)
        axes[1].bar(xs, [sel[s]["vs_torch"] or 0 for s in shapes], width, label=direction)
    axes[0].axhline(report["matmul_gflops"], color="k", ls="--", lw=1,
                    label=f"float32 matmul, peak yardstick ({report['matmul_gflops']:.0f})")
    axes[0].set_ylabel("engine GFLOP/s")
    axes[1].axhline(1.0, color="k", lw=1)
    axes[1].set_ylabel("engine speedup over PyTorch")
    axes[1].set_yscale("log")
    for ax in axes[:2]:
        ax.set_xticks(range(len(shapes)), shapes, rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    pools = [r for r in rows if r["op"] != "conv2d"]
    labels = [f"{r['op']} {r['shape']} {r['direction']}" for r in pools]
    xs = np.arange(len(pools))
    axes[2].bar(xs - 0.2, [r["vs_reference"] or 0 for r in pools], 0.4, label="vs reference")
    axes[2].bar(xs + 0.2, [r["vs_torch"] or 0 for r in pools], 0.4, label="vs PyTorch")
    axes[2].axhline(1.0, color="k", lw=1)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("engine speedup")
    axes[2].set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
    axes[2].legend(fontsize=8)
    for ax in axes[1:]:
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(f"convengine {report['machine']['convengine']['version']}, {report['threads']} threads, "
                 f"{report['machine']['processor']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m convengine bench",
                                description="Time convengine's conv2d and pooling against its NumPy reference and "
                                            "PyTorch (when installed) at one thread count, and print ms, GFLOP/s, "
                                            "speedups and the share of the machine's float32 matmul speed.")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and repeats, reference skipped on the biggest shapes (well under a minute)")
    p.add_argument("--threads", type=int, default=None,
                   help="thread count of every implementation (default: convengine.get_num_threads())")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per implementation, shape and direction; the median is reported "
                        "(default 9, --quick 3; the reference gets at most 3)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--markdown", metavar="PATH",
                   help="write the printed report with a description of the machine as Markdown "
                        "(benchmarks/RESULTS.md is written this way)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even when installed")
    # For tests and smoke runs: tiny shapes, finishing in seconds.
    p.add_argument("--shapes", choices=("issue", "tiny"), default="issue", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    if opts.threads is not None and not 1 <= opts.threads <= MAX_THREADS:
        p.error(f"--threads must be in [1, {MAX_THREADS}], got {opts.threads}")
    for option in ("json", "markdown", "plot"):
        try:
            check_output_path(getattr(opts, option), f"--{option}")
        except ValueError as e:
            p.error(str(e))
    if opts.repeat is None:
        opts.repeat = 3 if opts.quick else 9
    if opts.repeat < 1:
        p.error(f"--repeat must be >= 1, got {opts.repeat}")
    opts.reference_repeat = 1 if opts.quick else 3
    return opts


def run(opts, out=None):
    """Measure and print (to `out`, default sys.stdout); return the report as a dict (what --json writes)."""
    out = out or sys.stdout
    text = []

    def say(*a):
        print(*a, file=out, flush=True)
        text.append(" ".join(str(x) for x in a))

    n_threads = opts.threads or get_num_threads()
    impls = [i for i in IMPLS if i != "torch" or (torch_module() is not None and not opts.no_torch)]
    if opts.shapes == "tiny":
        conv_cases, pool_cases = TINY_CONV_CASES, TINY_POOL_CASES
    else:
        conv_cases = [c for c in CONV_CASES if c.quick or not opts.quick]
        pool_cases = [c for c in POOL_CASES if c.quick or not opts.quick]
    scratch = _scratch_probe()
    started = time.perf_counter()
    with SameThreads(n_threads) as threads:
        info = machine_info(n_threads)
        bi = info["convengine"]
        say(f"convengine {bi['version']} | {info['processor']} | {n_threads} threads | simd {bi['simd']} | "
            f"openmp {bi['openmp']} | numpy {info['numpy']} | torch {info['torch'] or 'not installed'} | "
            f"load {_num(info['load_average'], '{:.2f}')}")
        if not threads.blas_limited:
            say("threadpoolctl is not installed: numpy's BLAS (reference, matmul yardstick) runs at its own "
                "thread count")
        matmul = matmul_gflops(repeat=3 if opts.quick else 7, use_torch="torch" in impls)
        peak = max(matmul.values())
        say(f"float32 matmul {MATMUL_SIZE}x{MATMUL_SIZE} at {n_threads} threads: "
            + ", ".join(f"{name} {v:.1f}" for name, v in matmul.items())
            + f" GFLOP/s; peak yardstick {peak:.1f} GFLOP/s")
        say(f"median of {opts.repeat} calls (reference: {opts.reference_repeat}"
            f"{', none on the biggest shapes' if opts.quick else ''}); grad_input = backward - grad_weight; "
            f"x_ref, x_torch: engine speedup; %peak: engine GFLOP/s / matmul")
        say("")
        say(header("GF/s"))
        rows = []
        for case in conv_cases:
            for row in measure_conv(case, impls, opts, peak, scratch):
                rows.append(row)
                say(format_row(row))
        say("")
        say(header("GB/s"))
        for case in pool_cases:
            for row in measure_pool(case, impls, opts):
                rows.append(row)
                say(format_row(row))
        scaling = []
        if n_threads > 1 and not opts.quick:
            scaling = measure_scaling(conv_cases, n_threads, opts)
        training = None if opts.quick or opts.shapes == "tiny" else measure_training(n_threads)
    summary = summarise(rows, scaling, training)
    report = {"machine": info, "threads": n_threads, "quick": opts.quick, "repeat": opts.repeat,
              "reference_repeat": opts.reference_repeat, "matmul_gflops": peak, "matmul_by_library": matmul,
              "matmul_size": MATMUL_SIZE,
              "impls": impls, "rows": rows, "summary": summary, "scaling": scaling, "training": training,
              "scratch_reported": scratch is not None, "seconds": time.perf_counter() - started}
    report["load_average_end"] = _load_average()
    _print_summary(report, say)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(markdown(report, "\n".join(text), opts.argv))
        say(f"wrote {opts.markdown}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)
        say(f"wrote {opts.json}")
    if opts.plot and plot(report, opts.plot):
        say(f"wrote {opts.plot}")
    return report


def _print_summary(report, say):
    s = report["summary"]
    say("")
    say("geometric means of the engine's speedup (x_ref, x_torch); % of matmul peak on compute-bound shapes")
    for direction, v in s["conv"].items():
        say(f"  conv2d {direction:<11} x_ref {_num(v['vs_reference'], '{:.3g}'):>6}  "
            f"x_torch {_num(v['vs_torch'], '{:.3g}'):>6}  %peak mean {_num(v['pct_peak_mean'], '{:.0f}'):>4}  "
            f"min {_num(v['pct_peak_min'], '{:.0f}'):>4}")
    for direction, v in s["pool"].items():
        say(f"  pool   {direction:<11} x_ref {_num(v['vs_reference'], '{:.3g}'):>6}  "
            f"x_torch {_num(v['vs_torch'], '{:.3g}'):>6}")
    scratch = [r for r in report["rows"] if "scratch_bytes" in r]
    if scratch:
        say("")
        say("engine scratch per call (peak extra bytes beyond inputs and outputs)")
        for r in scratch:
            say(f"  conv2d {r['shape']:<32} {r['direction']:<11} {_fmt_bytes(r['scratch_bytes'])}")
    if report["scaling"]:
        say("")
        say(f"thread scaling, engine forward+backward, compute-bound shapes (1 vs {report['threads']} threads)")
        for r in report["scaling"]:
            say(f"  {r['shape']:<32} {_num(r['ms_1'])} ms -> {_num(r['ms_n'])} ms  x{_num(r['speedup'], '{:.3g}')}")
    t = report["training"]
    if t:
        say("")
        if "skipped" in t:
            say(f"training, default digits net: skipped, {t['skipped']}")
        else:
            say(f"training, default digits net, median s/epoch: engine {_num(t.get('engine_s'))}, "
                f"PyTorch {_num(t.get('torch_s'))}, x_torch {_num(t.get('speedup'), '{:.3g}')}")
    say("")
    say("issue 4 targets")
    for label, key, threshold in TARGETS:
        v = s["targets"][key]
        verdict = "n/a" if v is None else ("met" if v >= threshold else "NOT met")
        unit = "%" if "pct" in key else "x"
        shown = "-" if v is None else (f"{v:.0f}%" if unit == "%" else f"{v:.3g}x")
        want = f">= {threshold:g}{unit}"
        say(f"  {label:<48} {shown:>7}  ({want:<8}) {verdict}")
    say(f"({report['seconds']:.1f} s; load average {_num(report['machine']['load_average'], '{:.2f}')} at the start, "
        f"{_num(report['load_average_end'], '{:.2f}')} at the end)")


def main(argv=None):
    """`python -m convengine bench [options]`; returns the exit status."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
