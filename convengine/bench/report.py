"""The speed report behind `python -m convengine bench`: a header describing the run, the float32 matmul rate
(the yardstick of every "% of matmul rate" figure), then each section in `SECTIONS`, a closing summary with the
headline comparisons, and optionally JSON, Markdown and a PNG chart.

All implementations run at one thread count (`timing.SameThreads`): the engine through `set_num_threads`,
PyTorch through `torch.set_num_threads`, numpy's BLAS (which the reference leans on) through threadpoolctl.
Comparisons are stated as what they are (the engine's speedup over PyTorch or the reference; a percentage of the
matmul rate); the report sets no pass marks.

A section is a module with:

    NAME                          its key in report["sections"] (JSON)
    TITLE                         one line saying what it measures
    wanted(ctx) -> True | str     True to run in this run; otherwise the reason it is left out (printed)
    measure(ctx) -> dict          JSON-able results; it may print table lines as it goes with ctx.say
    summary(result, ctx) -> list of str        its lines in the closing summary
    comparisons(result) -> list of dict(key, label, value, unit)   headline figures (unit "x" or "%"),
                                  value None where it could not be measured (e.g. PyTorch not installed)

`ctx` is a `Context`: the parsed options, the thread count, the implementations in this run, the matmul rate,
`tiny` (the smoke-run shapes) and `say` (print a line and keep it for --markdown). To add a section, write the
module and add it to `SECTIONS`.
"""
import argparse
import dataclasses
import json
import sys
import time
from typing import Callable

import numpy as np

from .._outputs import check_output_path
from .._threads import MAX_THREADS, get_num_threads
from . import inference, kernels, scaling, subnormal, training
from .cases import CONV_DIRECTIONS, IMPLS
from .kernels import num
from .machine import load_average, lscpu, machine_info, usable_cores
from .timing import MATMUL_SIZE, SameThreads, fma_peak_gflops, matmul_gflops, torch_module

SECTIONS = (kernels, scaling, training, inference, subnormal)
TORCH_MISSING = "PyTorch is not installed (pip install torch): the torch columns and the comparisons with it are empty"
TORCH_LEFT_OUT = "PyTorch left out (--no-torch): the torch columns and the comparisons with it are empty"


@dataclasses.dataclass
class Context:
    opts: argparse.Namespace
    threads: int
    impls: tuple
    matmul_gflops: float
    peak_gflops: float
    say: Callable
    tiny: bool


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m convengine bench",
                                description="Time convengine's conv2d and pooling against its NumPy reference and "
                                            "PyTorch (when installed) at one thread count, and print ms, GFLOP/s, "
                                            "speedups and the share of the machine's float32 matmul rate.")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and repeats, reference skipped on the biggest shapes, no thread scaling or "
                        "training sections (well under a minute)")
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
    p.add_argument("--section", action="append", choices=[s.NAME for s in SECTIONS], metavar="NAME",
                   help="run only this section (repeat for several): "
                        + ", ".join(s.NAME for s in SECTIONS) + " (default: all)")
    # For tests and smoke runs: tiny shapes, finishing in seconds.
    p.add_argument("--shapes", choices=("default", "tiny"), default="default", help=argparse.SUPPRESS)
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


def torch_note(impls, opts):
    """Why the PyTorch figures are empty, or None when PyTorch is in the run."""
    if "torch" in impls:
        return None
    return TORCH_LEFT_OUT if opts.no_torch else TORCH_MISSING


