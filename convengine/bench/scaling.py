"""Report section: thread scaling, the engine's conv2d forward+backward at 1 thread and at the run's thread count
on the compute-bound shapes, interleaved call by call. Full runs with more than one thread only."""
import numpy as np

from .._threads import set_num_threads
from .cases import conv_calls
from .kernels import cases, num
from .timing import geomean, median_ms, ratio, time_interleaved

NAME = "scaling"
TITLE = "engine conv2d forward+backward, 1 thread vs N threads"


def wanted(ctx):
    if ctx.threads < 2:
        return "one thread"
    if ctx.opts.quick or ctx.tiny:
        return "full runs only (not --quick or the tiny shapes)"
    return True


def measure(ctx):
    rows = []
    rng = np.random.default_rng(0)
    n = ctx.threads
    for case in cases(ctx)[0]:
        if not case.compute_bound:
            continue
        calls = conv_calls("engine", case, rng)
        fwd, bwd = calls["forward"], calls["backward"]

        def at(threads, fwd=fwd, bwd=bwd):
            def call():
                set_num_threads(threads)
                fwd()
                bwd()
            return call

        timed = {"1": at(1), str(n): at(n)}
        times = time_interleaved(timed, {name: ctx.opts.repeat for name in timed})
        set_num_threads(n)
        one, many = median_ms(times["1"]), median_ms(times[str(n)])
        rows.append({"shape": case.name, "ms_1": one, "ms_n": many, "speedup": ratio(one, many)})
    return {"threads": n, "rows": rows}


def summary(result, ctx):
    lines = [f"thread scaling, engine forward+backward, compute-bound shapes (1 vs {result['threads']} threads)"]
    lines += [f"  {r['shape']:<32} {num(r['ms_1'])} ms -> {num(r['ms_n'])} ms  x{num(r['speedup'], '{:.3g}')}"
              for r in result["rows"]]
    return lines


def comparisons(result):
    speedups = [r["speedup"] for r in result["rows"]]
    return [dict(key="thread_scaling", label=f"{result['threads']} threads vs 1 thread, compute-bound (geomean)",
                 value=geomean(speedups) if speedups else None, unit="x")]
