"""Timing helpers: every implementation at one thread count, interleaved calls, the machine's float32 matmul rate
(the yardstick that "% of matmul rate" figures are measured against) and the build's float32 multiply-add peak
(that of "% of peak" figures)."""
import math
import statistics
import time

import numpy as np

from .._threads import get_num_threads, set_num_threads

MATMUL_SIZE = 1024
# Seconds for thread pools that spin after a call (OpenBLAS, PyTorch's OpenMP) to go to sleep.
PARK_SECONDS = 0.25
# Seconds of untimed calls after such a park: the cores come back slowly from it (AMD EPYC Zen 4 under KVM, LeNet-5
# training steps after a 0.25 s sleep: 7-8.5 ms against 5.0 warm at 1 thread for the first 3-10 steps, 6.3-8.5
# against 3.4-4.5 at 2 threads for the first 10-30, about 0.2 s), so a turn timed straight after one measured the
# machine waking up (LeNet-5 at 2 threads read 6.4 ms in the report, 3.4-4.2 back to back).
WARM_SECONDS = 0.3


def torch_module():
    """PyTorch when installed, else None (it is optional everywhere)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def random_array(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


class SameThreads:
    """Every implementation at n threads for the duration of a `with`: the engine through set_num_threads,
    PyTorch through torch.set_num_threads, numpy's BLAS (which the reference leans on) through threadpoolctl
    when installed (`blas_limited` says whether it was). The previous settings come back after."""

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


def time_interleaved(calls, repeats, warmup=1, park=None, rounds=1, warm=None):
    """Seconds of each call in `calls` (name -> callable), `repeats[name]` times each. Calls of one implementation
    (the first item of a tuple name, else the name) are interleaved: round r runs them one after another from a
    rotating offset. Implementations run one after another, not mixed: each brings its own thread pool (the
    engine's libgomp, PyTorch's own, OpenBLAS), whose workers keep spinning after a call and took the cores from
    the other's next call when they were interleaved (a 3.8 ms engine backward read 7.7 ms right after PyTorch's).
    Before each implementation the previous one's workers get `park` seconds (default PARK_SECONDS) to stop
    spinning and sleep (OpenBLAS spins about 0.1 s after a call: the engine's backward read twice its time right
    after the reference's).
    `rounds` > 1 cuts the repeats into that many turns of every implementation, each turn after its own park and
    one untimed call: a slow spell of a shared machine (seconds long) then falls on all of them, not on whichever
    ran during it (LeNet-5 training steps at 2 threads read engine / PyTorch 1.0 in one run and 0.6 in the next).
    After each park the implementation runs untimed for `warm` seconds (default WARM_SECONDS after a park of 0.1 s
    or more, else none) on top of its untimed calls, round robin over its calls, so that its turn is timed on
    cores that are awake again.
    `warmup`: untimed calls first, an int or a dict by name. Returns name -> list of seconds."""
    names = [n for n in calls if repeats[n] > 0]
    groups = {}
    for name in names:
        groups.setdefault(name[0] if isinstance(name, tuple) else name, []).append(name)
    times = {name: [] for name in names}
    rounds = max(1, min(rounds, max((repeats[n] for n in names), default=1)))
    park = PARK_SECONDS if park is None else park
    if warm is None:
        warm = WARM_SECONDS if park >= 0.1 else 0.0
    for turn in range(rounds):
        for group in groups.values():
            parked = len(groups) > 1
            if parked:
                time.sleep(park)
            start = time.perf_counter()
            for name in group:
                if turn == 0:
                    untimed = warmup.get(name, 1) if isinstance(warmup, dict) else warmup
                else:
                    untimed = 1 if repeats[name] > turn else 0
                for _ in range(untimed):
                    calls[name]()
            while parked and time.perf_counter() - start < warm:
                for name in group:
                    calls[name]()
            most = max(repeats[n] for n in group)
            for r in range(turn * most // rounds, (turn + 1) * most // rounds):
                shift = r % len(group)
                for name in group[shift:] + group[:shift]:
                    if r < repeats[name]:
                        t0 = time.perf_counter()
                        calls[name]()
                        times[name].append(time.perf_counter() - t0)
    return times


def calls_for_seconds(calls, repeat, seconds, most=2000):
    """name -> how many calls to time: at least `repeat`, and for fast calls enough to fill about `seconds`
    (at most `most`), judged from the faster of two untimed calls each (which also warm them up). A median of nine
    calls of a tenth of a millisecond is mostly noise."""
    out = {}
    for name, call in calls.items():
        took = []
        for _ in range(2):
            t0 = time.perf_counter()
            call()
            took.append(time.perf_counter() - t0)
        out[name] = int(min(most, max(repeat, seconds / max(min(took), 1e-7))))
    return out


def median_ms(seconds):
    return 1e3 * statistics.median(seconds) if seconds else None


def positive_median_ms(seconds):
    """Median in ms; None when there are no samples or when the median of a difference is lost in noise."""
    ms = median_ms(seconds)
    return ms if ms is not None and ms > 0 else None


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def ratio(num, den):
    return num / den if num is not None and den is not None and den > 0 else None


def matmul_gflops(size=MATMUL_SIZE, repeat=5, use_torch=True):
    """The machine's float32 matmul rate at the thread count in force (see SameThreads): GFLOP/s of the median
    size x size product through numpy's BLAS and, when installed, PyTorch's. The faster is the yardstick: a BLAS
    built without kernels for the CPU's widest vectors would otherwise flatter the engine."""
    rng = np.random.default_rng(0)
    a, b = random_array(rng, (size, size)), random_array(rng, (size, size))
    calls = {"numpy": lambda: a @ b}
    torch = torch_module() if use_torch else None
    if torch is not None:
        at, bt = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch"] = lambda: torch.mm(at, bt)
    times = time_interleaved(calls, {name: repeat for name in calls}, warmup=2)
    return {name: 2 * size ** 3 / (median_ms(t) * 1e6) for name, t in times.items()}


def fma_peak_gflops(repeat=7):
    """The build's float32 multiply-add peak at the engine's thread count in force (see SameThreads), GFLOP/s: the
    best of `repeat` calls of engine.fma_peak_gflops (chains of vector multiply-adds in registers on every thread
    of the team), after one untimed. A ceiling no kernel passes, where a library's matmul rate need not be one:
    on two AMD Zen 5 cores numpy's and PyTorch's float32 matmul read 121-224 and 187-200 GFLOP/s and the engine's
    3x3 convs 300-410, the peak 474-490."""
    from .._kernels import engine
    n = get_num_threads()
    engine.fma_peak_gflops(n)
    return max(engine.fma_peak_gflops(n) for _ in range(repeat))