def run(opts, out=None):
    """Measure and print (to `out`, default sys.stdout); return the report as a dict (what --json writes)."""
    out = out or sys.stdout
    text = []

    def say(*a):
        print(*a, file=out, flush=True)
        text.append(" ".join(str(x) for x in a))

    n_threads = opts.threads or get_num_threads()
    impls = tuple(i for i in IMPLS if i != "torch" or (torch_module() is not None and not opts.no_torch))
    note = torch_note(impls, opts)
    started = time.perf_counter()
    sections, skipped = {}, {}
    with SameThreads(n_threads) as threads:
        info = machine_info(n_threads)
        bi = info["convengine"]
        say(f"convengine {bi['version']} | {info['processor']} | {n_threads} threads | simd {bi['simd']} | "
            f"openmp {bi['openmp']} | numpy {info['numpy']} | torch {info['torch'] or 'not installed'} | "
            f"load {num(info['load_average'], '{:.2f}')}")
        if note:
            say(note)
        if not threads.blas_limited:
            say("threadpoolctl is not installed: numpy's BLAS (reference, matmul rate) runs at its own thread count")
        matmul = matmul_gflops(repeat=3 if opts.quick else 7, use_torch="torch" in impls)
        rate = max(matmul.values())
        say(f"float32 matmul {MATMUL_SIZE}x{MATMUL_SIZE} at {n_threads} threads: "
            + ", ".join(f"{name} {v:.1f}" for name, v in matmul.items())
            + f" GFLOP/s; %matmul below is the engine's rate as a share of {rate:.1f} GFLOP/s")
        peak = fma_peak_gflops(repeat=3 if opts.quick else 7)
        say(f"float32 multiply-add peak of this build ({bi['simd']}) at {n_threads} threads: {peak:.1f} GFLOP/s "
            f"(vector FMA chains in registers); %peak below is the engine's rate as a share of it")
        say(f"median of {opts.repeat} calls (reference: {opts.reference_repeat}"
            f"{', none on the biggest shapes' if opts.quick else ''}); grad_input = backward - grad_weight; "
            f"x_ref, x_torch: engine speedup (above 1: the engine is faster)")
        ctx = Context(opts=opts, threads=n_threads, impls=impls, matmul_gflops=rate, peak_gflops=peak, say=say,
                      tiny=opts.shapes == "tiny")
        for section in SECTIONS:
            chosen = not opts.section or section.NAME in opts.section
            why = section.wanted(ctx) if chosen else "not chosen (--section)"
            if why is not True:
                skipped[section.NAME] = why
                continue
            say("")
            sections[section.NAME] = _measure_section(section, ctx)
    report = {"machine": info, "threads": n_threads, "quick": opts.quick, "repeat": opts.repeat,
              "reference_repeat": opts.reference_repeat, "matmul_gflops": rate, "matmul_by_library": matmul,
              "peak_gflops": peak,
              "matmul_size": MATMUL_SIZE, "impls": list(impls), "torch_note": note, "sections": sections,
              "skipped": skipped, "seconds": time.perf_counter() - started, "load_average_end": load_average()}
    report["comparisons"] = {c["key"]: c for name, result in sections.items() if "error" not in result
                             for c in _section(name).comparisons(result)}
    _print_summary(report, ctx, say)
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


def _section(name):
    return next(s for s in SECTIONS if s.NAME == name)


def _measure_section(section, ctx):
    """The section's results; a section that fails is reported as {"error": ...} and does not throw away the
    others (the kernels section, which everything else leans on, is allowed to fail loudly)."""
    if section is kernels:
        return section.measure(ctx)
    try:
        return section.measure(ctx)
    except Exception as e:
        ctx.say(f"{section.TITLE}: failed, {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


def _print_summary(report, ctx, say):
    for name, result in report["sections"].items():
        if "error" not in result:
            say("")
            for line in _section(name).summary(result, ctx):
                say(line)
    if report["skipped"]:
        say("")
        for name, why in report["skipped"].items():
            say(f"{_section(name).TITLE}: not run, {why}")
    say("")
    say("comparisons (engine speedup: above 1x the engine is faster; %: share of the float32 matmul rate or of the "
        "build's multiply-add peak)")
    for c in report["comparisons"].values():
        v = c["value"]
        shown = "-" if v is None else (f"{v:.0f}%" if c["unit"] == "%" else f"{v:.3g}x")
        say(f"  {c['label']:<58} {shown:>7}")
    if report["torch_note"]:
        say(f"  ({report['torch_note']})")
    say(f"({report['seconds']:.1f} s; load average {num(report['machine']['load_average'], '{:.2f}')} at the "
        f"start, {num(report['load_average_end'], '{:.2f}')} at the end)")


def _load_warning(report):
    """A caveat for the top of the file when other work shared the machine during the run."""
    loads = [v for v in (report["machine"]["load_average"], report["load_average_end"]) if v is not None]
    if not loads or max(loads) < 0.5 * usable_cores():
        return []
    return [f"**Measured under load** (1-minute load average up to {max(loads):.1f} on {usable_cores()} usable "
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
        *(lscpu() or [f"Model name: {m['processor']}", f"CPU(s): {m['cpus']}"]),
        f"usable cores (affinity, quota): {usable_cores()}",
        f"platform: {m['platform']}",
        f"python {m['python']}, numpy {m['numpy']}, torch {m['torch'] or 'not installed'}",
        f"threads: {report['threads']}",
        f"load average (1 min) at the start: {num(m['load_average'], '{:.2f}')}, "
        f"at the end: {num(report['load_average_end'], '{:.2f}')}",
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
    """A PNG: conv GFLOP/s with the matmul rate, the engine's speedup over PyTorch per conv shape and direction,
    and the pools' speedups over the reference and PyTorch. A panel without PyTorch figures says why."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install 'convengine[plot]'); no chart written",
              file=sys.stderr)
        return False
    if "rows" not in report["sections"].get("kernels", {}):
        print(f"--plot {path}: the kernels section was not run; no chart written", file=sys.stderr)
        return False
    rows = report["sections"]["kernels"]["rows"]
    note = report.get("torch_note")
    conv = [r for r in rows if r["op"] == "conv2d"]
    shapes = list(dict.fromkeys(r["shape"] for r in conv))
    fig, axes = plt.subplots(3, 1, figsize=(13, 13))
    width = 0.8 / len(CONV_DIRECTIONS)
    for i, direction in enumerate(CONV_DIRECTIONS):
        sel = {r["shape"]: r for r in conv if r["direction"] == direction}
        xs = [j + (i - 1.5) * width for j in range(len(shapes))]
        axes[0].bar(xs, [sel[s]["engine_rate"] or 0 for s in shapes], width, label=direction)
        if not note:
            axes[1].bar(xs, [sel[s]["vs_torch"] or 0 for s in shapes], width, label=direction)
    axes[0].axhline(report["matmul_gflops"], color="k", ls="--", lw=1,
                    label=f"float32 matmul rate ({report['matmul_gflops']:.0f})")
    axes[0].set_ylabel("engine GFLOP/s")
    axes[1].set_ylabel("engine speedup over PyTorch")
    if note:
        axes[1].text(0.5, 0.5, note.replace(": ", ":\n", 1), ha="center", va="center", fontsize=11,
                     transform=axes[1].transAxes)
        axes[1].set_yticks([])
    else:
        axes[1].axhline(1.0, color="k", lw=1)
        axes[1].set_yscale("log")
    for ax in axes[:2]:
        ax.set_xticks(range(len(shapes)), shapes, rotation=20, ha="right", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    pools = [r for r in rows if r["op"] != "conv2d"]
    labels = [f"{r['op']} {r['shape']} {r['direction']}" for r in pools]
    xs = np.arange(len(pools))
    axes[2].bar(xs - 0.2, [r["vs_reference"] or 0 for r in pools], 0.4, label="vs reference")
    axes[2].bar(xs + 0.2, [r["vs_torch"] or 0 for r in pools], 0.4,
                label="vs PyTorch" + (" (not measured: see the note above)" if note else ""))
    axes[2].axhline(1.0, color="k", lw=1)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("engine speedup")
    axes[2].set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
    axes[2].legend(fontsize=8)
    for ax in axes[1:] if not note else axes[2:]:
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(f"convengine {report['machine']['convengine']['version']}, {report['threads']} threads, "
                 f"{report['machine']['processor']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return True


def main(argv=None):
    """`python -m convengine bench [options]`; returns the exit status."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
